"""Composites: which rule explains which layer, registered under a short name.

The four composites equal zennit's composites of the same names (zennit/composites.py): ReLU
and dropout pass relevance through, average pools redistribute proportionally (Norm), max-pools
send relevance to the forward winner, and the rules below map conv / linear / first layers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lrpscale.engine import rules

# A rule factory gets the layer, whether its input is known to be >= 0 and whether a ReLU
# follows it, plus the box bounds; it returns the rule bound to that layer.
RuleFactory = Callable[..., rules.Rule]


@dataclass(frozen=True)
class Composite:
    """Rule factories for the first conv/linear layer, the other convs and the linear layers."""

    name: str
    conv: RuleFactory
    linear: RuleFactory
    first: RuleFactory | None = None
    description: str = ""

    def rule_for(self, module: nn.Module, *, first: bool, nonneg_input: bool, relu_after: bool,
                 low, high) -> rules.Rule:
        """The rule for one conv or linear layer of the model."""
        factory = self.first if first and self.first is not None else (
            self.conv if isinstance(module, nn.Conv2d) else self.linear)
        return factory(module, nonneg_input=nonneg_input, relu_after=relu_after, low=low, high=high)


COMPOSITES: dict[str, Composite] = {}


def register(composite: Composite) -> Composite:
    COMPOSITES[composite.name] = composite
    return composite


def get_composite(name: str) -> Composite:
    """Look a composite up by name; ``epsilon_gamma_box`` (zennit's spelling) works too."""
    key = name.replace("_", "-").lower()
    if key not in COMPOSITES:
        raise KeyError(f"unknown composite {name!r}; choose one of {', '.join(COMPOSITES)}")
    return COMPOSITES[key]


def _epsilon(module, *, nonneg_input, relu_after, low, high):
    return rules.Epsilon(module, nonneg_input, epsilon=1e-6)


def _gamma(module, *, nonneg_input, relu_after, low, high):
    return rules.Gamma(module, nonneg_input, relu_after, gamma=0.25)


def _zplus(module, *, nonneg_input, relu_after, low, high):
    return rules.AlphaBeta(module, nonneg_input, alpha=1.0, beta=0.0)


def _alpha2_beta1(module, *, nonneg_input, relu_after, low, high):
    return rules.AlphaBeta(module, nonneg_input, alpha=2.0, beta=1.0)


def _zbox(module, *, nonneg_input, relu_after, low, high):
    return rules.ZBox(module, nonneg_input, low, high)


def _flat(module, *, nonneg_input, relu_after, low, high):
    return rules.Flat(module, nonneg_input)


register(Composite("epsilon-gamma-box", conv=_gamma, linear=_epsilon, first=_zbox,
                   description="z^B on the first conv, gamma=0.25 on the other convs, epsilon=1e-6 on linear layers"))
register(Composite("epsilon-plus-flat", conv=_zplus, linear=_epsilon, first=_flat,
                   description="flat on the first layer, z+ on the other convs, epsilon=1e-6 on linear layers"))
register(Composite("epsilon-alpha2-beta1", conv=_alpha2_beta1, linear=_epsilon,
                   description="alpha=2, beta=1 on every conv, epsilon=1e-6 on linear layers"))
register(Composite("epsilon-alpha2-beta1-flat", conv=_alpha2_beta1, linear=_epsilon, first=_flat,
                   description="flat on the first layer, alpha=2, beta=1 on the other convs, epsilon on linear layers"))

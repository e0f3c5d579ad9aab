"""The LRP engine: one forward pass, then any number of batched backward passes.

``Explainer(model).explain(x)`` is what users call. Underneath, ``forward`` keeps each layer's
input (and the max-pool switches); ``propagate`` maps relevance at one layer's output down to a
lower layer or the input. Because the forward pass fixes every denominator, propagation is
linear in the relevance it is given, so M restricted variants of N images run as one
``(N, M, ...)`` batch after a single forward pass.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lrpscale.engine import rules
from lrpscale.engine.composites import Composite, get_composite
from lrpscale.engine.models import fold_batchnorm, input_normalization, resolve_layer

Tensor = torch.Tensor


@dataclass
class Step:
    """One layer of the model in forward order, with the rule that explains it."""

    name: str
    rule: rules.Rule
    is_param: bool  # a conv or linear layer: relevance is reported and can be restricted here


@dataclass
class ForwardRecord:
    """What one forward pass keeps for later backward passes.

    logits: (N, K). ctx[i]: what step i's rule needs. activations[name]: post-ReLU output of each
    conv/linear layer, (N, C, h, w) or (N, F) (the last layer's are its logits).
    """

    input: Tensor
    logits: Tensor
    ctx: list[dict]
    activations: dict[str, Tensor]


@dataclass
class Explanation:
    """The result of ``Explainer.explain``.

    relevance: (N, 3, H, W) input relevance, or (N, M, 3, H, W) for a list of M restrictions.
    layers[name]: relevance at the output of every conv/linear layer, same leading axes.
    activations[name]: post-ReLU activations (N, ...). logits: (N, K); target: (N,);
    initial: (N,) initial relevance (the target logit). totals[name]: summed relevance per image
    (and condition) at every conv/linear layer output and at ``"input"``.
    """

    relevance: Tensor
    layers: dict[str, Tensor]
    activations: dict[str, Tensor]
    logits: Tensor
    target: Tensor
    initial: Tensor
    totals: dict[str, Tensor] = field(default_factory=dict)

    @property
    def conservation_error(self) -> Tensor:
        """(N,) or (N, M): |sum of input relevance - initial relevance| / |initial relevance|."""
        return self.conservation_errors()["input"]

    def conservation_errors(self) -> dict[str, Tensor]:
        """Relative conservation error at every layer and at the input."""
        initial = self.initial.reshape(-1, *([1] * (self.totals["input"].ndim - 1)))
        return {name: conservation_error(total, initial) for name, total in self.totals.items()}


def conservation_error(total: Tensor, initial: Tensor) -> Tensor:
    """|total - initial| / |initial| (docs/method.md §5), elementwise; an initial relevance of 0
    divides by the dtype's smallest normal number instead."""
    return (total - initial).abs() / initial.abs().clamp(min=torch.finfo(initial.dtype).tiny)


def _sequential_layers(model: nn.Module) -> list[tuple[str, nn.Module | None]]:
    """VGG as a flat list of (module name, module); None stands for the flatten in forward()."""
    if not all(hasattr(model, part) for part in ("features", "avgpool", "classifier")):
        raise TypeError("lrpscale explains VGG-style models with .features, .avgpool and .classifier "
                        f"(torchvision's VGG); got {type(model).__name__}")
    layers = [(f"features.{i}", m) for i, m in enumerate(model.features)]
    layers += [("avgpool", model.avgpool), ("flatten", None)]
    layers += [(f"classifier.{i}", m) for i, m in enumerate(model.classifier)]
    return layers


_PASS_THROUGH = (nn.ReLU, nn.Dropout, nn.Identity)

# on a CPU, explain() keeps each full-resolution layer output of one pass under this size (cpu_chunk)
CPU_CHUNK_BYTES = 64 << 20


class Explainer:
    """LRP for a VGG model with one composite: construct with the model, call with inputs.

    ``low``/``high`` are the box bounds of the z^B rule in normalised input space; by default the
    normalised values of pixels 0 and 1 under the model's input normalisation, per channel.
    Rule-modified weights are built once here; the model itself is never modified.
    """

    def __init__(self, model: nn.Module, composite: str | Composite = "epsilon-gamma-box",
                 low: float | Sequence[float] | Tensor | None = None,
                 high: float | Sequence[float] | Tensor | None = None):
        if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            model = fold_batchnorm(copy.deepcopy(model).eval())
        self.model = model.eval()
        self.composite = get_composite(composite) if isinstance(composite, str) else composite
        mean, std = (torch.tensor(v) for v in input_normalization(model))
        self.low = torch.as_tensor(low) if low is not None else (0 - mean) / std
        self.high = torch.as_tensor(high) if high is not None else (1 - mean) / std
        self.steps = self._build_steps()
        self.layer_names = [s.name for s in self.steps if s.is_param]
        self._index = {s.name: i for i, s in enumerate(self.steps)}

    def _build_steps(self) -> list[Step]:
        layers = _sequential_layers(self.model)
        steps: list[Step] = []
        nonneg, seen_param = False, False
        for position, (name, module) in enumerate(layers):
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                following = next((m for _, m in layers[position + 1:]
                                  if not isinstance(m, (nn.Dropout, nn.Identity))), None)
                rule = self.composite.rule_for(module, first=not seen_param, nonneg_input=nonneg,
                                               relu_after=isinstance(following, nn.ReLU), low=self.low, high=self.high)
                steps.append(Step(name, rule, True))
                nonneg, seen_param = False, True
            elif isinstance(module, _PASS_THROUGH):
                steps.append(Step(name, rules.Pass(module), False))
                nonneg = nonneg or isinstance(module, nn.ReLU)
            elif isinstance(module, nn.MaxPool2d):
                steps.append(Step(name, rules.WinnerTakesAll(module), False))
            elif isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                steps.append(Step(name, rules.Norm(module), False))
            elif module is None:
                steps.append(Step(name, rules.Flatten(), False))
            else:
                raise TypeError(f"no LRP rule for layer {name} ({type(module).__name__})")
        return steps

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def resolve(self, layer: str) -> str:
        """Module name of a layer given by name or alias (``conv5_3`` -> ``features.28``)."""
        return resolve_layer(self.model, layer)

    @torch.no_grad()
    def forward(self, x: Tensor) -> ForwardRecord:
        """Run the model on x (N, 3, H, W), keeping what backward passes need."""
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (N, 3, H, W), got shape {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        contexts, activations = [], {}
        last_param = None
        out = x
        for step in self.steps:
            out, ctx = step.rule.forward(out)
            contexts.append(ctx)
            if step.is_param:
                last_param = step.name
                activations[step.name] = out
            elif isinstance(step.rule, rules.Pass) and step.rule.relu and last_param is not None:
                activations[last_param] = out
                last_param = None
        return ForwardRecord(x, out, contexts, activations)

    def targets(self, record: ForwardRecord, target=None) -> Tensor:
        """(N,) class indices: the prediction for None, else the given int or per-image classes."""
        n, classes = record.logits.shape
        if target is None:
            return record.logits.argmax(1)
        target = torch.as_tensor(target, device=record.logits.device).long().reshape(-1)
        if target.numel() == 1:
            target = target.expand(n)
        if target.numel() != n:
            raise ValueError(f"got {target.numel()} targets for {n} images")
        if (target < 0).any() or (target >= classes).any():
            raise ValueError(f"target out of range: the model has {classes} classes")
        return target.clone()

    def channels(self, record: ForwardRecord, layer: str) -> int:
        """Number of neurons (channels or units) of a conv/linear layer."""
        return record.activations[self.resolve(layer)].shape[1]

    @torch.no_grad()
    def propagate(self, record: ForwardRecord, relevance: Tensor, start: str | None = None,
                  stop: str | None = None, masks: Mapping[str, Tensor] | None = None,
                  keep: Sequence[str] = ()) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Propagate relevance from the output of layer ``start`` down to the output of ``stop``.

        relevance: (N, M, *shape of start's output). start: default the last layer; stop: default
        the input. masks[layer]: (N, M, C) factors applied to the relevance at that layer's output
        (layers in [start, stop): at start, not at stop). keep: layers whose relevance to return.
        Returns (relevance at stop's output or the input (N, M, ...), kept {layer: (N, M, ...)},
        totals {layer or "input": (N, M)}).
        """
        first = self._index[self.resolve(start)] if start else len(self.steps) - 1
        last = self._index[self.resolve(stop)] if stop else -1
        if last >= first:
            raise ValueError(f"stop layer {stop} is not below start layer {start}")
        masks = {self.resolve(k): v for k, v in (masks or {}).items()}
        keep = {self.resolve(k) for k in keep}
        kept, totals = {}, {}
        owned = False  # the caller's tensor, until a step returns a new one
        for i in range(first, last, -1):
            step = self.steps[i]
            if step.is_param:
                if step.name in masks:
                    mask = masks[step.name].to(relevance)
                    relevance = relevance * mask.reshape(*mask.shape, *([1] * (relevance.ndim - 3)))
                    owned = True
                totals[step.name] = relevance.flatten(2).sum(2)
                if step.name in keep:
                    kept[step.name] = relevance
                    owned = False
            lower = step.rule.backward(relevance, record.ctx[i], owned)
            owned = owned or lower is not relevance
            relevance = lower
        totals["input" if stop is None else self.resolve(stop)] = relevance.flatten(2).sum(2)
        return relevance, kept, totals

    def initial_relevance(self, record: ForwardRecord, target: Tensor) -> Tensor:
        """(N, 1, K): the target logit at the target class, zero elsewhere."""
        initial = torch.zeros_like(record.logits)
        rows = torch.arange(len(target), device=initial.device)
        initial[rows, target] = record.logits[rows, target]
        return initial.unsqueeze(1)

    def restriction_masks(self, record: ForwardRecord, restrict) -> tuple[dict[str, Tensor], int]:
        """Turn ``restrict`` into (N, M, C) 0/1 masks per layer, and M.

        ``restrict``: {layer: neurons} for one condition or a list of such dicts for M conditions.
        neurons: a list of ints (every image), a list of N lists (per image), or a 0/1 tensor
        (C,) or (N, C). Layers a condition does not name stay unrestricted in that condition.
        """
        conditions = [restrict] if isinstance(restrict, Mapping) else list(restrict)
        n, m = record.logits.shape[0], len(conditions)
        masks: dict[str, Tensor] = {}
        for j, condition in enumerate(conditions):
            for layer, neurons in condition.items():
                name = self.resolve(layer)
                c = record.activations[name].shape[1]
                if name not in masks:
                    masks[name] = torch.ones(n, m, c, device=record.logits.device)
                masks[name][:, j] = _neuron_mask(neurons, n, c, name).to(masks[name])
        return masks, m

    def cpu_chunk(self, x: Tensor) -> int:
        """Images per pass for ``explain``: the whole batch on an accelerator; on a CPU as many as
        keep every full-resolution layer output (stacked channels included) under
        ``CPU_CHUNK_BYTES``.

        Measured on a 2-core CPU, VGG16 at 224 px, batch 8 (interleaved with the plain gradient,
        8 rounds): one pass 3.81 s median, four passes of 2 images 3.36 s, two of
        4 3.45 s. Large fresh tensors cost a page fault per 4 KB and fall out of the caches;
        heatmaps do not depend on the chunking (batch invariance).
        """
        if self.device.type != "cpu" or x.ndim != 4:
            return max(len(x), 1)
        widest = 0  # output channels (stacked ones included) of the layers at full resolution
        for step in self.steps:
            if isinstance(step.rule, (rules.WinnerTakesAll, rules.Norm, rules.Flatten)):
                break
            if isinstance(step.rule, rules.AffineRule):
                stacked = step.rule.stacked[0] if step.rule.stacked is not None else step.rule.weight
                widest = max(widest, stacked.shape[0])
        per_image = max(widest, 1) * x.shape[2] * x.shape[3] * 4
        return max(1, CPU_CHUNK_BYTES // per_image)

    def explain(self, x: Tensor, target=None, restrict=None, keep_layers: bool = True) -> Explanation:
        """Explain x (N, 3, H, W) for ``target`` (None: the prediction; an int; or (N,) classes).

        ``restrict`` propagates only the relevance of the listed neurons (see
        ``restriction_masks``); a list of restrictions shares one forward pass and comes back
        with a condition axis: relevance (N, M, 3, H, W). Without restrictions, a large batch on
        a CPU runs in chunks of ``cpu_chunk`` images.
        """
        chunk = self.cpu_chunk(x)
        if restrict is None and len(x) > chunk:
            target = None if target is None else torch.as_tensor(target).reshape(-1)
            per_image = target is not None and target.numel() > 1
            return _concatenated([self.explain(x[i:i + chunk], target[i:i + chunk] if per_image else target,
                                               keep_layers=keep_layers) for i in range(0, len(x), chunk)])
        record = self.forward(x)
        target = self.targets(record, target)
        masks, m = self.restriction_masks(record, restrict) if restrict is not None else ({}, 1)
        initial = self.initial_relevance(record, target).expand(-1, m, -1)
        keep = self.layer_names if keep_layers else ()
        relevance, kept, totals = self.propagate(record, initial, masks=masks, keep=keep)
        if restrict is None or isinstance(restrict, Mapping):  # a single condition: drop its axis
            relevance = relevance[:, 0]
            kept = {k: v[:, 0] for k, v in kept.items()}
            totals = {k: v[:, 0] for k, v in totals.items()}
        rows = torch.arange(len(target), device=target.device)
        return Explanation(relevance, kept, record.activations, record.logits, target,
                           record.logits[rows, target], totals)


def _concatenated(parts: list[Explanation]) -> Explanation:
    """The explanations of consecutive chunks of one batch, as one."""
    def joined(name: str) -> dict[str, Tensor]:
        return {key: torch.cat([getattr(p, name)[key] for p in parts]) for key in getattr(parts[0], name)}
    return Explanation(torch.cat([p.relevance for p in parts]), joined("layers"), joined("activations"),
                       torch.cat([p.logits for p in parts]), torch.cat([p.target for p in parts]),
                       torch.cat([p.initial for p in parts]), joined("totals"))


def _neuron_mask(neurons, n: int, channels: int, layer: str) -> Tensor:
    """(N, C) 0/1 mask from a list of ints, a list of N lists, or a 0/1 tensor (C,) / (N, C)."""
    if isinstance(neurons, Tensor):
        if neurons.numel() not in (channels, n * channels):
            raise ValueError(f"restriction mask for {layer} must have {channels} or {n}x{channels} entries")
        if not ((neurons == 0) | (neurons == 1)).all():
            raise ValueError(f"restriction mask for {layer} must hold only 0 and 1; pass neuron indices as a list")
        return neurons.float().reshape(-1, channels).expand(n, channels).cpu()
    neurons = list(neurons)
    nested = [isinstance(v, (list, tuple, range, Tensor)) for v in neurons]
    if any(nested) and (not all(nested) or len(neurons) != n):
        raise ValueError(f"restriction for {layer}: give one list of neuron indices for every image, or one list "
                         f"per image ({n} lists); got {len(neurons)} entries mixing lists and indices")
    lists = neurons if any(nested) else [neurons] * n
    mask = torch.zeros(n, channels)
    for row, chosen in enumerate(lists):
        chosen = [int(c) for c in chosen]
        if any(c < 0 or c >= channels for c in chosen):
            raise ValueError(f"neuron index out of range for {layer} ({channels} neurons): {chosen}")
        mask[row, chosen] = 1.0
    return mask

"""Model randomisation tests: does a heatmap change when the model's weights are destroyed?

An explanation that stays the same after the weights it explains are replaced by random ones
does not explain the model (Adebayo et al. 2018). Two tests:

- ``cascade``: the model parameter randomisation test (MPRT), cascading from the top: layer by
  layer from the last linear layer down, each step randomising one more layer, the Spearman rank
  correlation of |heatmap| against the original model's |heatmap| per image. A faithful method's
  correlation falls toward 0.
- ``efficient_mprt``: eMPRT (Hedström et al., "Sanity checks revisited", TMLR 2024): the entropy
  of the histogram of the fully randomised model's |heatmap| over that of the original's. A
  method whose heatmaps turn to noise under random weights gets a ratio above 1.

Heatmaps come from ``explain_fn(model, x, target) -> (N, C, H, W)``, so any method plugs in;
``lrp``, ``gradient`` and ``gradient_x_input`` are provided. Heatmaps are summed over colour,
then taken in absolute value, before they are compared or histogrammed.

Randomisation (``randomised_copy``): a conv/linear layer gets fresh weights from torchvision's VGG
initialisation (conv: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``; linear:
``normal_(0, 0.01)``; biases 0). Layer i (its position among the model's conv/linear layers in
``named_modules`` order) draws from its own generator, seeded by ``(seed, i)`` through numpy's
``SeedSequence``, so a layer's random weights do not depend on which other layers are
randomised: step k of ``cascade`` equals ``randomised_copy(model, top k layers, seed)``.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from lrpscale.engine.explainer import Explainer
from lrpscale.engine.models import resolve_layer

Tensor = torch.Tensor
ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


# -- explanation methods ------------------------------------------------------------------------

def lrp(model: nn.Module, x: Tensor, target: Tensor, composite: str = "epsilon-gamma-box") -> Tensor:
    """(N, 3, H, W) LRP heatmap of a VGG with a composite (docs/method.md §4); the target logit
    is the initial relevance. A new ``Explainer`` per call: its modified weights belong to this
    model's weights. ``functools.partial(lrp, composite=...)`` picks another composite."""
    return Explainer(model, composite).explain(x, target=target, keep_layers=False).relevance


def gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """(N, C, H, W) gradient of each image's target logit with respect to its input."""
    with torch.enable_grad():
        inputs = x.detach().clone().requires_grad_(True)
        logits = model(inputs)
        target = torch.as_tensor(target, device=logits.device).long().reshape(-1).expand(len(x))
        # images do not interact in an eval-mode model, so the gradient of the sum is per image
        chosen = logits.gather(1, target[:, None]).sum()
        grad, = torch.autograd.grad(chosen, inputs)
    return grad.detach()


def gradient_x_input(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """(N, C, H, W) gradient times input (elementwise)."""
    return gradient(model, x, target) * x


# -- statistics ---------------------------------------------------------------------------------

def average_ranks(values: Tensor) -> Tensor:
    """(N, P) float64 ranks 1..P of each row, ties given the mean of the ranks they span
    (scipy's ``rankdata(method="average")``)."""
    n, count = values.shape
    ordered, order = torch.sort(values, dim=1, stable=True)
    # a new tie group starts wherever the sorted value changes; group ids are made unique per row
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = torch.cumsum(starts.reshape(-1).long(), 0) - 1
    position = torch.arange(count, dtype=torch.float64, device=values.device).repeat(n)
    groups = int(group[-1]) + 1 if group.numel() else 0
    first = torch.full((groups,), float(count * n), dtype=torch.float64, device=values.device)
    last = torch.zeros(groups, dtype=torch.float64, device=values.device)
    first.scatter_reduce_(0, group, position, "amin")
    last.scatter_reduce_(0, group, position, "amax")
    mean_rank = ((first + last) / 2 + 1)[group].reshape(n, count)
    ranks = torch.empty_like(mean_rank)
    ranks.scatter_(1, order, mean_rank)
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """(N,) Spearman rank correlation of each row pair of a and b, (N, ...) each (flattened).

    Pearson correlation of the average ranks, in float64. A row with constant values has no
    defined correlation: NaN, as scipy returns.
    """
    ra, rb = average_ranks(a.flatten(1).double()), average_ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.square().sum(1) * rb.square().sum(1)).sqrt()


def histogram_entropy(values: Tensor, bins: int = 100) -> Tensor:
    """(N,) Shannon entropy (natural log) of the histogram of each row of values (N, ...).

    As ``scipy.stats.entropy(np.histogram(row, bins)[0])``, the complexity Quantus's eMPRT uses
    (``discrete_entropy``): ``bins`` equal bins from the row's minimum to its maximum (a constant
    row: ``value +- 0.5``), bin i holding ``edge_i <= v < edge_{i+1}``, the last bin closed. The
    edges are computed as numpy's ``linspace`` computes them (``start + i * step``, last = stop),
    in float64, so values on an edge fall in the same bin. The histogram does not change when the
    values are scaled by a positive factor, so no normalisation is applied before it.
    """
    flat = values.flatten(1).double()
    n = flat.shape[0]
    low, high = flat.min(1).values, flat.max(1).values
    constant = low == high
    low, high = torch.where(constant, low - 0.5, low), torch.where(constant, high + 0.5, high)
    step = (high - low) / bins
    edges = torch.arange(bins + 1, dtype=torch.float64, device=flat.device)[None] * step[:, None] + low[:, None]
    edges[:, -1] = high
    index = (torch.searchsorted(edges, flat, right=True) - 1).clamp(0, bins - 1)
    counts = torch.zeros(n, bins, dtype=torch.float64, device=flat.device)
    counts.scatter_add_(1, index, torch.ones_like(flat))
    p = counts / counts.sum(1, keepdim=True)
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(1)


# -- randomisation ------------------------------------------------------------------------------

def parameter_layers(model: nn.Module) -> list[str]:
    """Names of the model's conv and linear layers, in ``named_modules`` (forward, for VGG) order."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _layer_generator(seed: int, position: int) -> torch.Generator:
    # SeedSequence mixes (seed, position) into an unrelated state, so neighbouring layers and
    # neighbouring seeds do not share random streams
    state = np.random.SeedSequence([int(seed), int(position)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def _randomise_layer(module: nn.Module, generator: torch.Generator) -> None:
    """torchvision's VGG initialisation, drawn on the CPU (reproducible across devices), in place."""
    weight = torch.empty(module.weight.shape, dtype=module.weight.dtype)
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu", generator=generator)
    else:
        nn.init.normal_(weight, 0.0, 0.01, generator=generator)
    module.weight.copy_(weight)
    if module.bias is not None:
        module.bias.zero_()


def _resolve(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    names = parameter_layers(model)
    if layers is None:
        return names
    resolved = []
    for layer in layers:
        if layer not in names and hasattr(model, "features"):  # aliases such as conv5_3 / fc8, VGG only
            try:
                layer = resolve_layer(model, layer)
            except KeyError:
                pass
        if layer not in names:
            raise KeyError(f"{layer!r} is not a conv/linear layer of this model; it has: {', '.join(names)}")
        resolved.append(layer)
    return resolved


def randomised_copy(model: nn.Module, layers: Sequence[str] | None = None, seed: int = 0) -> nn.Module:
    """A deep copy of model whose chosen conv/linear layers (names or VGG aliases; default all)
    have fresh random weights (module docstring); the others, and the model itself, unchanged."""
    chosen = set(_resolve(model, layers))
    result = copy.deepcopy(model)
    modules = dict(result.named_modules())
    for position, name in enumerate(parameter_layers(result)):
        if name in chosen:
            _randomise_layer(modules[name], _layer_generator(seed, position))
    return result


def _colour_abs(heatmap: Tensor) -> Tensor:
    """(N, H, W) |sum over colour| of an (N, C, H, W) heatmap."""
    return heatmap.detach().sum(1).abs()


def cascade(model: nn.Module, x: Tensor, target, explain_fn: ExplainFn = lrp, seed: int = 0,
            layers: Sequence[str] | None = None, absolute: bool = True) -> list[tuple[str, Tensor]]:
    """Cascading randomisation from the top: [(layer name, spearman (N,)), ...], one entry per step.

    Step k randomises the first k of ``layers`` (default all conv/linear layers, the last one
    first) exactly as ``randomised_copy(model, those layers, seed)`` and compares the heatmap with
    the original model's: Spearman of |colour sum| over the H x W pixels, per image
    (``absolute=False``: of the signed colour sum). x: (N, C, H, W); target: (N,) or one int. One
    copy of the model is randomised in place, one more layer per step; the model is left alone.
    Before any step (nothing randomised) the correlation is 1 by construction, so no entry.
    """
    target = torch.as_tensor(target).long().reshape(-1).expand(len(x))
    order = _resolve(model, layers)
    if layers is None:
        order = order[::-1]  # top down
    summary = _colour_abs if absolute else (lambda heatmap: heatmap.detach().sum(1))
    original = summary(explain_fn(model, x, target))
    current = copy.deepcopy(model)
    modules = dict(current.named_modules())
    position = {name: i for i, name in enumerate(parameter_layers(current))}
    results = []
    for name in order:
        _randomise_layer(modules[name], _layer_generator(seed, position[name]))
        results.append((name, spearman(summary(explain_fn(current, x, target)), original)))
    return results


def efficient_mprt(model: nn.Module, x: Tensor, target, explain_fn: ExplainFn = lrp, seed: int = 0,
                   bins: int = 100, randomised: nn.Module | None = None) -> Tensor:
    """(N,) eMPRT: ``histogram_entropy(|H_rand|) / histogram_entropy(|H|)`` per image, H the
    colour-summed heatmap of the original model, H_rand that of the fully randomised one
    (``randomised_copy(model, seed=seed)`` unless ``randomised`` is given).

    Quantus 0.6 ``EfficientMPRT`` returns ``(H_rand - H) / H`` of the same entropies, i.e. this
    ratio minus 1; it histograms the explanation as ``explain_func`` returns it (take |.| with
    ``abs=True``; its default ``abs=False`` histograms signed values), with 100 bins when
    ``complexity_func_kwargs`` names no ``n_bins`` or rule, and randomises with each layer's
    ``reset_parameters()`` after ``torch.manual_seed(seed + 1)`` (PyTorch's default
    initialisation), not torchvision's VGG initialisation. An original heatmap whose values are
    all equal has entropy 0: the ratio is inf (or NaN if both are).
    """
    target = torch.as_tensor(target).long().reshape(-1).expand(len(x))
    if randomised is None:
        randomised = randomised_copy(model, seed=seed)
    before = histogram_entropy(_colour_abs(explain_fn(model, x, target)), bins)
    after = histogram_entropy(_colour_abs(explain_fn(randomised, x, target)), bins)
    return after / before

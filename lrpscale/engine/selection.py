"""Neuron selection: channel relevance, top-k, the k sweep and its MSE/SMAPE scores, choosing k.

docs/method.md §7-§9. A neuron is a channel of a conv layer or a unit of a linear layer.
The k sweep restricts the relevance at one layer to its top-k neurons for every k at once (one
batch of masks, one backward pass from that layer down) and scores the restricted heatmaps
against the full one.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lrpscale.engine.explainer import Explainer, ForwardRecord

Tensor = torch.Tensor
VARIANTS = ("fidelity", "forward_backward")


def neuron_totals(layer_values: Tensor, lead: int = 1) -> Tensor:
    """Sum over positions: (*lead, C, h, w) -> (*lead, C); linear layers (*lead, F) pass through.

    lead: number of leading axes, 1 for (N, ...) and 2 for (N, M, ...).
    """
    return layer_values if layer_values.ndim == lead + 1 else layer_values.flatten(lead + 1).sum(-1)


def rank_neurons(relevance: Tensor, absolute: bool = False) -> Tensor:
    """(N, C) neuron relevance -> (N, C) neuron indices, most relevant first (ties: lower index)."""
    key = relevance.abs() if absolute else relevance
    return torch.sort(key, dim=1, descending=True, stable=True).indices


def top_k_masks(order: Tensor, ks: Sequence[int]) -> Tensor:
    """(N, C) ranking -> (N, K, C) 0/1 masks of the top-k neurons for each k."""
    n, c = order.shape
    positions = torch.empty_like(order)
    positions.scatter_(1, order, torch.arange(c, device=order.device).expand(n, c))
    limits = torch.as_tensor(list(ks), device=order.device).reshape(1, -1, 1)
    return (positions.unsqueeze(1) < limits).float()


def smape(a: Tensor, b: Tensor, dim=-1) -> Tensor:
    """Symmetric mean absolute percentage error in percent (0 to 200); a term with a = b = 0 counts 0."""
    denominator = a.abs() + b.abs()
    terms = torch.where(denominator > 0, 2 * (a - b).abs() / denominator.clamp(min=torch.finfo(a.dtype).tiny),
                        torch.zeros_like(denominator))
    return 100 * terms.mean(dim)


def mse(a: Tensor, b: Tensor, dim=-1) -> Tensor:
    return (a - b).square().mean(dim)


def _l1_normalized(values: Tensor, dim=-1) -> Tensor:
    return values / values.abs().sum(dim, keepdim=True).clamp(min=torch.finfo(values.dtype).tiny)


def fidelity_scores(full: Tensor, restricted: Tensor) -> tuple[Tensor, Tensor]:
    """Full heatmap (N, 3, H, W) vs restricted ones (N, K, 3, H, W) -> (mse, smape), each (N, K).

    Both are summed over colour channels and divided by the full heatmap's sum of |H|.
    """
    h = full.sum(1)
    scale = h.abs().flatten(1).sum(1).clamp(min=torch.finfo(h.dtype).tiny).reshape(-1, 1, 1, 1)
    a = (h.unsqueeze(1) / scale).flatten(2)
    b = (restricted.sum(2) / scale).flatten(2)
    return mse(a, b), smape(a, b)


def forward_backward_scores(activation: Tensor, relevance: Tensor, order: Tensor,
                            ks: Sequence[int]) -> tuple[Tensor, Tensor]:
    """How well what fires agrees with what matters, for the top-k neurons: (mse, smape), (N, K).

    activation, relevance: (N, C) neuron totals; both restricted to the top-k neurons and each
    divided by its own sum of absolute values.
    """
    f = activation.gather(1, order)
    r = relevance.gather(1, order)
    mses, smapes = [], []
    for k in ks:
        fk, rk = _l1_normalized(f[:, :k]), _l1_normalized(r[:, :k])
        mses.append(mse(fk, rk))
        smapes.append(smape(fk, rk))
    return torch.stack(mses, 1), torch.stack(smapes, 1)


def choose_k(ks: Sequence[int], scores: Tensor, target: float) -> Tensor:
    """(N, K) scores (lower is better) -> (N,) index of the smallest k reaching ``target``, else the largest."""
    reached = scores <= target
    first = reached.float().argmax(1)
    return torch.where(reached.any(1), first, torch.full_like(first, len(ks) - 1))


@dataclass
class Sweep:
    """The k sweep at one layer for a batch of N images.

    order: (N, C) neurons by relevance; relevance/activation: (N, C) neuron totals; ks: the
    sweep (each clipped to C); heatmaps: (N, K, 3, H, W) restricted heatmaps; scores[variant]:
    (mse (N, K), smape (N, K)); chosen: (N,) index into ks of k*.
    """

    layer: str
    ks: list[int]
    order: Tensor
    relevance: Tensor
    activation: Tensor
    heatmaps: Tensor
    scores: dict[str, tuple[Tensor, Tensor]]
    chosen: Tensor

    @property
    def chosen_k(self) -> Tensor:
        return torch.as_tensor(self.ks, device=self.chosen.device)[self.chosen]


def sweep(explainer: Explainer, record: ForwardRecord, full_heatmap: Tensor, layer_relevance: Tensor,
          layer: str, ks: Sequence[int], metric: str = "smape", target: float = 50.0,
          absolute: bool = False) -> Sweep:
    """Restrict ``layer`` to its top-k neurons for every k and score against the full heatmap.

    full_heatmap: (N, 3, H, W); layer_relevance: (N, C, ...) relevance at the layer's output from
    the full backward pass. All k < C go down as one (N, K, ...) batch from this layer; k >= C is
    the full heatmap itself.
    """
    if metric not in ("smape", "mse"):
        raise ValueError(f"metric must be 'smape' or 'mse', got {metric!r}")
    name = explainer.resolve(layer)
    relevance = neuron_totals(layer_relevance)
    activation = neuron_totals(record.activations[name])
    c = relevance.shape[1]
    ks = sorted({min(int(k), c) for k in ks})
    order = rank_neurons(relevance, absolute)
    partial = [k for k in ks if k < c]
    heatmaps = full_heatmap.unsqueeze(1).expand(-1, len(ks), *full_heatmap.shape[1:]).clone()
    if partial:
        masks = top_k_masks(order, partial)
        seed = layer_relevance.unsqueeze(1) * masks.reshape(*masks.shape, *([1] * (layer_relevance.ndim - 2)))
        heatmaps[:, :len(partial)] = explainer.propagate(record, seed, start=name)[0]
    scores = {"fidelity": fidelity_scores(full_heatmap, heatmaps),
              "forward_backward": forward_backward_scores(activation, relevance, order, ks)}
    chosen = choose_k(ks, scores["fidelity"][1 if metric == "smape" else 0], target)
    return Sweep(name, ks, order, relevance, activation, heatmaps, scores, chosen)

"""Faithfulness of a heatmap: region perturbation (Samek et al. 2017), batched.

A heatmap is faithful when removing what it calls relevant hurts the prediction most. Region
perturbation cuts the image into p x p patches on a regular grid, scores each patch by the summed
attribution inside it, and replaces patches by a baseline in three orders: most relevant first
(MoRF), least relevant first (LeRF) and a seeded random order. After each step the target's
logit and softmax probability are recorded; the area over the MoRF curve (AOPC) is large for a
faithful heatmap, and the random order's AOPC is the bar it has to clear.

Every perturbed copy of every image (images x orders x steps) goes through the model in a few
large batched forwards, not one forward per image and step as Quantus's loop does.

Conventions (all stated once here, referred to by the docstrings):

- **Grid.** H and W are padded to multiples of p, the padding split as Quantus splits it
  (``floor(t / 2)`` before, ``ceil(t / 2)`` after, t = (p - H mod p) mod p); patches are the
  ``gh x gw`` cells of the padded grid, numbered row-major (index = row * gw + column). A border
  patch may cover fewer than p x p pixels: its padded part carries no attribution and is not
  part of the image.
- **Score** of a patch: the sum of the attribution over its pixels and all channels, in float64.
- **Orders.** ``morf``: scores descending; ``lerf``: ascending; both with a *stable* sort, so
  equal scores go to the lower patch index first, in both orders. ``random``: for image n,
  ``torch.randperm(n_patches, generator=torch.Generator().manual_seed(seed_n))`` with ``seed_n``
  = ``seed`` (an int: the same permutation for every image) or ``seed[n]`` (a per-image tensor,
  e.g. dataset indices). Either way it depends on nothing but the seed and the grid, never on
  the batch the image sits in.
- **Steps.** ``T = round(fraction * n_patches)`` patches are removed in ``steps`` steps; after step
  k (k = 0..steps) the first ``c_k = round(k * T / steps)`` patches of the order are removed
  (round half up, integer arithmetic). So each step removes ``T / steps`` patches rounded, the
  last step reaches exactly T, and consecutive steps differ by at most one patch. T < steps is
  refused (a step would remove nothing).
- **Removal** replaces all channels of a patch by ``baseline`` in the model's normalised input
  space: 0 is the normalisation mean (mid grey for ImageNet statistics).
- **AOPC** per image and order, on the target *logit*: ``mean_{k=1..L} (f(x_0) - f(x_k))`` with L =
  ``steps``. Samek et al. divide the same sum by L + 1 (their k = 0 term is zero):
  AOPC_Samek = L / (L + 1) * AOPC here. ``PerturbationCurves.aopc_of(order, "prob")`` gives it on
  the softmax probability.

Relation to Quantus 0.6 ``RegionPerturbation``: the same grid, padding, patch scores and MoRF/LeRF
orders (Quantus sorts with numpy's unstable argsort, so only ties may be ordered differently);
Quantus removes one patch per step, and its returned curve is ``f(x_0) - f(x_m)`` after m = 1..
``regions_evaluation`` patches, on the softmax probability by default (``softmax=False``: the
logit). Our step k equals Quantus's entry m = c_k. Quantus computes no AOPC for this metric (its
``get_auc_score`` is the mean trapezoid area under those curves); its random order comes from
numpy's global generator and is not reproducible per image. Its default baseline ``"black"`` is
each image's minimum over all channels, not 0.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

Tensor = torch.Tensor

ORDERS = ("morf", "lerf", "random")

# Perturbed copies per forward are chosen so the widest layer output (in and out) of a batch of
# copies stays under this many bytes. On a CPU large fresh tensors fall out of the caches and
# cost page faults (the same reasoning and number as Explainer.cpu_chunk); on an accelerator
# bigger batches keep it busy.
CPU_BUDGET_BYTES = 64 << 20
ACCELERATOR_BUDGET_BYTES = 2 << 30


@dataclass
class PerturbationCurves:
    """What ``region_perturbation`` measured, for N images and each order.

    fractions: (steps+1,) fraction of the patches removed after each step (0 at step 0).
    removed: (steps+1,) int64, the patches removed after each step, ``c_k``.
    logits[order], probs[order]: (N, steps+1) target logit / softmax probability after each
    step; column 0 is the unperturbed image (the same for every order).
    aopc[order]: (N,) mean over k = 1..steps of ``logits[:, 0] - logits[:, k]``.
    patch_order[order]: (N, n_patches) int64, patch indices in removal order.
    target: (N,) int64 classes. patch_size: p. grid: (gh, gw); n_patches = gh * gw.
    """

    fractions: Tensor
    removed: Tensor
    logits: dict[str, Tensor]
    probs: dict[str, Tensor]
    aopc: dict[str, Tensor]
    patch_order: dict[str, Tensor]
    target: Tensor
    patch_size: int
    grid: tuple[int, int]

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def drop(self, order: str, on: str = "logit") -> Tensor:
        """(N, steps): ``f(x_0) - f(x_k)`` for k = 1..steps, on ``"logit"`` or ``"prob"``; the
        form Quantus returns (there one column per removed patch)."""
        curve = self._curve(order, on)
        return curve[:, :1] - curve[:, 1:]

    def aopc_of(self, order: str, on: str = "logit") -> Tensor:
        """(N,) AOPC of one order on the logit (= ``aopc[order]``) or the probability."""
        return self.drop(order, on).mean(1)

    def _curve(self, order: str, on: str) -> Tensor:
        if on not in ("logit", "prob"):
            raise ValueError(f"on must be 'logit' or 'prob', got {on!r}")
        return (self.logits if on == "logit" else self.probs)[order]


def default_patch_size(side: int) -> int:
    """The default patch side p for an image side: ``max(1, side // 28)`` (8 at 224 px, 1 at 32 px)."""
    return max(1, side // 28)


def check_settings(side: int, patch_size: int | None, steps: int, fraction: float) -> None:
    """Raise ValueError when region perturbation cannot run on square images of ``side`` pixels
    with these settings (fewer patches to remove than steps), before any image is perturbed."""
    p = default_patch_size(side) if patch_size is None else patch_size
    cells = -(-side // p)  # the padded grid's side
    removal_counts(cells * cells, steps, fraction)


def padding(size: int, patch_size: int) -> tuple[int, int]:
    """(before, after) padding that makes ``size`` a multiple of ``patch_size``, split as
    Quantus's ``get_padding_size`` splits it (the odd pixel after)."""
    total = (patch_size - size % patch_size) % patch_size
    return total // 2, total - total // 2


def patch_scores(attributions: Tensor, patch_size: int) -> Tensor:
    """(N, gh * gw) float64: summed attribution per patch, row-major; attributions (N, C, H, W)."""
    n, _, h, w = attributions.shape
    (top, bottom), (left, right) = padding(h, patch_size), padding(w, patch_size)
    summed = attributions.double().sum(1)  # patches span all channels
    summed = nn.functional.pad(summed, (left, right, top, bottom))  # padded pixels carry nothing
    gh, gw = summed.shape[1] // patch_size, summed.shape[2] // patch_size
    return summed.reshape(n, gh, patch_size, gw, patch_size).sum((2, 4)).reshape(n, gh * gw)


def removal_counts(n_patches: int, steps: int, fraction: float) -> Tensor:
    """(steps+1,) int64: ``c_k = round(k * T / steps)``, T = ``round(fraction * n_patches)``, both
    rounded half up with integer arithmetic (no float ties at .5)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    total = int(fraction * n_patches + 0.5)
    if total < steps:
        raise ValueError(f"{steps} steps cannot remove {total} patches (fraction {fraction} of {n_patches}) "
                         "at least one per step: use fewer steps, a larger fraction or smaller patches")
    return torch.tensor([(2 * k * total + steps) // (2 * steps) for k in range(steps + 1)], dtype=torch.int64)


def patch_orders(scores: Tensor, orders: Sequence[str], seed: int | Tensor) -> dict[str, Tensor]:
    """{order: (N, n_patches) int64 patch indices in removal order} (conventions in the module doc)."""
    n, n_patches = scores.shape
    result = {}
    for order in orders:
        if order == "morf":
            result[order] = torch.sort(scores, dim=1, descending=True, stable=True).indices
        elif order == "lerf":
            result[order] = torch.sort(scores, dim=1, stable=True).indices
        elif order == "random":
            seeds = _per_image_seeds(seed, n)
            # one generator per image, seeded by that image's seed only: the permutation does not
            # depend on the batch, the position in it or the other images
            result[order] = torch.stack([torch.randperm(n_patches, generator=torch.Generator().manual_seed(s))
                                         for s in seeds]).to(scores.device)
        else:
            raise ValueError(f"unknown order {order!r}: choose from {', '.join(ORDERS)}")
    return result


def _per_image_seeds(seed: int | Tensor, n: int) -> list[int]:
    if isinstance(seed, int):
        return [seed] * n
    seeds = torch.as_tensor(seed).reshape(-1).tolist()
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} images")
    return [int(s) for s in seeds]


def _as_attributions(attributions: Tensor, x: Tensor) -> Tensor:
    """(N, C', H, W) from (N, H, W), (N, 1, H, W) or (N, C, H, W)."""
    a = attributions.unsqueeze(1) if attributions.ndim == 3 else attributions
    if a.ndim != 4 or a.shape[0] != x.shape[0] or a.shape[2:] != x.shape[2:]:
        raise ValueError(f"attributions of shape {tuple(attributions.shape)} do not fit images {tuple(x.shape)}")
    return a


def _targets(target, logits: Tensor) -> Tensor:
    n, classes = logits.shape
    if target is None:
        return logits.argmax(1)
    target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if target.numel() == 1:
        target = target.expand(n)
    if target.numel() != n or (target < 0).any() or (target >= classes).any():
        raise ValueError(f"target must be one class or {n} classes in [0, {classes})")
    return target.clone()


def _model_device_dtype(model: nn.Module, x: Tensor) -> tuple[torch.device, torch.dtype]:
    """Where and in which float type the model computes (its first parameter's); float32 on x's
    device for a model without parameters."""
    parameter = next(model.parameters(), None)
    return (parameter.device, parameter.dtype) if parameter is not None else (x.device, torch.float32)


@torch.no_grad()
def copies_per_forward(model: nn.Module, image: Tensor, budget_bytes: int | None = None) -> int:
    """Perturbed copies per forward: how many keep the widest layer (input plus output) under
    ``budget_bytes`` (default ``CPU_BUDGET_BYTES`` on a CPU, ``ACCELERATOR_BUDGET_BYTES`` else).

    image: (1, C, H, W). Measured with one forward of that image, hooks on every leaf module.
    """
    if budget_bytes is None:
        budget_bytes = CPU_BUDGET_BYTES if image.device.type == "cpu" else ACCELERATOR_BUDGET_BYTES
    widest = [image.numel()]

    def record(module, inputs, output):
        if isinstance(output, Tensor):
            widest[0] = max(widest[0], output.numel() + sum(t.numel() for t in inputs if isinstance(t, Tensor)))

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        model(image)
    finally:
        for handle in handles:
            handle.remove()
    per_copy = (widest[0] + image.numel()) * image.element_size()  # plus the copy itself
    return max(1, budget_bytes // per_copy)


@torch.no_grad()
def region_perturbation(model: nn.Module, x: Tensor, attributions: Tensor, target=None,
                        patch_size: int | None = None, steps: int = 10, fraction: float = 0.5,
                        baseline: float | Tensor = 0.0, orders: Sequence[str] = ORDERS,
                        seed: int | Tensor = 0, batch_size: int | None = None,
                        budget_bytes: int | None = None) -> PerturbationCurves:
    """Region perturbation curves and AOPC (conventions in the module docstring).

    model: a classifier in eval mode, (B, C, H, W) -> (B, K) logits. x: (N, C, H, W) normalised
    model input, moved to the model's device and float type (the curves come back in that type).
    attributions: (N, C, H, W), (N, 1, H, W) or (N, H, W) (already summed over colour). target:
    (N,) classes, one int, or None for the prediction on x. patch_size: p, default
    ``max(1, H // 28)`` (8 at 224 px, 1 at 32 px). baseline: a float or a tensor broadcastable to
    (C, H, W) (e.g. (C, 1, 1) per channel) or of shape (N, C, H, W). seed: int or (N,) per-image
    seeds of the random order (an int gives every image the same permutation; pass e.g. dataset
    indices for independent ones). batch_size: copies per forward; default from
    ``copies_per_forward`` and ``budget_bytes``.

    All N * len(orders) * steps perturbed copies (and the N originals) run in forwards of
    ``batch_size`` copies; masks and copies are built per forward, so memory stays bounded.
    """
    if model.training:
        raise ValueError("put the model in eval mode: dropout would make the curves random")
    if x.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    orders = tuple(orders)
    if not orders or len(set(orders)) != len(orders):
        raise ValueError(f"orders must be distinct names from {ORDERS}, got {orders}")
    device, dtype = _model_device_dtype(model, x)
    x = x.to(device, dtype)
    a = _as_attributions(attributions, x).to(device)
    n, channels, h, w = x.shape
    p = default_patch_size(h) if patch_size is None else int(patch_size)
    if p < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")

    scores = patch_scores(a, p)
    (top, _), (left, _) = padding(h, p), padding(w, p)
    gh, gw = (h + sum(padding(h, p))) // p, (w + sum(padding(w, p))) // p
    counts = removal_counts(gh * gw, steps, fraction)
    ordering = patch_orders(scores, orders, seed)
    # rank[n, o, patch] = position of the patch in order o; the copy of step k removes rank < c_k
    ranks = torch.empty(n, len(orders), gh * gw, dtype=torch.int64, device=device)
    for o, order in enumerate(orders):
        ranks[:, o].scatter_(1, ordering[order], torch.arange(gh * gw, device=device).expand(n, -1))

    base = torch.as_tensor(baseline, dtype=x.dtype, device=device)
    per_image_base = base.ndim == 4
    if per_image_base and base.shape[0] != n:
        raise ValueError(f"a 4-d baseline needs {n} images, got shape {tuple(base.shape)}")

    if batch_size is None:
        batch_size = copies_per_forward(model, x[:1], budget_bytes)
    batch_size = max(1, int(batch_size))

    # step 0: the unperturbed images, in the same chunks as the copies
    original = torch.cat([model(x[i:i + batch_size]) for i in range(0, n, batch_size)])
    target = _targets(target, original)
    rows = torch.arange(n, device=device)
    logit0, prob0 = original[rows, target], original.softmax(1)[rows, target]

    # the copies, flattened as (image, order, step) with the step fastest
    total = n * len(orders) * steps
    logit_steps = torch.empty(total, dtype=original.dtype, device=device)
    prob_steps = torch.empty(total, dtype=original.dtype, device=device)
    image_of = torch.arange(n, device=device).repeat_interleave(len(orders) * steps)
    order_of = torch.arange(len(orders), device=device).repeat_interleave(steps).repeat(n)
    count_of = counts[1:].to(device).repeat(n * len(orders))
    for start in range(0, total, batch_size):
        index = slice(start, min(start + batch_size, total))
        images, which, removed = image_of[index], order_of[index], count_of[index]
        cells = (ranks[images, which] < removed[:, None]).reshape(-1, 1, gh, gw)
        mask = cells.repeat_interleave(p, 2).repeat_interleave(p, 3)[:, :, top:top + h, left:left + w]
        fill = base[images] if per_image_base else base
        copies = torch.where(mask, fill, x[images])
        logits = model(copies)
        chosen = target[images]
        logit_steps[index] = logits.gather(1, chosen[:, None])[:, 0]
        prob_steps[index] = logits.softmax(1).gather(1, chosen[:, None])[:, 0]

    logit_steps = logit_steps.reshape(n, len(orders), steps)
    prob_steps = prob_steps.reshape(n, len(orders), steps)
    logit_curves, prob_curves, aopc = {}, {}, {}
    for o, order in enumerate(orders):
        logit_curves[order] = torch.cat([logit0[:, None], logit_steps[:, o]], 1)
        prob_curves[order] = torch.cat([prob0[:, None], prob_steps[:, o]], 1)
        aopc[order] = (logit0[:, None] - logit_steps[:, o]).mean(1)
    return PerturbationCurves(fractions=counts.double() / (gh * gw), removed=counts, logits=logit_curves,
                              probs=prob_curves, aopc=aopc, patch_order=ordering, target=target,
                              patch_size=p, grid=(gh, gw))

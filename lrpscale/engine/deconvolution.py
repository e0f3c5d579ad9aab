"""Zeiler-Fergus deconvolution: what a selected neuron sees, projected down to the input.

Start from one channel's feature map (mode ``all``) or only its strongest activation (mode
``max``) at the output of the layer's ReLU, then walk down: ReLU on the signal, transposed
convolution with the layer's own filters (no bias), max-unpooling with the forward switches.
This equals the gradient of zennit's ``DeconvNet`` composite started from the same masked
feature map. Batched like LRP: (N, J) neurons per call, one forward pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrpscale.engine import rules
from lrpscale.engine.explainer import Explainer, ForwardRecord

Tensor = torch.Tensor
MODES = ("all", "max")


def seed_feature_maps(activation: Tensor, channels: Tensor, mode: str) -> Tensor:
    """(N, C, h, w) activations and (N, J) channels -> (N, J, C, h, w) masked feature maps."""
    if mode not in MODES:
        raise ValueError(f"deconvolution mode must be one of {MODES}, got {mode!r}")
    n, c, h, w = activation.shape
    j = channels.shape[1]
    chosen = activation.gather(1, channels.reshape(n, j, 1, 1).expand(n, j, h, w))  # (N, J, h, w)
    if mode == "max":
        flat = chosen.flatten(2)
        keep = torch.zeros_like(flat).scatter_(2, flat.argmax(2, keepdim=True), 1.0)
        chosen = (flat * keep).view(n, j, h, w)
    seed = activation.new_zeros(n, j, c, h, w)
    seed.scatter_(2, channels.reshape(n, j, 1, 1, 1).expand(n, j, 1, h, w), chosen.unsqueeze(2))
    return seed


@torch.no_grad()
def deconvolve_many(explainer: Explainer, record: ForwardRecord, layer: str, channels: Tensor,
                    mode: str = "all") -> Tensor:
    """Reconstructions of J channels per image at a conv layer: (N, J) -> (N, J, 3, H, W)."""
    name = explainer.resolve(layer)
    step_index = next(i for i, s in enumerate(explainer.steps) if s.name == name)
    if not isinstance(explainer.steps[step_index].rule.module, nn.Conv2d):
        raise ValueError(f"deconvolution needs a conv layer; {layer} ({name}) is a linear layer")
    channels = torch.as_tensor(channels, device=record.logits.device).long()
    signal = seed_feature_maps(record.activations[name], channels, mode)
    for i in range(step_index, -1, -1):
        rule = explainer.steps[i].rule
        if isinstance(rule, rules.AffineRule):
            signal = rule.transpose(signal, rule.weight, record.ctx[i]["x"].shape[1:])
        elif isinstance(rule, rules.WinnerTakesAll):
            signal = rule.backward(signal, record.ctx[i])  # unpooling with the forward switches
        elif isinstance(rule, rules.Pass) and rule.relu:
            signal = F.relu(signal)
    # the ReLU right after the layer also acts on the seed; it is non-negative, so nothing changes
    return signal


def deconvolve(model: nn.Module | Explainer, x: Tensor, layer: str, channel: int, mode: str = "all") -> Tensor:
    """Zeiler-Fergus reconstruction (N, 3, H, W) of one channel of a conv layer, for images x (N, 3, H, W)."""
    explainer = model if isinstance(model, Explainer) else Explainer(model)
    record = explainer.forward(x)
    channels = torch.full((x.shape[0], 1), int(channel), device=record.logits.device)
    return deconvolve_many(explainer, record, layer, channels, mode)[:, 0]

"""Random-weight VGG helpers for the tests."""
from __future__ import annotations

import torch


def randomize_batchnorm(model: torch.nn.Module, eps: float = 0.0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics so folding is really exercised.

    eps = 0 because zennit's canonizer leaves the BatchNorm computing x / sqrt(1 + eps) after
    merging; with eps = 0 that is exactly the identity and both sides compute the same function.
    """
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_((torch.rand(c, generator=generator) - 0.5) * 0.4)
            module.eps = eps
    return model


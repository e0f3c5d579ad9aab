"""Shared fixtures: random-weight VGG models saved to files and loaded the way users load weights."""
from __future__ import annotations

import pytest
import torch

from lrpscale.models import build_vgg, load_model


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


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """Write random weights for a model name and seed to a file; returns the path."""
    root = tmp_path_factory.mktemp("weights")

    def write(name: str, seed: int = 0, num_classes: int = 1000):
        path = root / f"{name}-{seed}-{num_classes}.pth"
        if not path.exists():
            torch.manual_seed(seed)
            model = randomize_batchnorm(build_vgg(name, num_classes)) if name.endswith("_bn") else build_vgg(
                name, num_classes)
            torch.save(model.state_dict(), path)
        return path

    return write


@pytest.fixture(scope="session")
def vgg16(weights_file):
    return load_model("vgg16", weights_file("vgg16"))

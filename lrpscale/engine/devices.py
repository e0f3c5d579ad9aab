"""Naming the device to analyse on: "auto" (a GPU when there is one), "cpu", "cuda", "cuda:1", ...
One place, so every command that takes ``--device`` accepts and refuses the same names."""
from __future__ import annotations

import torch


def torch_device(name: str) -> torch.device:
    """``name`` as a torch.device; ValueError naming it for a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}: {error}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {name}: no such CUDA device here; use cpu or auto")
    return device

"""scikit-learn's digits written as PNG files in class folders, the way users lay out a dataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digits(folder: Path, indices) -> set[str]:
    """Write digits ``indices`` as ``folder/<class>/<index>.png``; returns their image ids."""
    digits = load_digits()
    for i in indices:
        (folder / str(digits.target[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).save(
            folder / str(digits.target[i]) / f"{i:04d}.png")
    return {f"{digits.target[i]}/{i:04d}.png" for i in indices}

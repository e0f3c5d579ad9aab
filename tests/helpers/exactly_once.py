"""The exactly-once check of a run directory, shared by the pipeline and cluster tests."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def assert_exactly_once(run_dir: Path, expected_ids: set[str]) -> None:
    """Every expected image is in ``images`` or ``errors`` exactly once, and each derived table holds
    one analysis' worth of rows per image."""
    images = pd.read_parquet(run_dir / "images")
    errors = pd.read_parquet(run_dir / "errors")
    ids = list(images.image_id) + list(errors.image_id)
    assert len(ids) == len(set(ids)), "an image appears twice"
    assert set(ids) == expected_ids
    for table in ("neurons", "scores", "edges", "deconv"):
        frame = pd.read_parquet(run_dir / table)
        assert set(frame.image_id) <= set(images.image_id)
    # per image, each derived table holds exactly one analysis' worth of rows
    scores = pd.read_parquet(run_dir / "scores")
    per_image = scores.groupby("image_id").size()
    assert per_image.nunique() == 1

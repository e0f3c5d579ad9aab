"""The exactly-once check of a run, shared by the pipeline, cluster and object-storage tests."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def assert_exactly_once(run: Path | str, expected_ids: set[str]) -> None:
    """Every expected image is in ``images`` or ``errors`` exactly once, and each derived table holds
    one analysis' worth of rows per image. The tables are read plainly (``pandas.read_parquet`` of
    the table folder, a local path or an ``s3://`` URI, which pandas reads through pyarrow), so
    this also checks that a finished run's folders hold only committed files."""

    def table(name: str) -> pd.DataFrame:
        return pd.read_parquet(run / name if isinstance(run, Path) else f"{run.rstrip('/')}/{name}")

    images = table("images")
    errors = table("errors")
    ids = list(images.image_id) + list(errors.image_id)
    assert len(ids) == len(set(ids)), "an image appears twice"
    assert set(ids) == expected_ids
    for name in ("neurons", "scores", "edges", "deconv", "faithfulness"):
        assert set(table(name).image_id) <= set(images.image_id)
    # per image, each derived table holds exactly one analysis' worth of rows
    per_image = table("scores").groupby("image_id").size()
    assert per_image.nunique() == 1

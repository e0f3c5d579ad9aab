"""Scheduled re-analysis: analyse only what changed since the last run under an output root.

Runs live side by side as ``ROOT/<run_id>/``; the run id is derived from the model weights,
the analysis configuration, the schema and the lrpscale version (``pipeline.run_id_for``).

- Same model and configuration as an existing run: the images that appeared in the input since
  are listed into that run as new shards and analysed, each exactly once (the pipeline's
  per-shard commits); images it already holds are not touched.
- A new model or configuration: a new run next to the others, then a comparison with the run
  that was the latest before, written into the new run as ``compare-<previous run id>/``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.fs as pafs

from lrpscale.config import RunConfig
from lrpscale.engine.models import load_model
from lrpscale.locations import child, fetched, is_uri, name_of
from lrpscale.results.comparison import Comparison, compare_runs
from lrpscale.results.reducer import reduce_run
from lrpscale.run.audit import RunSummary, fingerprint, run_audit, run_id_for
from lrpscale.storage.store import CLASSES, COMPARE_PREFIX, RunStore

log = logging.getLogger(__name__)


@dataclass
class Reanalysis:
    """What a re-analysis did: ``action`` is "new-run", "new-images" or "unchanged"."""

    action: str
    run: Path | str
    previous: Path | str | None
    summary: RunSummary
    comparison: Comparison | None = None
    comparison_dir: Path | str | None = None
    reduced: bool = False  # the reducer ran on the run now (so its pictures are out of date)


def runs_under(root: str | Path) -> list[Path | str]:
    """The runs directly under ``root`` (a folder or a URI), oldest first (by when each was
    created): Paths for a local root, URIs for one on a store."""
    runs = []
    for name in _folders(root):
        info = RunStore(child(root, name)).read_json()
        if info is not None:
            runs.append((info.get("created", 0.0), name, child(root, name)))
    return [location for _, _, location in sorted(runs)]


def _folders(root: str | Path) -> list[str]:
    """The names of the folders directly under ``root`` (none when it does not exist)."""
    store = RunStore(root)
    return [entry.base_name for entry in store.entries() if entry.type == pafs.FileType.Directory]


def run_id_of(config: RunConfig) -> str:
    """The id the run of ``config`` gets (loads the model to hash its weights)."""
    model = load_model(config.model, fetched(config.weights))
    size = config.image_size or model.lrpscale_image_size
    return run_id_for(fingerprint(replace(config, image_size=size), model.lrpscale_model_id))


def reanalyze(config: RunConfig, root: str | Path, address: str | None = None, progress: bool = True) -> Reanalysis:
    """Bring ``root`` up to date with ``config.input`` and ``config``'s model (``config.output`` is
    ignored). The run is reduced when it changed (``Reanalysis.reduced``); pictures are the
    caller's (``lrpscale.report.class_pictures``)."""
    root = root if is_uri(root) else Path(root)
    target = child(root, run_id_of(config))
    existing = runs_under(root)
    # the run to compare with: the newest one created before the target (a resumed new run included)
    before = existing[:existing.index(target)] if target in existing else existing
    is_new = target not in existing
    summary = run_audit(replace(config, output=str(target)), address=address, progress=progress,
                        new_inputs=not is_new)
    changed = bool(summary.analysed_now)
    reduced = changed or not RunStore(target).is_dir(CLASSES)
    if reduced:
        reduce_run(target)
    action = "new-run" if is_new else ("new-images" if changed else "unchanged")
    result = Reanalysis(action, target, before[-1] if before else None, summary, reduced=reduced)
    previous_id = name_of(result.previous) if result.previous else None
    comparison_dir = child(target, f"{COMPARE_PREFIX}{previous_id}") if previous_id else None
    if comparison_dir is not None and (changed or not RunStore(comparison_dir).is_dir()):
        result.comparison = compare_runs(result.previous, target)
        result.comparison_dir = result.comparison.write(comparison_dir)
        log.info("%s", result.comparison.text())
    return result


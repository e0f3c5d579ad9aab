"""How an audit reports where it stands: a ``Progress`` per batch of results reaching the driver,
handed to a callback; ``log_progress`` logs a line every few seconds; ``gather`` waits for Ray
tasks and logs how many are done. Imports no torch, so the command line can set up its display
before anything heavy loads."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("lrpscale.run")
PROGRESS_SECONDS = 5.0  # ``gather`` logs a line at most this often, and one at the end


@dataclass
class Progress:
    """Where an audit stands: images done of the total (committed before this start included),
    errors among them, and the rate of this start."""

    done: int
    total: int
    errors: int
    images_per_second: float


ProgressCallback = Callable[[Progress], None]


class Meter:
    """Counts results as they reach the driver and hands a ``Progress`` to ``report``."""

    def __init__(self, total: int, already: int, report: ProgressCallback | None):
        self.total, self.done, self.errors, self.now = total, already, 0, 0
        self.start = time.time()
        self.report = report

    def update(self, rows: int, errors: int) -> None:
        self.done += rows
        self.now += rows
        self.errors += errors
        if self.report:
            rate = self.now / max(time.time() - self.start, 1e-9)
            self.report(Progress(self.done, self.total, self.errors, rate))


def log_progress(every: float = 5.0) -> ProgressCallback:
    """A progress callback that logs one line every ``every`` seconds, and the last one."""
    last = [0.0]

    def report(progress: Progress) -> None:
        if time.time() - last[0] >= every or progress.done >= progress.total:
            last[0] = time.time()
            log.info("%d/%d images (%.0f%%), %.1f img/s, %d errors", progress.done, progress.total,
                     100 * progress.done / max(progress.total, 1), progress.images_per_second, progress.errors)

    return report


def gather(refs: list, what: str, started: float | None = None) -> list:
    """``ray.get`` of each of ``refs``, in their order, fetched as they finish; logs
    "<what>: <done>/<all>, <seconds> s" (seconds since ``started``, by default the call) at most every
    ``PROGRESS_SECONDS`` and at the end. On an error (or Ctrl-C) the tasks still pending are
    cancelled, so none runs on for nothing."""
    import ray

    started = time.time() if started is None else started
    pending, results, shown = set(refs), {}, time.time()
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=PROGRESS_SECONDS, fetch_local=True)
            for ref in done:
                pending.discard(ref)
                results[ref] = ray.get(ref)
            if not pending or time.time() - shown >= PROGRESS_SECONDS:
                log.info("%s: %d/%d, %.0f s", what, len(results), len(refs), time.time() - started)
                shown = time.time()
    finally:
        for ref in pending:
            ray.cancel(ref)
    return [results[ref] for ref in refs]

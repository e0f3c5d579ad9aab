"""What the command line shows while work goes on: the library's log records as plain lines on
stderr, and an audit's progress as a bar with img/s and errors on a terminal, or as a plain line
every few seconds where the output is a file (CI, Ray job logs)."""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from lrpscale.run.progress import Progress, ProgressCallback, log_progress


def configure_logging(stream: TextIO = sys.stderr, level: int = logging.INFO) -> None:
    """Send the ``lrpscale`` loggers' records to ``stream`` as ``[lrpscale] message`` lines."""
    logger = logging.getLogger("lrpscale")
    if any(getattr(handler, "lrpscale_console", False) for handler in logger.handlers):
        return
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[lrpscale] %(message)s"))
    handler.lrpscale_console = True
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


@contextmanager
def progress_display(stream: TextIO = sys.stderr, every: float = 5.0) -> Iterator[ProgressCallback]:
    """A progress callback for ``run_audit``: a tqdm bar when ``stream`` is a terminal, else one
    plain line every ``every`` seconds and a last one. The bar is closed when the block ends."""
    if stream.isatty():
        from tqdm import tqdm

        bar = None

        def show_bar(progress: Progress) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=progress.total, unit="img", file=stream, dynamic_ncols=True, smoothing=0.1)
            bar.update(progress.done - bar.n)
            bar.set_postfix(errors=progress.errors, refresh=False)

        try:
            yield show_bar
        finally:
            if bar is not None:
                bar.close()
        return

    yield log_progress(every)  # plain lines through the logger: configure_logging prints them

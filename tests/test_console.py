"""What the command line shows during an audit: a progress bar with img/s and errors on a
terminal, plain log lines where the output is a file."""
from __future__ import annotations

import io
import logging

from lrpscale.console import configure_logging, progress_display
from lrpscale.run.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_with_rate_and_errors():
    stream = _Terminal()
    with progress_display(stream) as show:
        for done in (10, 20, 30):
            show(Progress(done, 30, errors=done // 10, images_per_second=12.5))
    text = stream.getvalue()
    assert "30/30" in text and "img/s" in text and "errors=3" in text
    assert "[lrpscale]" not in text


def test_a_file_gets_plain_lines_through_the_logger():
    stream = io.StringIO()
    logger = logging.getLogger("lrpscale")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers = []
    try:
        configure_logging(stream)
        with progress_display(io.StringIO(), every=3600) as show:
            show(Progress(5, 30, errors=0, images_per_second=2.0))   # the first line is shown
            show(Progress(10, 30, errors=1, images_per_second=2.0))  # within the hour: not shown
            show(Progress(30, 30, errors=2, images_per_second=3.0))  # the last one always is
    finally:
        logger.handlers, logger.level, logger.propagate = saved
    lines = stream.getvalue().splitlines()
    assert lines == ["[lrpscale] 5/30 images (17%), 2.0 img/s, 0 errors",
                     "[lrpscale] 30/30 images (100%), 3.0 img/s, 2 errors"]

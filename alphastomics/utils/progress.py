"""Progress display of long loops: a tqdm bar on a terminal, a line a minute in logs or pipes."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 60.0  # where stderr is not a terminal: at most one progress line this often


def on_terminal() -> bool:
    """True when stderr is a terminal: a bar there; in a file or pipe every redraw is kept."""
    return sys.stderr.isatty()


class Throttle:
    """:meth:`due` is True at most once per ``interval_s`` seconds (measured from creation)."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.start = self.last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            return False
        self.last = now
        return True

    @property
    def minutes(self) -> float:
        """Minutes from creation to the last time :meth:`due` was True."""
        return (self.last - self.start) / 60.0


def progress_bar(pairs: list[tuple[int, int]], description: str) -> Iterable[tuple[int, int]]:
    """The reverse steps ``[(t, s), ...]`` of a sampler, wrapped in a bar that closes itself
    (a :data:`~alphastomics.diffusion_model.sample.Progress`).

    In a log file or pipe a bar would be kept redraw by redraw; there a step that ends at least
    :data:`LOG_INTERVAL_S` after the last line logs ``description: step i/n, m min``.
    """
    if on_terminal():
        return tqdm(pairs, desc=description, leave=False)
    return _logged(pairs, description)


def _logged(pairs: list[tuple[int, int]], description: str) -> Iterator[tuple[int, int]]:
    throttle = Throttle()
    for i, pair in enumerate(pairs, start=1):
        yield pair
        if throttle.due():
            log.info("%s: step %d/%d, %.1f min", description, i, len(pairs), throttle.minutes)

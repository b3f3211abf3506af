"""Progress display of long loops: a tqdm bar on a terminal, a line a minute in logs or pipes."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 60.0  # where stderr is not a terminal: at most one progress line this often


def progress_bar(pairs: list[tuple[int, int]], description: str) -> Iterable[tuple[int, int]]:
    """The reverse steps ``[(t, s), ...]`` of a sampler, wrapped in a bar that closes itself
    (a :data:`~alphastomics.diffusion_model.sample.Progress`).

    In a log file or pipe a bar would be kept redraw by redraw; there a step that ends at least
    :data:`LOG_INTERVAL_S` after the last line logs ``description: step i/n, m min``.
    """
    if sys.stderr.isatty():
        return tqdm(pairs, desc=description, leave=False)
    return _logged(pairs, description)


def _logged(pairs: list[tuple[int, int]], description: str) -> Iterator[tuple[int, int]]:
    start = last = time.monotonic()
    for i, pair in enumerate(pairs, start=1):
        yield pair
        now = time.monotonic()
        if now - last >= LOG_INTERVAL_S:
            last = now
            log.info("%s: step %d/%d, %.1f min", description, i, len(pairs), (now - start) / 60)

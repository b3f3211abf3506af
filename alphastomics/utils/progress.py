"""Progress display of long loops: a tqdm bar on a terminal, nothing in logs or pipes."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm


def progress_bar(pairs: list[tuple[int, int]], description: str) -> Iterable[tuple[int, int]]:
    """The reverse steps ``[(t, s), ...]`` of a sampler, wrapped in a bar that closes itself
    (a :data:`~alphastomics.diffusion_model.sample.Progress`)."""
    return tqdm(pairs, desc=description, disable=None, leave=False)

"""Helpers (atomic file writes, allocator tuning), and the names of the Python API in spec.md §4.

``from alphastomics.utils import create_dataloaders, SpatialDataPreprocessor, EmbeddingExtractor``
is the documented API; those live in :mod:`alphastomics.data` and are looked up on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "DataHolder",
    "EmbeddingExtractor",
    "SpatialDataPreprocessor",
    "create_dataloaders",
]

if TYPE_CHECKING:
    from alphastomics.data.batch import DataHolder
    from alphastomics.data.loader import create_dataloaders
    from alphastomics.data.preprocess import SpatialDataPreprocessor
    from alphastomics.embedding import EmbeddingExtractor

_LOCATIONS = {
    "DataHolder": "alphastomics.data.batch",
    "create_dataloaders": "alphastomics.data.loader",
    "EmbeddingExtractor": "alphastomics.embedding",
    "SpatialDataPreprocessor": "alphastomics.data.preprocess",
}


def __getattr__(name: str) -> Any:
    if name in _LOCATIONS:
        import importlib

        return getattr(importlib.import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'alphastomics.utils' has no attribute {name!r}")

"""Data containers, preprocessing, loading, metrics and embedding extraction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "DataHolder",
    "EmbeddingExtractor",
    "SpatialDataPreprocessor",
    "create_dataloaders",
]

if TYPE_CHECKING:
    from alphastomics.utils.dataholder import DataHolder
    from alphastomics.utils.dataloader import create_dataloaders
    from alphastomics.utils.embedding_extractor import EmbeddingExtractor
    from alphastomics.utils.preprocess import SpatialDataPreprocessor

_LOCATIONS = {
    "DataHolder": "alphastomics.utils.dataholder",
    "create_dataloaders": "alphastomics.utils.dataloader",
    "EmbeddingExtractor": "alphastomics.utils.embedding_extractor",
    "SpatialDataPreprocessor": "alphastomics.utils.preprocess",
}


def __getattr__(name: str) -> Any:
    if name in _LOCATIONS:
        import importlib

        return getattr(importlib.import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'alphastomics.utils' has no attribute {name!r}")

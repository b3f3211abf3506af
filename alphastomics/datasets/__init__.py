"""Generated and bundled data sets."""

from __future__ import annotations

from alphastomics.datasets.synthetic import synthetic_tissue

__all__ = ["synthetic_tissue"]

"""AlphaSTomics: one diffusion model over gene expression and 3D positions of cells."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["AlphaSTomics", "AlphaSTomicsModule", "DiffusionSampler", "__version__"]

if TYPE_CHECKING:
    from alphastomics.diffusion_model.sample import DiffusionSampler
    from alphastomics.model import AlphaSTomics
    from alphastomics.training.module import AlphaSTomicsModule


def __getattr__(name: str) -> Any:
    # Lazy imports keep `alphastomics --help` and preprocessing free of torch start-up cost.
    if name == "AlphaSTomics":
        from alphastomics.model import AlphaSTomics

        return AlphaSTomics
    if name == "AlphaSTomicsModule":
        from alphastomics.training.module import AlphaSTomicsModule

        return AlphaSTomicsModule
    if name == "DiffusionSampler":
        from alphastomics.diffusion_model.sample import DiffusionSampler

        return DiffusionSampler
    raise AttributeError(f"module 'alphastomics' has no attribute {name!r}")

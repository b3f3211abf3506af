"""Units: the user's coordinates and log-normalised expression vs. the model's scaled space.

Positions: ``preprocess`` centres each slice and divides by one scale (the aspect ratio is kept);
:func:`to_model_units` and :func:`to_user_units` are that map and its inverse. Expression: the
model sees each gene standardised by the training split's statistics; :class:`ExpressionScaler`
owns them (they travel in the checkpoint's hyper-parameters, not in its weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from alphastomics.data.batch import apply_mask


def to_model_units(positions: np.ndarray, center: Sequence[float], scale: float) -> np.ndarray:
    """The user's coordinates (N, D) -> centred, scaled float32 (N, D): ``(positions - center) / scale``."""
    centred = np.asarray(positions, dtype=np.float64) - np.asarray(center, dtype=np.float64)
    return (centred / scale).astype(np.float32)


def to_user_units(
    positions: np.ndarray, center: Sequence[float], scale: float, input_dims: int | None = None
) -> np.ndarray:
    """Scaled, centred positions (N, D) -> the user's coordinates (N, input_dims), float64.

    ``positions * scale + center``. A generated layout is only defined up to rotation,
    reflection and translation; this restores the slice's scale and centroid, not an
    orientation. float64, so coordinates with a large offset keep their precision. Columns
    beyond ``input_dims`` (z of a 2D slice in a 3D model) are dropped; ``None`` keeps all.
    """
    user = np.asarray(positions, dtype=np.float64) * scale + np.asarray(center, dtype=np.float64)
    return user if input_dims is None else user[:, :input_dims]


class ExpressionScaler(nn.Module):
    """Per-gene standardisation of log-normalised expression, and its inverse.

    Parameters
    ----------
    num_genes
        G.
    gene_mean, gene_std
        (G,) statistics of the training split; default 0 and 1. ``gene_std`` is floored at 1e-6.
    """

    def __init__(
        self,
        num_genes: int,
        gene_mean: Sequence[float] | None = None,
        gene_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        mean = torch.zeros(num_genes) if gene_mean is None else torch.tensor(gene_mean)
        std = torch.ones(num_genes) if gene_std is None else torch.tensor(gene_std)
        # not in the state dict: the statistics live in the hyper-parameters
        self.register_buffer("mean", mean.float(), persistent=False)
        self.register_buffer("std", std.float().clamp(min=1e-6), persistent=False)

    def standardize(self, expression: Tensor, node_mask: Tensor, gene_mask: Tensor) -> Tensor:
        """Log-normalised (B, N, G) -> model space; unmeasured genes and padded cells are 0."""
        z = (expression - self.mean) / self.std
        return apply_mask(z, node_mask) * gene_mask.unsqueeze(1).to(z.dtype)

    def unstandardize(self, expression: Tensor) -> Tensor:
        """Model space (..., G) -> log-normalised expression."""
        return expression * self.std + self.mean

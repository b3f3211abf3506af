"""`DataHolder`, the one batch container, and the mask convention with its masked operations.

Mask convention: ``node_mask`` is bool with True = real cell. Padded rows are zero in every float
field. Every reduction over cells goes through :func:`masked_mean` / :func:`masked_sum`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum ``x`` (B, N, F) over real cells -> (B, F)."""
    return (x * mask.unsqueeze(-1).to(x.dtype)).sum(dim=1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (B, N, F) over real cells -> (B, F); 0 for a batch item with no cell."""
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)  # (B, 1)
    return masked_sum(x, mask) / count


def center(pos: Tensor, mask: Tensor) -> Tensor:
    """Subtract the masked centroid from ``pos`` (B, N, D); padded rows stay exactly zero."""
    centred = pos - masked_mean(pos, mask).unsqueeze(1)
    return centred * mask.unsqueeze(-1).to(pos.dtype)


def keeps_everything(mask: Tensor) -> bool:
    """True when the bool ``mask`` is known to keep every entry, so masking can be skipped.

    Checked on CPU only: a whole slice has no padded rows (and usually every gene measured), and
    each (B, N, G) copy of a million-cell slice is over a gigabyte; on GPU the check would cost
    a device sync per call, so there it is False and the masking is always done.
    """
    return mask.device.type == "cpu" and bool(mask.all())


def apply_mask(x: Tensor, mask: Tensor) -> Tensor:
    """Zero the padded rows of ``x`` (B, N, F).

    A mask without padding returns ``x`` itself (:func:`keeps_everything`). Treat the result as
    read-only.
    """
    if keeps_everything(mask):
        return x
    return x * mask.unsqueeze(-1).to(x.dtype)


@dataclass(frozen=True)
class DataHolder:
    """A batch of (padded) slices or cell sets.

    Attributes
    ----------
    expression
        (B, N, G) float, normalised expression on the model's gene list.
    positions
        (B, N, D) float, scaled coordinates (D = 3; 2D data has z = 0).
    node_mask
        (B, N) bool, True for a real cell.
    gene_mask
        (B, G) bool, True for a gene the item's slice measured. Defaults to all True.
    noisy_expression, noisy_positions
        (B, N, G) / (B, N, D) noised copies made by ``NoiseModel.apply_noise``.
    t_expression, t_position
        (B,) float diffusion times in [0, 1] of each modality (0 = clean); together they are the
        ``diffusion_time`` of the spec.
    cell_type
        (B, N) long cell-type codes, -1 for unknown or padding.
    cell_index
        (B, N) long row of each cell in its slice, -1 for padding.
    slice_index
        (B,) long index of each item's slice in the processed store's metadata.
    """

    expression: Tensor
    positions: Tensor
    node_mask: Tensor
    gene_mask: Tensor | None = None
    noisy_expression: Tensor | None = None
    noisy_positions: Tensor | None = None
    t_expression: Tensor | None = None
    t_position: Tensor | None = None
    cell_type: Tensor | None = None
    cell_index: Tensor | None = None
    slice_index: Tensor | None = None

    def __post_init__(self) -> None:
        if self.expression.dim() != 3 or self.positions.dim() != 3:
            raise ValueError(
                "DataHolder expects expression (B, N, G) and positions (B, N, D); got "
                f"{tuple(self.expression.shape)} and {tuple(self.positions.shape)}"
            )
        b, n, g = self.expression.shape
        if self.positions.shape[:2] != (b, n) or self.node_mask.shape != (b, n):
            raise ValueError(
                f"shape mismatch: expression {tuple(self.expression.shape)}, positions "
                f"{tuple(self.positions.shape)}, node_mask {tuple(self.node_mask.shape)}"
            )
        if self.node_mask.dtype != torch.bool:
            object.__setattr__(self, "node_mask", self.node_mask.bool())
        if self.gene_mask is None:
            gene_mask = torch.ones(b, g, dtype=torch.bool, device=self.expression.device)
            object.__setattr__(self, "gene_mask", gene_mask)
        elif self.gene_mask.shape != (b, g):
            raise ValueError(f"gene_mask must be {(b, g)}, got {tuple(self.gene_mask.shape)}")

    @classmethod
    def from_arrays(
        cls,
        expression: np.ndarray,
        positions: np.ndarray,
        *,
        gene_mask: np.ndarray | None = None,
        cell_type: np.ndarray | None = None,
        slice_index: int | None = None,
    ) -> DataHolder:
        """A one-item holder (B = 1) from one slice's arrays: expression (N, G), positions (N, D)."""
        n = expression.shape[0]
        return cls(
            expression=torch.from_numpy(np.array(expression, dtype=np.float32))[None],
            positions=torch.from_numpy(np.array(positions, dtype=np.float32))[None],
            node_mask=torch.ones(1, n, dtype=torch.bool),
            gene_mask=None
            if gene_mask is None
            else torch.from_numpy(np.array(gene_mask, bool))[None],
            cell_type=None
            if cell_type is None
            else torch.from_numpy(np.array(cell_type, np.int64))[None],
            cell_index=torch.arange(n)[None],
            slice_index=None if slice_index is None else torch.tensor([slice_index]),
        )

    @property
    def batch_size(self) -> int:
        """Number of items B."""
        return self.expression.shape[0]

    @property
    def n_genes(self) -> int:
        """Number of genes G."""
        return self.expression.shape[2]

    @property
    def n_dims(self) -> int:
        """Number of spatial dimensions D."""
        return self.positions.shape[2]

    def replace(self, **changes: Tensor | None) -> DataHolder:
        """A copy with some fields replaced (the holder itself is never mutated)."""
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> DataHolder:
        """A copy with every tensor moved to ``device`` (Lightning calls this per batch)."""
        changes = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **changes)


def collate_holders(items: Sequence[DataHolder]) -> DataHolder:
    """Pad single-item holders (each B = 1) to the largest N and stack them into one batch.

    Float fields are padded with zeros, ``node_mask`` with False, index fields with -1.
    """
    n_max = max(item.expression.shape[1] for item in items)

    def pad(t: Tensor, value: float) -> Tensor:
        extra = n_max - t.shape[1]
        if extra == 0:
            return t
        shape = (t.shape[0], extra, *t.shape[2:])
        return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], dim=1)

    def stack(name: str, value: float | None) -> Tensor | None:
        tensors = [getattr(item, name) for item in items]
        if any(t is None for t in tensors):
            return None
        if value is None:
            return torch.cat(tensors, dim=0)
        return torch.cat([pad(t, value) for t in tensors], dim=0)

    return DataHolder(
        expression=stack("expression", 0.0),
        positions=stack("positions", 0.0),
        node_mask=stack("node_mask", False),
        gene_mask=stack("gene_mask", None),
        cell_type=stack("cell_type", -1),
        cell_index=stack("cell_index", -1),
        slice_index=stack("slice_index", None),
    )

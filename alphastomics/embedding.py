"""Per-cell embeddings from a trained network, for downstream analysis (clustering, UMAP)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from alphastomics.data.batch import DataHolder

if TYPE_CHECKING:
    from alphastomics.training.module import AlphaSTomicsModule

ExtractMode = Literal["transformer", "expression", "position", "all"]


class EmbeddingExtractor:
    """Run the denoiser on clean data (t = 0 for both modalities) and collect per-cell features.

    Parameters
    ----------
    module
        A trained :class:`AlphaSTomicsModule`.
    mode
        ``transformer`` (final hidden state), ``expression`` / ``position`` (encoder outputs) or
        ``all`` (every one of them).
    """

    def __init__(self, module: AlphaSTomicsModule, mode: ExtractMode = "transformer") -> None:
        if mode not in ("transformer", "expression", "position", "all"):
            raise ValueError(
                f"unknown extract mode {mode!r}; use transformer, expression, position or all"
            )
        self.module = module
        self.mode = mode

    @torch.inference_mode()
    def embed(self, batch: DataHolder) -> dict[str, list[np.ndarray]]:
        """Embeddings of one batch: each key maps to a list of (n_cells_i, H) arrays, one per item."""
        module = self.module
        batch = batch.to(module.device)
        expr = module.scaler.standardize(batch.expression, batch.node_mask, batch.gene_mask)
        zeros = torch.zeros(batch.batch_size, device=module.device)
        out = module.model(expr, batch.positions, zeros, zeros, batch.node_mask, batch.gene_mask)
        fields = {
            "transformer": out.hidden,
            "expression": out.expression_embedding,
            "position": out.position_embedding,
        }
        wanted = fields if self.mode == "all" else {self.mode: fields[self.mode]}
        return {
            f"{name}_embeddings": [
                t[i][batch.node_mask[i]].float().cpu().numpy() for i in range(batch.batch_size)
            ]
            for name, t in wanted.items()
        }

    def extract(self, batches: Iterable[DataHolder]) -> dict[str, np.ndarray]:
        """Concatenate embeddings over all real cells of all batches.

        Returns
        -------
        dict
            ``transformer_embeddings`` / ``expression_embeddings`` / ``position_embeddings``
            (N, H) as asked, plus ``cell_types`` (N,) codes and ``slice_index`` (N,).
        """
        collected: dict[str, list[np.ndarray]] = {}
        cell_types: list[np.ndarray] = []
        slice_index: list[np.ndarray] = []
        for batch in batches:
            for key, arrays in self.embed(batch).items():
                collected.setdefault(key, []).extend(arrays)
            for i in range(batch.batch_size):
                mask = batch.node_mask[i].cpu()
                n = int(mask.sum())
                codes = batch.cell_type[i][mask] if batch.cell_type is not None else None
                cell_types.append(codes.cpu().numpy() if codes is not None else np.full(n, -1))
                idx = int(batch.slice_index[i]) if batch.slice_index is not None else -1
                slice_index.append(np.full(n, idx))
        result = {key: np.concatenate(arrays) for key, arrays in collected.items()}
        result["cell_types"] = np.concatenate(cell_types) if cell_types else np.zeros(0, int)
        result["slice_index"] = np.concatenate(slice_index) if slice_index else np.zeros(0, int)
        return result

"""`ObservationModel`: stored training cells, and measurement-like expression for generated cells.

A joint (virtual-tissue) sample's expression is the denoiser's estimate of each cell's
expression *state*: smooth, varying along a few programmes. Measured cells are not smooth: a
seqFISH or MERFISH cell is mostly exact zeros and counting noise around its state, gene by
gene. This model adds that measurement step, as single-cell generative models do with a
likelihood that is independent across genes given the cell's state, but nonparametrically:
each gene of a generated cell takes the measured value of that gene in one of the ``k``
training cells nearest to the cell's state (PCA of log-normalised expression), drawn
independently per gene. So the state comes from the diffusion and the noise from real
measurements; no generated cell copies a training cell.

The same stored training cells are where joint sampling starts its expression
(:meth:`ObservationModel.starting_states`, noised to ``sampling.expression_start``), which
gives a generated tissue the training data's mix of cell types. ``train`` stores them in the
checkpoint (at most :data:`MAX_CELLS`, and at most :data:`MAX_VALUES` values). A model of one
slice or volume also stores their positions: they are a reference atlas in its frame, which
``pos_to_expr`` reads (:attr:`ObservationModel.atlas`, ``sampling.reference_cells``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

MAX_CELLS = 20_000  # training cells kept for drawing measured values
MAX_VALUES = 10_000_000  # and at most this many values (cells x genes), 40 MB in a checkpoint
N_NEIGHBORS = 15  # training cells a generated cell draws its genes from
N_COMPONENTS = 50  # PCA dimensions of the neighbour search
_CHUNK_VALUES = 4_000_000  # generated cells x genes handled at once
CHECKPOINT_KEY = "alphastomics_observation_model"
_STARTS, _DRAWS = 0, 1  # separate random streams of one seed: starting cells, measured draws


class ObservationModel:
    """Measured training cells, and the draw of measurement-like expression from them.

    Parameters
    ----------
    expression
        (n, G) log-normalised expression of training cells on the model's genes.
    gene_mask
        (n, G) bool, True where the cell's slice measured the gene.
    positions
        (n, D) the cells' positions in the store's units, when the training data is one frame
        (one slice or volume); None otherwise.
    n_training_cells
        How many training cells there were (the stored ones are a random subset beyond the
        caps); None: not recorded.
    """

    def __init__(
        self,
        expression: np.ndarray,
        gene_mask: np.ndarray,
        positions: np.ndarray | None = None,
        n_training_cells: int | None = None,
    ) -> None:
        expression = np.asarray(expression, dtype=np.float32)
        gene_mask = np.asarray(gene_mask, dtype=bool)
        if expression.ndim != 2 or expression.shape != gene_mask.shape or len(expression) < 2:
            raise ValueError(
                f"expected (n, G) expression and gene mask with n >= 2; got {expression.shape} "
                f"and {gene_mask.shape}"
            )
        if positions is not None:
            positions = np.asarray(positions, dtype=np.float32)
            if positions.ndim != 2 or len(positions) != len(expression):
                raise ValueError(
                    f"expected (n, D) positions for {len(expression)} cells; got {positions.shape}"
                )
        self.expression = expression
        self.gene_mask = gene_mask
        self.positions = positions
        self.n_training_cells = n_training_cells
        # (G,) each gene's mean over the cells that measured it: the value of unmeasured genes
        measured = np.where(gene_mask, expression, 0.0).sum(0) / np.maximum(gene_mask.sum(0), 1)
        self._gene_means = measured.astype(np.float32)
        self._search: tuple[PCA, NearestNeighbors] | None = None

    @property
    def n_cells(self) -> int:
        return len(self.expression)

    @cached_property
    def measured_by_all(self) -> np.ndarray:
        """(G,) bool: the genes every stored cell measured."""
        return self.gene_mask.all(axis=0)

    @property
    def atlas(self) -> bool:
        """Whether the stored cells are every training cell of one frame, with positions: a
        complete reference for expression at positions in that frame."""
        return self.positions is not None and self.n_training_cells == self.n_cells

    @classmethod
    def from_slices(
        cls,
        slices: Sequence[tuple[np.ndarray, np.ndarray]],
        seed: int = 0,
        positions: Sequence[np.ndarray] | None = None,
    ) -> ObservationModel | None:
        """The cells of ``slices`` (each (n_i, G) log-normalised expression, array-like such as
        a memory map, and its (G,) measured-gene mask), a random subset beyond
        :data:`MAX_CELLS` or :data:`MAX_VALUES` values; None with fewer than 2 cells.
        ``positions``: each slice's (n_i, D) positions, for training data of one frame."""
        sizes = [len(expression) for expression, _ in slices]
        total = sum(sizes)
        n_genes = int(np.shape(slices[0][0])[1]) if slices else 0
        keep = min(total, MAX_CELLS, max(2, MAX_VALUES // max(n_genes, 1)))
        if keep < 2:
            return None
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(total, size=keep, replace=False))
        starts = np.cumsum([0, *sizes])
        expression, gene_mask, kept_positions = [], [], []
        for k, ((values, measured), start, stop) in enumerate(
            zip(slices, starts[:-1], starts[1:], strict=True)
        ):
            rows = chosen[(chosen >= start) & (chosen < stop)] - start
            if len(rows) == 0:
                continue
            expression.append(np.asarray(values[rows], dtype=np.float32))
            mask = np.asarray(measured, bool)
            gene_mask.append(np.broadcast_to(mask, (len(rows), n_genes)))
            if positions is not None:
                kept_positions.append(np.asarray(positions[k][rows], dtype=np.float32))
        return cls(
            np.concatenate(expression),
            np.concatenate(gene_mask),
            positions=None if positions is None else np.concatenate(kept_positions),
            n_training_cells=total,
        )

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores (tensors, so ``torch.load`` reads it back)."""
        state: dict[str, Any] = {
            "expression": torch.from_numpy(self.expression),
            "gene_mask": torch.from_numpy(self.gene_mask),
        }
        if self.positions is not None:
            state["positions"] = torch.from_numpy(self.positions)
        if self.n_training_cells is not None:
            state["n_training_cells"] = self.n_training_cells
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> ObservationModel | None:
        """The model stored by :meth:`state`; None for a checkpoint without one."""
        if not state:
            return None
        positions = state.get("positions")
        return cls(
            np.asarray(state["expression"], dtype=np.float32),
            np.asarray(state["gene_mask"], dtype=bool),
            positions=None if positions is None else np.asarray(positions, dtype=np.float32),
            n_training_cells=state.get("n_training_cells"),
        )

    def _neighbor_search(self) -> tuple[PCA, NearestNeighbors]:
        if self._search is None:
            filled = self._filled(self.expression, self.gene_mask)
            n_components = max(1, min(N_COMPONENTS, filled.shape[1], self.n_cells - 1))
            pca = PCA(n_components=n_components, random_state=0).fit(filled)
            search = NearestNeighbors(n_neighbors=min(N_NEIGHBORS, self.n_cells))
            self._search = (pca, search.fit(pca.transform(filled)))
        return self._search

    def _filled(self, expression: np.ndarray, gene_mask: np.ndarray) -> np.ndarray:
        """(n, G) ``expression`` with unmeasured values set to the gene's mean where measured."""
        return np.where(gene_mask, expression, self._gene_means)

    def starting_states(self, n_cells: int, seed: int = 0) -> np.ndarray:
        """(n_cells, G) expression of training cells drawn at random (with replacement beyond
        the stored count), unmeasured genes at the gene's mean: where joint sampling starts."""
        rng = np.random.default_rng([seed, _STARTS])
        rows = rng.choice(self.n_cells, size=n_cells, replace=n_cells > self.n_cells)
        return self._filled(self.expression[rows], self.gene_mask[rows])

    def draw(self, states: np.ndarray, seed: int = 0) -> np.ndarray:
        """(N, G) measurement-like expression for cells in the expression ``states`` (N, G).

        Each gene of cell i takes that gene's value in one of the ``k`` training cells
        nearest to ``states[i]``, drawn independently per gene; a gene that the chosen
        training cell did not measure keeps the state's value.
        """
        states = np.asarray(states, dtype=np.float32)
        if states.ndim != 2 or states.shape[1] != self.expression.shape[1]:
            raise ValueError(f"expected (N, {self.expression.shape[1]}) states; got {states.shape}")
        pca, search = self._neighbor_search()
        rng = np.random.default_rng([seed, _DRAWS])
        n_genes = states.shape[1]
        genes = np.arange(n_genes)[None, :]
        out = np.empty_like(states)
        chunk = max(1, _CHUNK_VALUES // max(n_genes, 1))
        for start in range(0, len(states), chunk):
            part = states[start : start + chunk]
            nearest = search.kneighbors(pca.transform(part), return_distance=False)  # (c, k)
            pick = rng.integers(0, nearest.shape[1], size=part.shape)  # (c, G)
            rows = np.take_along_axis(nearest, pick, axis=1)
            measured = self.gene_mask[rows, genes]
            out[start : start + chunk] = np.where(measured, self.expression[rows, genes], part)
        return out

"""Does a generated tissue look like a real one? Statistics that need expression and positions
right together, compared between a real tissue and a candidate (generated, or a baseline).

- composition: 1 − total-variation distance of the cell-type shares;
- neighbourhood enrichment: Pearson correlation of the cell-type pair enrichment z-scores of
  the spatial neighbour graph (:func:`nhood_enrichment`, squidpy's ``gr.nhood_enrichment``
  statistic on its default generic graph, ``gr.spatial_neighbors`` with 6 neighbours);
- spatial autocorrelation: Spearman correlation across genes of Moran's I
  (:func:`alphastomics.evaluation.metrics.morans_i`);
- expression realism: cross-validated ROC AUC of a random forest telling real from candidate
  cells (0.5: indistinguishable).

Cell types of both tissues come from one :class:`CellTypeClassifier`, fitted on training cells,
so a real and a generated tissue are typed the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict, Unpack

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import spearmanr
from sklearn.cluster import KMeans
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from alphastomics.evaluation.metrics import morans_i

__all__ = [
    "CellTypeClassifier",
    "TissueStatistics",
    "compare_tissues",
    "composition_similarity",
    "enrichment_correlation",
    "nhood_enrichment",
    "realism_auc",
    "spatial_neighbors",
    "tissue_statistics",
]

# label-permutation counts held in memory at once (int64 codes), whatever the graph size
_PERMUTATION_CODES = 1 << 22


def _labels(labels: ArrayLike, n_types: int, n: int | None = None) -> np.ndarray:
    codes = np.asarray(labels)
    if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D array of integer type codes; got {codes.dtype}")
    if n is not None and len(codes) != n:
        raise ValueError(f"labels has {len(codes)} entries for {n} cells")
    if len(codes) and (codes.min() < 0 or codes.max() >= n_types):
        raise ValueError(f"labels must be type codes in [0, {n_types}); got {codes.min()}..")
    return codes.astype(np.int64)


def spatial_neighbors(positions: ArrayLike, n_neighbors: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Directed edges (rows, cols) linking each cell to its ``n_neighbors`` nearest cells.

    The graph of squidpy's ``gr.spatial_neighbors(coord_type="generic", n_neighs=6)``: no
    self loops, not symmetrised. ``n_neighbors`` is capped at N - 1.
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or len(pos) < 2:
        raise ValueError(f"positions must be (N, D) with N >= 2; got shape {pos.shape}")
    k = min(n_neighbors, len(pos) - 1)
    cols = NearestNeighbors(n_neighbors=k).fit(pos).kneighbors(return_distance=False)
    return np.repeat(np.arange(len(pos)), k), cols.ravel()


@dataclass(frozen=True)
class NhoodEnrichment:
    """Cell-type pair enrichment of a neighbour graph.

    Attributes
    ----------
    zscore
        (K, K) float: ``(count - mean) / std`` over label permutations; NaN where the
        permutations never vary (a type absent from the tissue).
    counts
        (K, K) int: edges from a cell of type i to a cell of type j.
    """

    zscore: np.ndarray
    counts: np.ndarray


def nhood_enrichment(
    positions: ArrayLike,
    labels: ArrayLike,
    n_types: int,
    *,
    n_neighbors: int = 6,
    n_perms: int = 1000,
    seed: int = 0,
) -> NhoodEnrichment:
    """Neighbourhood enrichment z-scores of cell-type pairs (squidpy's ``gr.nhood_enrichment``).

    For every ordered pair of types (i, j) the number of graph edges from a cell of type i to
    a cell of type j is compared with its distribution under random relabelling: the labels
    are permuted over the cells ``n_perms`` times, and ``z = (count - mean) / std`` (population
    std of the permuted counts).

    Parameters
    ----------
    positions
        (N, D) cell coordinates.
    labels
        (N,) int type codes in [0, n_types).
    n_types
        K, the number of types (types absent from this tissue get NaN rows and columns).
    n_neighbors
        Neighbours per cell of the graph (:func:`spatial_neighbors`).
    n_perms
        Label permutations.
    seed
        Seed of the permutations.
    """
    pos = np.asarray(positions, dtype=np.float64)
    codes = _labels(labels, n_types, len(pos))
    if n_perms < 2:
        raise ValueError(f"n_perms must be >= 2; got {n_perms}")
    rows, cols = spatial_neighbors(pos, n_neighbors)
    k2 = n_types * n_types
    counts = np.bincount(codes[rows] * n_types + codes[cols], minlength=k2).reshape(
        n_types, n_types
    )
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _PERMUTATION_CODES // len(rows))
    permuted = []
    for start in range(0, n_perms, per_chunk):
        c = min(per_chunk, n_perms - start)
        shuffled = rng.permuted(np.broadcast_to(codes, (c, len(codes))), axis=1)  # (c, N)
        pair = shuffled[:, rows] * n_types + shuffled[:, cols] + (np.arange(c) * k2)[:, None]
        permuted.append(np.bincount(pair.ravel(), minlength=c * k2).reshape(c, n_types, n_types))
    stack = np.concatenate(permuted).astype(np.float64)  # (n_perms, K, K)
    mean, std = stack.mean(axis=0), stack.std(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        zscore = np.where(std > 0, (counts - mean) / std, np.nan)
    return NhoodEnrichment(zscore=zscore, counts=counts)


def composition_similarity(labels_a: ArrayLike, labels_b: ArrayLike, n_types: int) -> float:
    """1 − total-variation distance of the cell-type shares of two tissues, in [0, 1]."""
    a, b = _labels(labels_a, n_types), _labels(labels_b, n_types)
    if not len(a) or not len(b):
        raise ValueError("both tissues need at least one cell")
    shares_a = np.bincount(a, minlength=n_types) / len(a)
    shares_b = np.bincount(b, minlength=n_types) / len(b)
    return float(1.0 - 0.5 * np.abs(shares_a - shares_b).sum())


def enrichment_correlation(zscore_a: ArrayLike, zscore_b: ArrayLike) -> float:
    """Pearson correlation of two (K, K) z-score matrices over the pairs finite in both.

    NaN with fewer than 3 such pairs or a constant side.
    """
    a, b = np.asarray(zscore_a, dtype=float).ravel(), np.asarray(zscore_b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"z-score matrices differ in shape: {a.shape} vs {b.shape}")
    return _finite_correlation(a, b, lambda x, y: np.corrcoef(x, y)[0, 1])


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    return _finite_correlation(a, b, lambda x, y: spearmanr(x, y).statistic)


def _finite_correlation(
    a: np.ndarray, b: np.ndarray, correlation: Callable[[np.ndarray, np.ndarray], float]
) -> float:
    """``correlation`` of (M,) ``a`` and ``b`` over the entries finite in both; NaN with fewer
    than 3 such entries or a constant side."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return math.nan
    return float(correlation(a[ok], b[ok]))


def _row_keys(x: np.ndarray) -> np.ndarray:
    """One hashable key per row (its float32 bytes), to find cells present in both sets."""
    rows = np.ascontiguousarray(x, dtype=np.float32)
    return rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()


def realism_auc(
    real: ArrayLike,
    candidate: ArrayLike,
    *,
    max_cells: int = 2000,
    n_folds: int = 5,
    n_estimators: int = 100,
    seed: int = 0,
) -> float:
    """Cross-validated ROC AUC of a random forest telling real from candidate cells (0.5 best).

    The real cells are split into two random halves and one half is the real class. Candidate
    cells identical to a cell of that half are left out: a classifier cannot be trained and
    tested on copies of one cell with both labels. So a candidate made of the real cells
    themselves (the real tissue, or its cells at shuffled positions) is scored on the other
    half, two independent samples of one tissue, and gets about 0.5. Both classes are
    subsampled to the same size (at most ``max_cells``).

    Parameters
    ----------
    real, candidate
        (N, G) and (M, G) expression on the same genes.
    max_cells
        Most cells per class.
    n_folds
        Stratified folds (shuffled, seeded).
    n_estimators
        Trees of the forest (``min_samples_leaf=5``).
    seed
        Seed of the halves, the subsampling, the folds and the forest.
    """
    x_real = np.asarray(real, dtype=np.float32)
    x_cand = np.asarray(candidate, dtype=np.float32)
    if x_real.ndim != 2 or x_cand.ndim != 2 or x_real.shape[1] != x_cand.shape[1]:
        raise ValueError(f"expected (N, G) and (M, G) arrays; got {x_real.shape}, {x_cand.shape}")
    rng = np.random.default_rng(seed)
    half = x_real[rng.permutation(len(x_real))[: len(x_real) // 2]]
    fresh = ~np.isin(_row_keys(x_cand), _row_keys(half))
    x_cand = x_cand[fresh]
    n = min(len(half), len(x_cand), max_cells)
    if n < n_folds:
        raise ValueError(
            f"{n} cells per class are too few for {n_folds}-fold cross-validation "
            f"({len(half)} real cells in the real half, {len(x_cand)} candidate cells left)"
        )
    features = np.concatenate(
        [half[rng.permutation(len(half))[:n]], x_cand[rng.permutation(len(x_cand))[:n]]]
    )
    target = np.repeat([0, 1], n)
    forest = RandomForestClassifier(
        n_estimators=n_estimators, min_samples_leaf=5, random_state=seed, n_jobs=1
    )
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return float(cross_val_score(forest, features, target, cv=folds, scoring="roc_auc").mean())


class CellTypeClassifier:
    """One way of typing cells from their expression, fitted on training cells.

    With labels: a logistic regression on standardised expression. Without: k-means clusters
    of the training expression are the types (``cluster 0`` ...), and a cell's type is its
    nearest centre.

    Parameters
    ----------
    expression
        (N, G) training expression.
    labels
        (N,) int type codes (-1: unknown, not used for fitting), or None for clusters.
    names
        Type names for the codes of ``labels``.
    n_clusters
        Clusters without labels.
    seed
        Seed of the fit.
    """

    def __init__(
        self,
        expression: ArrayLike,
        labels: ArrayLike | None = None,
        *,
        names: list[str] | None = None,
        n_clusters: int = 10,
        seed: int = 0,
    ) -> None:
        x = np.asarray(expression, dtype=np.float64)
        codes = None if labels is None else np.asarray(labels, dtype=np.int64)
        if codes is not None and (codes >= 0).sum() >= 2 and len(np.unique(codes[codes >= 0])) >= 2:
            known = codes >= 0
            if names is None:
                names = [f"type {c}" for c in range(int(codes.max()) + 1)]
            self.names = list(names)
            self.kind = "logistic regression on the training cell types"
            self._model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
            self._model.fit(x[known], codes[known])
        else:
            k = min(n_clusters, len(x))
            self.names = [f"cluster {c}" for c in range(k)]
            self.kind = f"k-means clusters ({k}) of the training expression"
            self._model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)

    @property
    def n_types(self) -> int:
        """Number of types K."""
        return len(self.names)

    def predict(self, expression: ArrayLike) -> np.ndarray:
        """(N,) int type codes in [0, K)."""
        return np.asarray(self._model.predict(np.asarray(expression, dtype=np.float64)), np.int64)


@dataclass(frozen=True)
class TissueStatistics:
    """What is compared of one tissue: its cells' types, enrichment z-scores, Moran's I.

    Attributes
    ----------
    expression
        (N, G) expression on the scored genes.
    types
        (N,) int type codes.
    zscore
        (K, K) neighbourhood enrichment z-scores.
    morans_i
        (G,) Moran's I of each gene (NaN for a constant gene).
    """

    expression: np.ndarray
    types: np.ndarray
    zscore: np.ndarray
    morans_i: np.ndarray


class EnrichmentOptions(TypedDict, total=False):
    """Keyword options of :func:`nhood_enrichment` that :func:`tissue_statistics` passes on."""

    n_neighbors: int
    n_perms: int
    seed: int


def tissue_statistics(
    expression: ArrayLike,
    positions: ArrayLike,
    classifier: CellTypeClassifier,
    *,
    moran_k: int = 10,
    **enrichment: Unpack[EnrichmentOptions],
) -> TissueStatistics:
    """Type the cells with ``classifier`` and compute the statistics :func:`compare_tissues`
    compares: enrichment (:func:`nhood_enrichment` with the ``enrichment`` options, by default
    a 6-neighbour graph and 1000 permutations), Moran's I on a ``moran_k`` graph."""
    expr = np.asarray(expression, dtype=np.float64)
    pos = np.asarray(positions, dtype=np.float64)
    if len(expr) != len(pos):
        raise ValueError(f"expression has {len(expr)} cells but positions {len(pos)}")
    types = classifier.predict(expr)
    return TissueStatistics(
        expression=expr,
        types=types,
        zscore=nhood_enrichment(pos, types, classifier.n_types, **enrichment).zscore,
        morans_i=morans_i(expr, pos, k=moran_k),
    )


def compare_tissues(
    real: TissueStatistics,
    candidate: TissueStatistics,
    n_types: int,
    *,
    auc_max_cells: int = 2000,
    auc_estimators: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """Score a candidate tissue against a real one.

    Returns
    -------
    dict
        ``composition`` (1 best), ``nhood_correlation`` (1 best), ``morans_i_spearman``
        (1 best), ``realism_auc`` (0.5 best), ``n_cells`` of the candidate.
    """
    return {
        "composition": composition_similarity(real.types, candidate.types, n_types),
        "nhood_correlation": enrichment_correlation(real.zscore, candidate.zscore),
        "morans_i_spearman": _rank_correlation(real.morans_i, candidate.morans_i),
        "realism_auc": realism_auc(
            real.expression,
            candidate.expression,
            max_cells=auc_max_cells,
            n_estimators=auc_estimators,
            seed=seed,
        ),
        "n_cells": len(candidate.types),
    }

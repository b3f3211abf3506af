"""Reference methods for both conditional tasks, scored exactly like the model.

Every method works in the processed store's units: log-normalised expression (N, G) and each
slice's centred, isotropically scaled positions (N, D), D = 2 or 3 as in the store. They are fitted on
the training cells only.

``expr_to_pos`` (place cells from their expression): ``fit(expression, positions)`` then
``predict(expression) -> positions (N, D)``, the columns of the training positions.

- :class:`RandomPositions`: a centred Gaussian cloud (what chance scores).
- :class:`ExpressionPCAPositions`: the top 2 (2D data) or 3 principal components of the
  standardised expression, used as coordinates (PCA fitted on the training cells).
- :class:`KNNPositions`: k-nearest-neighbour regression from standardised, PCA-reduced
  expression to the training cells' coordinates. Strong wherever slices share a frame.

``pos_to_expr`` (expression at given positions): ``fit(positions, expression, measured)`` then
``predict(positions) -> expression (N, G)``.

- :class:`MeanExpression`: each gene's training mean (a constant: its correlations are undefined).
- :class:`KNNExpression`: the mean expression of the k training cells nearest in the normalised
  coordinates.

:func:`evaluate_baselines` fits all of them on a store's training entries, picks k on the
validation entries (when there are any) and scores every test entry with the metric functions
and defaults that ``alphastomics test`` uses, on the very same arrays. The five methods share
their fitting checks and units, so they stay in one module (over 500 lines).

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> pos = rng.normal(size=(400, 3))
>>> expr = np.concatenate([np.sin(pos), np.cos(pos)], axis=1)  # smooth in position
>>> knn = KNNPositions(k=5).fit(expr[:300], pos[:300])
>>> knn.predict(expr[300:]).shape
(100, 3)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
from sklearn.decomposition import PCA
from sklearn.neighbors import KNeighborsRegressor, NearestNeighbors
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from alphastomics.data.store import ProcessedStore
from alphastomics.errors import UserInputError
from alphastomics.evaluation.evaluate import score_positions, score_slice
from alphastomics.evaluation.metrics import expression_metrics, summarize

__all__ = [
    "DEFAULT_K",
    "K_GRID",
    "BaselineResult",
    "ExpressionPCAPositions",
    "KNNExpression",
    "KNNPositions",
    "MeanExpression",
    "RandomPositions",
    "evaluate_baselines",
    "infer_n_dims",
]

logger = logging.getLogger(__name__)

Task = Literal["expr_to_pos", "pos_to_expr"]

DEFAULT_K = 10  # neighbours when there is no validation entry to choose k on
K_GRID: tuple[int, ...] = (5, 10, 15, 20, 30, 50)  # candidates for k, scored on validation entries
DEFAULT_N_COMPONENTS = 50  # PCA components of the expression before kNN regression
_QUERY_CHUNK_ELEMENTS = 1 << 22  # query cells * k * G floats averaged at a time


def infer_n_dims(positions: np.ndarray) -> int:
    """2 when every z coordinate of ``positions`` (N, 3) is 0 (2D data read with z = 0), else 3."""
    positions = np.asarray(positions)
    return 2 if positions.shape[1] < 3 or not np.any(positions[:, 2]) else 3


def _pad(coordinates: np.ndarray, width: int) -> np.ndarray:
    """(N, d) with d <= width -> (N, width) float32, the missing columns 0: predictions have
    the columns of the training positions (2 for 2D stores, 3 for 3D)."""
    out = np.zeros((len(coordinates), width), dtype=np.float32)
    out[:, : coordinates.shape[1]] = coordinates
    return out


def _check_fit_arrays(features: np.ndarray, targets: np.ndarray, what: str) -> None:
    if features.ndim != 2 or targets.ndim != 2 or len(features) != len(targets):
        raise ValueError(
            f"{what}: expected paired 2-D arrays with one row per cell; got shapes "
            f"{features.shape} and {targets.shape}"
        )
    if len(features) < 2:
        raise ValueError(f"{what}: need at least 2 training cells; got {len(features)}")


def _rms_per_axis(positions: np.ndarray, n_dims: int) -> float:
    """Root mean square distance to the centroid divided by sqrt(n_dims): ~1 in store units."""
    centred = positions[:, :n_dims] - positions[:, :n_dims].mean(axis=0)
    return float(np.sqrt(np.square(centred).sum(axis=1).mean() / n_dims))


# --------------------------------------------------------------------------------------------
# expr_to_pos


class RandomPositions:
    """Centred Gaussian positions with the training cells' spread; ignores the expression.

    Parameters
    ----------
    n_dims
        2 or 3 spatial dimensions (2: z = 0); None infers it from the training positions.
    seed
        Seed of the generator; successive ``predict`` calls continue the same stream.
    """

    name = "random positions"
    task: Task = "expr_to_pos"

    def __init__(self, n_dims: int | None = None, seed: int = 0) -> None:
        self.n_dims = n_dims
        self.seed = seed

    def fit(self, expression: np.ndarray, positions: np.ndarray) -> Self:
        """Record the dimensionality and the spread (per-axis RMS) of ``positions`` (N, 3)."""
        positions = np.asarray(positions, dtype=np.float64)
        self.n_dims_ = self.n_dims or infer_n_dims(positions)
        self.width_ = positions.shape[1]
        self.scale_ = _rms_per_axis(positions, self.n_dims_)
        self._rng = np.random.default_rng(self.seed)
        return self

    def predict(self, expression: np.ndarray) -> np.ndarray:
        """(N, 3) float32 random positions, one per row of ``expression``, centred."""
        draw = self._rng.normal(scale=self.scale_, size=(len(expression), self.n_dims_))
        return _pad(draw - draw.mean(axis=0), self.width_)

    def params(self) -> dict[str, Any]:
        """Settings recorded with the scores."""
        return {"n_dims": self.n_dims_, "seed": self.seed}


class ExpressionPCAPositions:
    """The top principal components of standardised expression, read as coordinates.

    Parameters
    ----------
    n_dims
        Components used: 2 for 2D data (z = 0), 3 for 3D; None infers it from the training
        positions given to :meth:`fit`.
    """

    name = "expression PCA"
    task: Task = "expr_to_pos"

    def __init__(self, n_dims: int | None = None) -> None:
        self.n_dims = n_dims

    def fit(self, expression: np.ndarray, positions: np.ndarray) -> Self:
        """Fit the scaler and PCA on the training ``expression`` (N, G); positions set the scale."""
        expression = np.asarray(expression, dtype=np.float64)
        positions = np.asarray(positions, dtype=np.float64)
        _check_fit_arrays(expression, positions, type(self).__name__)
        self.n_dims_ = self.n_dims or infer_n_dims(positions)
        self.width_ = positions.shape[1]
        n_components = min(self.n_dims_, *expression.shape)
        self.pipeline_ = Pipeline(
            [
                ("scale", StandardScaler()),
                ("pca", PCA(n_components=n_components, random_state=0)),
            ]
        ).fit(expression)
        # One isotropic factor so that the layout has about the training positions' spread.
        scores = self.pipeline_.transform(expression)
        spread = _rms_per_axis(scores, scores.shape[1])
        self.factor_ = _rms_per_axis(positions, self.n_dims_) / spread if spread > 0 else 1.0
        return self

    def predict(self, expression: np.ndarray) -> np.ndarray:
        """(N, 3) float32 component scores of ``expression`` (N, G), z = 0 for 2D data."""
        scores = self.pipeline_.transform(np.asarray(expression, dtype=np.float64))
        return _pad(scores * self.factor_, self.width_)

    def params(self) -> dict[str, Any]:
        """Settings recorded with the scores."""
        return {"n_components": int(self.pipeline_.named_steps["pca"].n_components_)}


class KNNPositions:
    """k-nearest-neighbour regression from expression to the training cells' coordinates.

    The expression is standardised per gene and reduced to ``n_components`` principal
    components (fitted on the training cells); a query cell gets the mean coordinates of the
    ``k`` training cells nearest in that space.

    Parameters
    ----------
    k
        Neighbours averaged.
    n_components
        PCA components of the standardised expression; None (or >= the number of genes) keeps
        the standardised genes.
    weights
        ``"uniform"`` or ``"distance"`` (sklearn ``KNeighborsRegressor``).
    """

    name = "kNN regression"
    task: Task = "expr_to_pos"

    def __init__(
        self,
        k: int = DEFAULT_K,
        n_components: int | None = DEFAULT_N_COMPONENTS,
        weights: Literal["uniform", "distance"] = "uniform",
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        self.k = k
        self.n_components = n_components
        self.weights = weights

    def fit(self, expression: np.ndarray, positions: np.ndarray) -> Self:
        """Fit on training ``expression`` (N, G) and ``positions`` (N, 3)."""
        expression = np.asarray(expression, dtype=np.float64)
        positions = np.asarray(positions, dtype=np.float64)
        _check_fit_arrays(expression, positions, type(self).__name__)
        steps: list[tuple[str, Any]] = [("scale", StandardScaler())]
        if self.n_components is not None and self.n_components < min(expression.shape):
            steps.append(("pca", PCA(n_components=self.n_components, random_state=0)))
        self.k_ = min(self.k, len(expression))
        steps.append(("knn", KNeighborsRegressor(n_neighbors=self.k_, weights=self.weights)))
        self.pipeline_ = Pipeline(steps).fit(expression, positions)
        return self

    def predict(self, expression: np.ndarray) -> np.ndarray:
        """(N, 3) float32 predicted coordinates of the cells of ``expression`` (N, G)."""
        return np.asarray(
            self.pipeline_.predict(np.asarray(expression, dtype=np.float64)), dtype=np.float32
        )

    def params(self) -> dict[str, Any]:
        """Settings recorded with the scores."""
        pca = self.pipeline_.named_steps.get("pca")
        return {
            "k": self.k_,
            "n_components": None if pca is None else int(pca.n_components_),
            "weights": self.weights,
        }


# --------------------------------------------------------------------------------------------
# pos_to_expr


def _measured_matrix(measured: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """(N, G) bool of measured entries, or None when every entry is measured."""
    if measured is None:
        return None
    measured = np.asarray(measured, dtype=bool)
    if measured.shape == (shape[1],):
        measured = np.broadcast_to(measured, shape)
    if measured.shape != shape:
        raise ValueError(
            f"measured must have shape (G,) = ({shape[1]},) or (N, G) = {shape}; got "
            f"{measured.shape}"
        )
    return None if measured.all() else measured


def _gene_means(expression: np.ndarray, measured: np.ndarray | None) -> np.ndarray:
    """(G,) mean of each gene over the cells that measured it (0 for a gene none measured)."""
    if measured is None:
        return expression.mean(axis=0)
    counts = measured.sum(axis=0)
    sums = np.where(measured, expression, 0.0).sum(axis=0)
    return np.divide(sums, counts, out=np.zeros(expression.shape[1]), where=counts > 0)


class MeanExpression:
    """Each gene's mean over the training cells that measured it, at every position."""

    name = "gene training mean"
    task: Task = "pos_to_expr"

    def fit(
        self, positions: np.ndarray, expression: np.ndarray, measured: np.ndarray | None = None
    ) -> Self:
        """Fit on training ``expression`` (N, G); ``measured`` (G,) or (N, G) bool, None = all."""
        expression = np.asarray(expression, dtype=np.float64)
        self.mean_ = _gene_means(expression, _measured_matrix(measured, expression.shape))
        return self

    def predict(self, positions: np.ndarray) -> np.ndarray:
        """(N, G) float32: the training means, one row per row of ``positions``."""
        return np.broadcast_to(self.mean_.astype(np.float32), (len(positions), len(self.mean_)))

    def params(self) -> dict[str, Any]:
        """Settings recorded with the scores."""
        return {}


class KNNExpression:
    """Mean expression of the ``k`` training cells nearest in the normalised coordinates.

    A gene is averaged only over the neighbours that measured it; when none did, its training
    mean is used.

    Parameters
    ----------
    k
        Neighbours averaged.
    """

    name = "kNN spatial average"
    task: Task = "pos_to_expr"

    def __init__(self, k: int = DEFAULT_K) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        self.k = k

    def fit(
        self, positions: np.ndarray, expression: np.ndarray, measured: np.ndarray | None = None
    ) -> Self:
        """Fit on training ``positions`` (N, 3) and ``expression`` (N, G); ``measured`` as in
        :meth:`MeanExpression.fit`."""
        positions = np.asarray(positions, dtype=np.float64)
        expression = np.asarray(expression, dtype=np.float32)
        _check_fit_arrays(positions, expression, type(self).__name__)
        self.k_ = min(self.k, len(positions))
        self.neighbors_ = NearestNeighbors(n_neighbors=self.k_).fit(positions)
        self.expression_ = expression
        self.measured_ = _measured_matrix(measured, expression.shape)
        self.mean_ = _gene_means(expression.astype(np.float64), self.measured_).astype(np.float32)
        return self

    def predict(self, positions: np.ndarray) -> np.ndarray:
        """(N, G) float32 predicted expression at ``positions`` (N, 3)."""
        positions = np.asarray(positions, dtype=np.float64)
        n_genes = self.expression_.shape[1]
        out = np.empty((len(positions), n_genes), dtype=np.float32)
        step = max(1, _QUERY_CHUNK_ELEMENTS // (self.k_ * n_genes))
        for start in range(0, len(positions), step):
            rows = slice(start, start + step)
            index = self.neighbors_.kneighbors(positions[rows], return_distance=False)  # (c, k)
            values = self.expression_[index]  # (c, k, G)
            if self.measured_ is None:
                out[rows] = values.mean(axis=1)
                continue
            seen = self.measured_[index]  # (c, k, G)
            counts = seen.sum(axis=1)
            sums = np.where(seen, values, 0.0).sum(axis=1)
            out[rows] = np.where(counts > 0, sums / np.maximum(counts, 1), self.mean_)
        return out

    def params(self) -> dict[str, Any]:
        """Settings recorded with the scores."""
        return {"k": self.k_}


# --------------------------------------------------------------------------------------------
# Scoring on a processed store


@dataclass
class BaselineResult:
    """Scores of one baseline on the test entries of a store.

    Attributes
    ----------
    name
        Display name (e.g. ``"kNN regression"``).
    task
        ``"expr_to_pos"`` or ``"pos_to_expr"``.
    params
        Settings used (k, components, ...).
    slices
        Entry name -> metrics of that entry (``n_cells`` included).
    overall
        Cell-weighted summary over the entries (:func:`alphastomics.evaluation.metrics.summarize`).
    fit_seconds, predict_seconds
        Wall time of fitting on the training cells, and of predicting every test entry
        (metric computation excluded).
    selection
        How k was chosen: ``metric`` (None when k was not chosen), ``scores`` per candidate
        k on the validation entries, ``k``, ``val_entries``; empty for methods without k.
    """

    name: str
    task: Task
    params: dict[str, Any]
    slices: dict[str, dict[str, Any]]
    overall: dict[str, Any]
    fit_seconds: float
    predict_seconds: float
    selection: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return {
            "name": self.name,
            "task": self.task,
            "params": self.params,
            "fit_seconds": self.fit_seconds,
            "predict_seconds": self.predict_seconds,
            "selection": self.selection,
            "overall": self.overall,
            "slices": self.slices,
        }


@dataclass
class _Entries:
    """Store entries of one split, concatenated where a method needs them together."""

    names: list[str]
    expression: list[np.ndarray]  # (N_i, G) float32 each
    positions: list[np.ndarray]  # (N_i, 3) float32 each
    gene_masks: list[np.ndarray]  # (G,) bool each

    def measured(self) -> np.ndarray:
        """(N, G) bool: the gene mask of each cell's entry, stacked."""
        return np.concatenate(
            [
                np.broadcast_to(m, x.shape)
                for m, x in zip(self.gene_masks, self.expression, strict=True)
            ]
        )


def _load(store: ProcessedStore, split: Literal["train", "val", "test"]) -> _Entries:
    entries = _Entries([], [], [], [])
    for index in store.slice_indices(split):
        data = store.load_slice(index, mmap=False)
        entries.names.append(data.name)
        entries.expression.append(np.asarray(data.expression, dtype=np.float32))
        entries.positions.append(np.asarray(data.positions, dtype=np.float32))
        entries.gene_masks.append(np.asarray(data.gene_mask, dtype=bool))
    return entries


def _choose_k(
    make: Callable[[int], Any],
    fit: Callable[[Any], Any],
    score: Callable[[Any], float],
    k_grid: Sequence[int],
    metric: str,
) -> tuple[int, dict[str, Any]]:
    """Fit ``make(k)`` for every k of ``k_grid``, keep the k with the highest validation score."""
    scores: dict[int, float] = {}
    for k in k_grid:
        value = score(fit(make(k)))
        scores[k] = value if math.isfinite(value) else -math.inf
    best = max(scores, key=lambda k: (scores[k], -k))
    logger.info("k = %d chosen on the validation entries (%s: %s)", best, metric, scores)
    return best, {"metric": metric, "scores": {str(k): v for k, v in scores.items()}, "k": best}


def evaluate_baselines(
    store: ProcessedStore | str | Path,
    *,
    split: Literal["val", "test"] = "test",
    k_grid: Sequence[int] = K_GRID,
    default_k: int = DEFAULT_K,
    n_components: int | None = DEFAULT_N_COMPONENTS,
    seed: int = 0,
) -> list[BaselineResult]:
    """Fit every baseline on the training entries and score it on the entries of ``split``.

    Parameters
    ----------
    store
        A processed store (or its folder), as written by ``alphastomics preprocess``.
    split
        Entries to score.
    k_grid
        Candidate k of both kNN baselines. With validation entries (and ``split="test"``), the k
        with the best validation score is used: median distance Spearman for
        :class:`KNNPositions`, mean gene PCC for :class:`KNNExpression`. Without, ``default_k``.
    default_k
        k when there is nothing to choose on.
    n_components
        PCA components of :class:`KNNPositions` (None: none).
    seed
        Seed of :class:`RandomPositions`.

    Returns
    -------
    list[BaselineResult]
        In the order random positions, expression PCA, kNN regression, gene training mean,
        kNN spatial average.

    Notes
    -----
    The scored arrays are exactly those ``alphastomics test`` scores for the same entries
    (``store.load_slice``): same cells, same per-slice normalised coordinate frame. With one
    slice split by cells, every part keeps the slice's centre and scale, so the training cells'
    coordinates and the held-out cells' coordinates share one frame.
    """
    if not isinstance(store, ProcessedStore):
        store = ProcessedStore(store)
    train, val, target = _load(store, "train"), _load(store, "val"), _load(store, split)
    if not train.names:
        raise UserInputError(f"{store.data_dir} has no training entries to fit baselines on")
    if not target.names:
        raise UserInputError(f"{store.data_dir} has no {split!r} entries to score")
    if split == "val":
        val = _Entries([], [], [], [])  # nothing left to choose k on
    # Genes usable as features: measured in every entry involved.
    features = np.logical_and.reduce(train.gene_masks + val.gene_masks + target.gene_masks)
    if not features.any():
        raise UserInputError(
            "no gene is measured in every training and held-out entry; expression baselines "
            "need shared genes"
        )
    x_train = np.concatenate(train.expression)
    p_train = np.concatenate(train.positions)
    measured = train.measured()
    n_dims = max(infer_n_dims(p) for p in train.positions)
    logger.info(
        "baselines: %d training cells, %d feature genes, %dD positions; scoring %d %s entries",
        len(x_train),
        int(features.sum()),
        n_dims,
        len(target.names),
        split,
    )

    def fit_positions(method: Any) -> Any:
        return method.fit(x_train[:, features], p_train)

    def fit_expression(method: Any) -> Any:
        return method.fit(p_train, x_train, measured)

    def val_position_score(method: Any) -> float:
        values = [
            score_positions(p, method.predict(x[:, features]))["distance_spearman_median"]
            for x, p in zip(val.expression, val.positions, strict=True)
        ]
        return float(np.average(values, weights=[len(p) for p in val.positions]))

    def val_expression_score(method: Any) -> float:
        values = [
            expression_metrics(x, method.predict(p), gene_mask=m)["pcc_gene_mean"]
            for x, p, m in zip(val.expression, val.positions, val.gene_masks, strict=True)
        ]
        return float(np.average(values, weights=[len(p) for p in val.positions]))

    k_pos, k_expr = default_k, default_k
    selection_pos: dict[str, Any] = {"k": default_k, "metric": None}
    selection_expr: dict[str, Any] = {"k": default_k, "metric": None}
    if val.names and k_grid:
        k_pos, selection_pos = _choose_k(
            lambda k: KNNPositions(k=k, n_components=n_components),
            fit_positions,
            val_position_score,
            k_grid,
            "distance_spearman_median",
        )
        k_expr, selection_expr = _choose_k(
            KNNExpression, fit_expression, val_expression_score, k_grid, "pcc_gene_mean"
        )
    selection_pos["val_entries"] = selection_expr["val_entries"] = list(val.names)

    position_methods: list[tuple[Any, dict[str, Any]]] = [
        (RandomPositions(n_dims=n_dims, seed=seed), {}),
        (ExpressionPCAPositions(n_dims=n_dims), {}),
        (KNNPositions(k=k_pos, n_components=n_components), selection_pos),
    ]
    expression_methods: list[tuple[Any, dict[str, Any]]] = [
        (MeanExpression(), {}),
        (KNNExpression(k=k_expr), selection_expr),
    ]
    results = []
    for method, selection in position_methods:
        start = time.perf_counter()
        fit_positions(method)
        fit_seconds = time.perf_counter() - start
        per_slice: dict[str, dict[str, Any]] = {}
        predict_seconds = 0.0
        for name, x, p in zip(target.names, target.expression, target.positions, strict=True):
            start = time.perf_counter()
            pred = method.predict(x[:, features])
            predict_seconds += time.perf_counter() - start
            per_slice[name] = score_slice(x, p, predicted_positions=pred)["expr_to_pos"]
        results.append(_result(method, per_slice, fit_seconds, predict_seconds, selection))
    for method, selection in expression_methods:
        start = time.perf_counter()
        fit_expression(method)
        fit_seconds = time.perf_counter() - start
        per_slice = {}
        predict_seconds = 0.0
        for name, x, p, m in zip(
            target.names, target.expression, target.positions, target.gene_masks, strict=True
        ):
            start = time.perf_counter()
            pred = method.predict(p)
            predict_seconds += time.perf_counter() - start
            per_slice[name] = score_slice(x, p, m, predicted_expression=pred)["pos_to_expr"]
        results.append(_result(method, per_slice, fit_seconds, predict_seconds, selection))
    return results


def _result(
    method: Any,
    per_slice: dict[str, dict[str, Any]],
    fit_seconds: float,
    predict_seconds: float,
    selection: dict[str, Any],
) -> BaselineResult:
    overall = dict(
        summarize(list(per_slice.values()), weights=[m["n_cells"] for m in per_slice.values()])
    )
    return BaselineResult(
        name=method.name,
        task=method.task,
        params=method.params(),
        slices=per_slice,
        overall=overall,
        fit_seconds=fit_seconds,
        predict_seconds=predict_seconds,
        selection=selection,
    )

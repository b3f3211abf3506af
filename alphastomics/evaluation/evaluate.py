"""One slice's scores: the recipe `test`, the baselines and the benchmarks all use.

:func:`score_slice` takes the true arrays of a slice and whichever predictions there are
(``expr_to_pos`` positions, ``pos_to_expr`` expression) and returns the metrics of each mode.
With ``known`` cells (given to the model as context, as when cells are placed among measured
ones), only the other cells are scored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from alphastomics.evaluation.metrics import (
    clustering_metrics,
    expression_metrics,
    position_metrics,
    spatial_metrics,
)


def score_positions(true: ArrayLike, pred: ArrayLike) -> dict[str, Any]:
    """``expr_to_pos`` metrics of a layout (N, D) against the true positions (N, D)."""
    return dict(position_metrics(true, pred))


def score_expression(
    true: ArrayLike,
    pred: ArrayLike,
    positions: ArrayLike,
    gene_mask: ArrayLike | None = None,
    cell_types: ArrayLike | None = None,
) -> dict[str, Any]:
    """``pos_to_expr`` metrics of expression (N, G) at the true ``positions`` (N, D).

    Per-gene and per-cell agreement, spatial statistics on measured genes (``gene_mask``), and
    with ``cell_types`` ((N,) int codes, -1 unknown) how well the predicted expression clusters
    by type (``cluster_*``), over the cells whose type is known.
    """
    scores: dict[str, Any] = dict(expression_metrics(true, pred, gene_mask=gene_mask))
    scores.update(spatial_metrics(true, pred, positions, gene_mask=gene_mask))
    if cell_types is not None and (np.asarray(cell_types) >= 0).any():
        labels = np.asarray(cell_types)
        typed = labels >= 0
        clusters = clustering_metrics(np.asarray(pred)[typed], labels[typed])
        scores.update({f"cluster_{k}": v for k, v in clusters.items()})
    return scores


def score_slice(
    expression: ArrayLike,
    positions: ArrayLike,
    gene_mask: ArrayLike | None = None,
    *,
    predicted_positions: ArrayLike | None = None,
    predicted_expression: ArrayLike | None = None,
    cell_types: ArrayLike | None = None,
    known: ArrayLike | None = None,
) -> dict[str, dict[str, Any]]:
    """Scores of one slice's predictions against its truth.

    Parameters
    ----------
    expression, positions
        The slice's true expression (N, G) and positions (N, D).
    gene_mask
        (G,) bool, the genes the slice measured (the others are not scored).
    predicted_positions, predicted_expression
        (N, D) and (N, G) predictions; each one given adds its mode to the result.
    cell_types
        (N,) int codes (-1 unknown); adds the ``cluster_*`` scores of ``pos_to_expr``.
    known
        (N,) bool, cells given to the model as context; only the others are scored.

    Returns
    -------
    dict
        ``{"expr_to_pos": {...}, "pos_to_expr": {...}}``, the modes that had a prediction.
    """
    rows = slice(None) if known is None else ~np.asarray(known, dtype=bool)
    true_pos = np.asarray(positions)[rows]
    labels = None if cell_types is None else np.asarray(cell_types)[rows]
    result: dict[str, dict[str, Any]] = {}
    if predicted_positions is not None:
        result["expr_to_pos"] = score_positions(true_pos, np.asarray(predicted_positions)[rows])
    if predicted_expression is not None:
        result["pos_to_expr"] = score_expression(
            np.asarray(expression)[rows],
            np.asarray(predicted_expression)[rows],
            true_pos,
            gene_mask,
            labels,
        )
    return result

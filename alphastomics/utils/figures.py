"""PNG figures for sampled slices: true vs generated layout, true vs predicted gene expression.

Built on ``matplotlib.figure.Figure`` (no pyplot, so the user's backend is never touched) and
written atomically (temporary file in the target folder, then ``os.replace``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from numpy.typing import ArrayLike

from alphastomics.utils.io import atomic_write
from alphastomics.utils.metrics import procrustes_align

__all__ = ["plot_genes", "plot_layouts"]

logger = logging.getLogger(__name__)

_MAX_POINTS = 50_000  # cells drawn per panel; more only blurs the scatter and slows saving
_MAX_TYPES = 30  # legend entries; rarer types are drawn grey as "other"
_DPI = 150


def _write_png(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Save ``fig`` to ``path`` as PNG atomically; on failure no partial file is left."""
    try:
        target = atomic_write(
            path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight")
        )
    finally:
        fig.clear()
    logger.debug("wrote %s", target)
    return target


def _positions(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise ValueError(f"{name} must have shape (N, 2) or (N, 3); got {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return arr


def _display_axes(pos: np.ndarray) -> tuple[int, int]:
    """The two coordinate axes with the largest variance, in axis order.

    A deliberate PCA-free choice: for 2D data, or 3D data with z = 0, this is (x, y); for a
    registered 3D slab it is the plane the slab spreads over, in the original units and
    orientation, so figures of different slices stay comparable.
    """
    if pos.shape[1] == 2:
        return 0, 1
    first, second = sorted(np.argsort(pos.var(axis=0), kind="stable")[::-1][:2])
    return int(first), int(second)


def _subsample(n: int, seed: int = 0) -> np.ndarray:
    if n <= _MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=_MAX_POINTS, replace=False))


def _aspect(xy: np.ndarray) -> float:
    """Width / height of the drawn extent, kept within [0.5, 3] so panels stay readable."""
    width, height = np.ptp(xy, axis=0)
    return float(np.clip(width / height, 0.5, 3.0)) if height > 0 else 1.0


def _marker_size(n: int) -> float:
    return float(np.clip(20_000 / max(n, 1), 0.3, 20.0))


def _type_labels(cell_types: ArrayLike, n: int) -> np.ndarray:
    arr = np.asarray(cell_types, dtype=object)
    if arr.shape != (n,):
        raise ValueError(
            f"cell_types must have shape ({n},) to match the positions; got {arr.shape}."
        )

    def as_label(x: Any) -> str:
        missing = x is None or x == "" or (isinstance(x, float) and np.isnan(x))
        return "unknown" if missing else str(x)

    return np.array([as_label(x) for x in arr], dtype=object)


def _type_colours(labels: np.ndarray) -> tuple[list[tuple[str, Any]], np.ndarray]:
    """Legend entries (label, colour) by frequency and one RGBA colour per cell (N, 4)."""
    palette = [
        *colormaps["tab20"].colors,
        *colormaps["tab20b"].colors,
        *colormaps["tab20c"].colors,
    ]
    counts = Counter(labels.tolist()).most_common()
    grey = (0.75, 0.75, 0.75, 1.0)
    shown = counts if len(counts) <= _MAX_TYPES else counts[: _MAX_TYPES - 1]
    lookup = {label: (*palette[i % len(palette)][:3], 1.0) for i, (label, _) in enumerate(shown)}
    entries: list[tuple[str, Any]] = [(label, lookup[label]) for label, _ in shown]
    if len(shown) < len(counts):
        entries.append((f"other ({len(counts) - len(shown)} types)", grey))
    colours = np.array([lookup.get(label, grey) for label in labels.tolist()])
    return entries, colours


def _scatter_panel(ax: Axes, xy: np.ndarray, title: str, **kwargs: Any) -> Any:
    artist = ax.scatter(xy[:, 0], xy[:, 1], linewidths=0, rasterized=True, **kwargs)
    ax.set_title(title)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xticks([])
    ax.set_yticks([])
    return artist


def plot_layouts(
    true_pos: ArrayLike,
    pred_pos: ArrayLike,
    path: str | os.PathLike[str],
    *,
    cell_types: ArrayLike | None = None,
    title: str = "",
    paired: bool = True,
) -> Path:
    """Draw the true and the generated layout of one slice side by side and save a PNG.

    The generated layout is first mapped onto the true one by similarity Procrustes (rotation
    or reflection, translation, isotropic scale; fitted on all cells), so the panels share a
    frame. Both panels show the two coordinate axes along which the true positions vary most
    (see ``_display_axes``). At most 50,000 cells, the same ones in both panels, are drawn.

    Parameters
    ----------
    true_pos, pred_pos
        Coordinates, shape (N, D) with D in {2, 3}, rows paired by cell.
    path
        Output PNG; missing parent folders are created, an existing file is replaced.
    cell_types
        Shape (N,): colours cells by type, with a legend of the 29 most frequent types (rarer
        ones grey, as "other"). Without it, cells are coloured by their true position along the
        first displayed axis, so a colour gradient shows where each cell was placed.
    title
        Figure title.
    paired
        False when the rows are not the same cells (a generated tissue next to a reference of
        the same size): no Procrustes fit, the generated layout is only centred and scaled to
        the reference's spread, panels are titled "reference" / "generated", and cells are
        coloured by their position along the first displayed axis of their own panel.

    Returns
    -------
    Path
        The written file.

    Examples
    --------
    >>> plot_layouts(adata.obsm["spatial"], adata.obsm["alphastomics_positions"],
    ...              "out/layout.png", cell_types=adata.obs["cell_type"].to_numpy())
    """
    true_arr = _positions(true_pos, "true_pos")
    pred_arr = _positions(pred_pos, "pred_pos")
    if true_arr.shape != pred_arr.shape:
        raise ValueError(
            f"true_pos {true_arr.shape} and pred_pos {pred_arr.shape} must have the same shape."
        )
    n = len(true_arr)
    if paired:
        aligned = procrustes_align(true_arr, pred_arr)
    else:
        centred = pred_arr - pred_arr.mean(axis=0)
        spread = np.sqrt((centred**2).sum(axis=1).mean()) or 1.0
        ref_spread = np.sqrt(((true_arr - true_arr.mean(axis=0)) ** 2).sum(axis=1).mean())
        aligned = centred / spread * ref_spread + true_arr.mean(axis=0)
        cell_types = None
    axes = list(_display_axes(true_arr))
    keep = _subsample(n)
    true_xy, pred_xy = true_arr[keep][:, axes], aligned[keep][:, axes]
    size = _marker_size(len(keep))

    panel_height = 5.0
    fig = Figure(
        figsize=(2 * panel_height * _aspect(true_xy) + 3.0, panel_height + 1.0),
        layout="constrained",
    )
    ax_true, ax_pred = fig.subplots(1, 2, sharex=True, sharey=True)
    if cell_types is not None:
        entries, colours = _type_colours(_type_labels(cell_types, n)[keep])
        _scatter_panel(ax_true, true_xy, "true", c=colours, s=size)
        _scatter_panel(ax_pred, pred_xy, "generated (aligned)", c=colours, s=size)
        handles = [
            Line2D([], [], marker="o", linestyle="", color=colour, label=label, markersize=6)
            for label, colour in entries
        ]
        fig.legend(
            handles=handles,
            loc="outside right center",
            frameon=False,
            fontsize="small",
            ncols=1 if len(handles) <= 15 else 2,
        )
    elif not paired:
        _scatter_panel(ax_true, true_xy, "reference", c=true_xy[:, 0], cmap="viridis", s=size)
        _scatter_panel(ax_pred, pred_xy, "generated", c=pred_xy[:, 0], cmap="viridis", s=size)
    else:
        shade = true_xy[:, 0]
        _scatter_panel(ax_true, true_xy, "true", c=shade, cmap="viridis", s=size)
        artist = _scatter_panel(
            ax_pred, pred_xy, "generated (aligned)", c=shade, cmap="viridis", s=size
        )
        fig.colorbar(artist, ax=[ax_true, ax_pred], shrink=0.7, label=f"true axis {axes[0]}")
    if title:
        fig.suptitle(title)
    return _write_png(fig, path)


def _select_genes(
    true_expr: np.ndarray,
    gene_names: Sequence[str],
    genes: Sequence[str] | None,
    gene_mask: ArrayLike | None,
    n_genes: int,
) -> list[int]:
    if genes is not None:
        index = {name: i for i, name in enumerate(gene_names)}
        missing = [g for g in genes if g not in index]
        if missing:
            raise ValueError(f"genes {missing} are not in gene_names; pass names from that list.")
        return [index[g] for g in genes]
    if n_genes < 1:
        raise ValueError(f"n_genes must be >= 1; got {n_genes}.")
    candidates = np.arange(true_expr.shape[1])
    if gene_mask is not None:
        mask = np.asarray(gene_mask, dtype=bool)
        if mask.shape != (true_expr.shape[1],):
            raise ValueError(
                f"gene_mask must have shape ({true_expr.shape[1]},); got {mask.shape}."
            )
        candidates = candidates[mask]
    variance = true_expr[:, candidates].astype(np.float64).var(axis=0)
    order = np.argsort(-variance, kind="stable")
    chosen = [int(candidates[i]) for i in order if variance[i] > 0][:n_genes]
    if not chosen:
        raise ValueError("no measured gene varies across cells; nothing to plot.")
    return chosen


def _pcc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def plot_genes(
    positions: ArrayLike,
    true_expr: ArrayLike,
    pred_expr: ArrayLike,
    gene_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    n_genes: int = 4,
    genes: Sequence[str] | None = None,
    gene_mask: ArrayLike | None = None,
) -> Path:
    """Draw true (top row) and predicted (bottom row) expression of a few genes in space.

    Each gene's two panels share one colour scale (1st to 99th percentile of both), so a
    prediction on the wrong level shows as a brighter or darker panel. The lower title gives
    the Pearson correlation across all cells. At most 50,000 cells are drawn.

    Parameters
    ----------
    positions
        Coordinates, shape (N, D) with D in {2, 3}; the two axes of largest variance are drawn.
    true_expr, pred_expr
        Expression, shape (N, G).
    gene_names
        G names, in column order.
    path
        Output PNG; missing parent folders are created, an existing file is replaced.
    n_genes
        How many genes to draw when ``genes`` is not given: the ``n_genes`` measured genes with
        the highest variance in ``true_expr``.
    genes
        Names of the genes to draw, in order; overrides ``n_genes`` and ``gene_mask``.
    gene_mask
        Bool array, shape (G,): genes eligible for the automatic choice (unmeasured genes False).

    Returns
    -------
    Path
        The written file.
    """
    pos = _positions(positions, "positions")
    true_arr = np.asarray(true_expr)
    pred_arr = np.asarray(pred_expr)
    if true_arr.ndim != 2 or true_arr.shape != pred_arr.shape or len(true_arr) != len(pos):
        raise ValueError(
            f"true_expr {true_arr.shape} and pred_expr {pred_arr.shape} must both be (N, G) "
            f"with N = {len(pos)} cells as in positions."
        )
    if len(gene_names) != true_arr.shape[1]:
        raise ValueError(
            f"gene_names has {len(gene_names)} names but the expression has "
            f"{true_arr.shape[1]} columns."
        )
    chosen = _select_genes(true_arr, gene_names, genes, gene_mask, n_genes)
    keep = _subsample(len(pos))
    xy = pos[keep][:, list(_display_axes(pos))]
    size = _marker_size(len(keep))

    panel_width = 3.6
    fig = Figure(
        figsize=(panel_width * len(chosen), 2 * panel_width / _aspect(xy) + 1.6),
        layout="constrained",
    )
    grid = np.asarray(fig.subplots(2, len(chosen), squeeze=False, sharex=True, sharey=True))
    for col, gene in enumerate(chosen):
        t = true_arr[:, gene].astype(np.float64)
        p = pred_arr[:, gene].astype(np.float64)
        low, high = np.percentile(np.concatenate([t[keep], p[keep]]), [1, 99])
        high = high if high > low else low + 1.0
        style = {"cmap": "magma", "vmin": low, "vmax": high, "s": size}
        _scatter_panel(grid[0, col], xy, f"{gene_names[gene]} (true)", c=t[keep], **style)
        artist = _scatter_panel(
            grid[1, col], xy, f"predicted, r = {_pcc(t, p):.2f}", c=p[keep], **style
        )
        fig.colorbar(artist, ax=grid[:, col].tolist(), shrink=0.6, location="bottom")
    return _write_png(fig, path)

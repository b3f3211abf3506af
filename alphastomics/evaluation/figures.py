"""PNG figures for sampled slices: true vs generated layout, true vs predicted gene expression.

Built on ``matplotlib.figure.Figure`` (no pyplot, so the user's backend is never touched) and
written atomically (temporary file in the target folder, then ``os.replace``). Every ``plot_*``
function writes one PNG to ``path`` (missing parent folders are created, an existing file is
replaced), titled ``title`` when it is not empty, and returns the written file's ``Path``.
"""

from __future__ import annotations

import colorsys
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from numpy.typing import ArrayLike

from alphastomics.evaluation.metrics import procrustes_align
from alphastomics.utils.io import atomic_write

__all__ = [
    "MODE_TITLES",
    "TissuePanel",
    "plot_genes",
    "plot_layout",
    "plot_layouts",
    "plot_tissues",
]

MODE_TITLES = {
    "expr_to_pos": "cells placed from their expression",
    "pos_to_expr": "expression predicted from positions",
    "impute": "genes the panel lacks, imputed",
    "joint": "tissue generated beside its reference",
}

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


def _titled_png(fig: Figure, path: str | os.PathLike[str], title: str) -> Path:
    """Title ``fig`` (when ``title`` is not empty) and save it with :func:`_write_png`."""
    if title:
        fig.suptitle(title)
    return _write_png(fig, path)


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


_NOT_A_TYPE = re.compile(
    r"^(unknown|nan|none|na|n/a|other|others|unassigned|unclassified|undefined|ambiguous|"
    r"doublets?|low[ _-]?quality.*|unlabell?ed|-1)$",
    re.IGNORECASE,
)
_GREYS = [(0.62, 0.62, 0.62, 1.0), (0.78, 0.78, 0.78, 1.0), (0.45, 0.45, 0.45, 1.0)]
_AXIS_NAMES = "xyz"


def _natural_key(label: str) -> list[Any]:
    """Sort key that puts "type 2" before "type 10"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", label)]


def _palette(n: int) -> list[tuple[float, ...]]:
    """``n`` distinct colours: scanpy's (Vega's 10 for up to 10 types, else "godsnot", a list
    of maximally distinct colours), without the pale ones that vanish on white and the greyish
    ones kept for labels that name no type. Beyond its 75 colours, they repeat."""
    from scanpy.plotting import palettes

    source = palettes.default_20[:10] if n <= 10 else palettes.godsnot_102
    colours = []
    for colour in map(to_rgba, source):
        red, green, blue = colour[:3]
        luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
        if luminance < 0.7 and colorsys.rgb_to_hls(red, green, blue)[2] > 0.25:
            colours.append(colour)
    return [colours[i % len(colours)] for i in range(n)]


def _type_colours(labels: np.ndarray) -> tuple[list[tuple[str, Any]], np.ndarray]:
    """Legend entries (label, colour) and one RGBA colour per cell (N, 4).

    Real types get distinct colours, in natural order; labels that name no type ("Unknown",
    "Low quality", "Unassigned", ...) are grey and listed last. Beyond ``_MAX_TYPES`` types the
    rarest are grey, as "other".
    """
    counts = Counter(labels.tolist())
    named = [label for label in counts if not _NOT_A_TYPE.match(label.strip())]
    greyed = sorted((label for label in counts if label not in named), key=_natural_key)
    if len(named) > _MAX_TYPES:
        kept = {
            label for label, _ in Counter({k: counts[k] for k in named}).most_common(_MAX_TYPES - 1)
        }
    else:
        kept = set(named)
    named = sorted(kept, key=_natural_key)
    lookup = dict(zip(named, _palette(len(named)), strict=False))
    for k, label in enumerate(greyed):
        lookup[label] = _GREYS[k % len(_GREYS)]
    entries: list[tuple[str, Any]] = [(label, lookup[label]) for label in [*named, *greyed]]
    n_other = len(counts) - len(named) - len(greyed)
    other = _GREYS[len(greyed) % len(_GREYS)]
    if n_other:
        entries.append((f"other ({n_other} types)", other))
    colours = np.array([lookup.get(label, other) for label in labels.tolist()])
    return entries, colours


def _scatter_panel(ax: Axes, xy: np.ndarray, title: str, **kwargs: Any) -> Any:
    artist = ax.scatter(xy[:, 0], xy[:, 1], linewidths=0, rasterized=True, **kwargs)
    ax.set_title(title)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    return artist


def _legend(fig: Figure, entries: list[tuple[str, Any]]) -> None:
    handles = [
        Line2D([], [], marker="o", linestyle="", color=colour, label=label, markersize=6)
        for label, colour in entries
    ]
    fig.legend(
        handles=handles,
        title="cell type",
        loc="outside right center",
        frameon=False,
        fontsize="small",
        ncols=_legend_columns(len(handles)),
    )


def _legend_columns(n_entries: int) -> int:
    return 1 if n_entries <= 16 else 2


def _layout_figure(xy: np.ndarray, n_panels: int, legend: bool) -> Figure:
    """A figure whose panels fit the data's aspect, so no blank band is left around them."""
    panel_height = 4.5
    width = n_panels * panel_height * _aspect(xy) + (3.2 if legend else 0.8)
    return Figure(figsize=(width, panel_height + 0.9), layout="constrained")


def plot_layouts(
    true_pos: ArrayLike,
    pred_pos: ArrayLike,
    path: str | os.PathLike[str],
    *,
    cell_types: ArrayLike | None = None,
    title: str = "",
) -> Path:
    """Draw the true and the generated layout of one slice side by side and save a PNG.

    The generated layout is first mapped onto the true one by similarity Procrustes (rotation
    or reflection, translation, isotropic scale; fitted on all cells), so the panels share a
    frame. Both panels show the two coordinate axes along which the true positions vary most
    (see ``_display_axes``). At most 50,000 cells, the same ones in both panels, are drawn.
    Generated cells that are not the true ones (a generated tissue) are drawn by
    :func:`plot_tissues`.

    Parameters
    ----------
    true_pos, pred_pos
        Coordinates, shape (N, D) with D in {2, 3}, rows paired by cell.
    path, title
        Output PNG and figure title (see the module docstring).
    cell_types
        Shape (N,): colours cells by type, with a legend in natural order (up to 30 types;
        rarer ones grey, as "other"; labels such as "Unknown" or "Low quality" grey). Without
        it, cells are coloured by their true position along the first displayed axis, so a
        colour gradient shows where each cell was placed.

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
    aligned = procrustes_align(true_arr, pred_arr)
    axes = list(_display_axes(true_arr))
    keep = _subsample(n)
    true_xy, pred_xy = true_arr[keep][:, axes], aligned[keep][:, axes]
    size = _marker_size(len(keep))
    names = ("true", "generated (aligned)")

    fig = _layout_figure(true_xy, 2, legend=cell_types is not None)
    ax_true, ax_pred = fig.subplots(1, 2)
    if cell_types is not None:
        entries, colours = _type_colours(_type_labels(cell_types, n)[keep])
        _scatter_panel(ax_true, true_xy, names[0], c=colours, s=size)
        _scatter_panel(ax_pred, pred_xy, names[1], c=colours, s=size)
        _legend(fig, entries)
    else:
        shade = true_xy[:, 0]
        _scatter_panel(ax_true, true_xy, names[0], c=shade, cmap="viridis", s=size)
        artist = _scatter_panel(ax_pred, pred_xy, names[1], c=shade, cmap="viridis", s=size)
        fig.colorbar(
            artist,
            ax=[ax_true, ax_pred],
            shrink=0.7,
            label=f"true {_AXIS_NAMES[axes[0]]} position of each cell",
        )
    both = np.concatenate([true_xy, pred_xy])  # one frame: both panels span the cells of both
    for ax in (ax_true, ax_pred):
        ax.update_datalim(both)
        ax.autoscale_view()
    return _titled_png(fig, path, title)


@dataclass(frozen=True)
class TissuePanel:
    """One tissue of :func:`plot_tissues`: a title, cell coordinates (N, 2 or 3) and
    optionally a cell type per cell (N,)."""

    title: str
    positions: ArrayLike
    cell_types: ArrayLike | None = None


def _principal_frame(pos: np.ndarray) -> np.ndarray:
    """(D, D) orthonormal principal axes of centred ``pos`` (columns, largest variance first),
    each signed so that the cells' projections on it have a positive third moment."""
    centred = pos - pos.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt.T
    skew = ((centred @ axes) ** 3).mean(axis=0)
    return axes * np.where(skew < 0, -1.0, 1.0)


def _orient_like(pos: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``pos`` turned so that its principal axes lie on those of ``reference`` and moved to its
    centre; no scaling. Tissues that are not the same cells have no cell-to-cell alignment,
    but a generated tissue is defined only up to rotation and reflection, and this shows it in
    the reference's orientation wherever their shapes make the principal axes agree."""
    if len(pos) < pos.shape[1] + 1 or len(reference) < reference.shape[1] + 1:
        return pos
    turned = (pos - pos.mean(axis=0)) @ _principal_frame(pos) @ _principal_frame(reference).T
    return turned + reference.mean(axis=0)


def plot_tissues(
    rows: Sequence[Sequence[TissuePanel]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
) -> Path:
    """Draw tissues that are not the same cells (a generated tissue beside its reference) in a
    grid of panels, one colour per cell type across every panel, and save a PNG.

    The first panel of each row is drawn as it is, on the two coordinate axes along which it
    varies most (see ``_display_axes``); the other panels of the row (with as many coordinate
    columns) are turned onto its principal axes (see ``_orient_like``) and keep their own
    extent. At most 50,000 cells are
    drawn per panel.

    Parameters
    ----------
    rows
        Rows of :class:`TissuePanel` (e.g. one row per slice: reference, generated). Panels
        with cell types are coloured by them, with one legend; panels without are drawn plainly.
    path, title
        Output PNG and figure title (see the module docstring).
    """
    grid = [list(row) for row in rows if len(row)]
    if not grid:
        raise ValueError("rows holds no panel to draw.")
    positions = [
        [_positions(p.positions, f"positions of {p.title!r}") for p in row] for row in grid
    ]
    drawn = []
    for row, arrays in zip(grid, positions, strict=True):
        first = arrays[0]
        row_xy = []
        for k, (panel, pos) in enumerate(zip(row, arrays, strict=True)):
            keep = _subsample(len(pos))
            like_first = k > 0 and pos.shape[1] == first.shape[1]
            turned = _orient_like(pos, first) if like_first else pos
            axes = list(_display_axes(first if like_first else pos))
            labels = None
            if panel.cell_types is not None:
                labels = _type_labels(panel.cell_types, len(pos))[keep]
            row_xy.append((panel.title, turned[keep][:, axes], labels))
        drawn.append(row_xy)
    typed = [labels for row in drawn for _, _, labels in row if labels is not None]
    entries, colours = _type_colours(np.concatenate(typed)) if typed else ([], None)

    n_cols = max(len(row) for row in drawn)
    aspect = float(np.median([_aspect(xy) for row in drawn for _, xy, _ in row]))
    panel_height = 4.0
    legend_width = 3.2 * _legend_columns(len(entries)) if entries else 0.8
    fig = Figure(
        figsize=(n_cols * panel_height * aspect + legend_width, len(drawn) * panel_height + 0.9),
        layout="constrained",
    )
    axes_grid = np.atleast_2d(fig.subplots(len(drawn), n_cols, squeeze=False))
    offset = 0
    for r, row in enumerate(drawn):
        for c in range(n_cols):
            ax = axes_grid[r, c]
            if c >= len(row):
                ax.set_axis_off()
                continue
            panel_title, xy, labels = row[c]
            size = _marker_size(len(xy))
            if labels is not None and colours is not None:
                colour = colours[offset : offset + len(labels)]
                offset += len(labels)
                _scatter_panel(ax, xy, panel_title, c=colour, s=size)
            else:
                _scatter_panel(ax, xy, panel_title, c="#3b6ea5", s=size)
    if entries:
        _legend(fig, entries)
    return _titled_png(fig, path, title)


def plot_layout(
    positions: ArrayLike,
    path: str | os.PathLike[str],
    *,
    cell_types: ArrayLike | None = None,
    title: str = "",
) -> Path:
    """Draw one generated layout (no truth to compare with) and save a PNG.

    Parameters
    ----------
    positions
        Coordinates, shape (N, D) with D in {2, 3}; the two axes of largest variance are drawn.
    path, title
        Output PNG and figure title (see the module docstring).
    cell_types
        Shape (N,): colours cells by type, with a legend (as :func:`plot_layouts`).
    """
    pos = _positions(positions, "positions")
    keep = _subsample(len(pos))
    xy = pos[keep][:, list(_display_axes(pos))]
    size = _marker_size(len(keep))
    fig = _layout_figure(xy, 1, legend=cell_types is not None)
    ax = fig.subplots(1, 1)
    if cell_types is not None:
        entries, colours = _type_colours(_type_labels(cell_types, len(pos))[keep])
        _scatter_panel(ax, xy, "generated", c=colours, s=size)
        _legend(fig, entries)
    else:
        _scatter_panel(ax, xy, "generated", c="#3b6ea5", s=size)
    return _titled_png(fig, path, title)


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
    true_expr: ArrayLike | None,
    pred_expr: ArrayLike,
    gene_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    n_genes: int = 4,
    genes: Sequence[str] | None = None,
    gene_mask: ArrayLike | None = None,
    title: str = "",
) -> Path:
    """Draw measured (top row) and predicted (bottom row) expression of a few genes in space.

    Each gene's two panels share one colour scale (1st to 99th percentile of both), so a
    prediction on the wrong level shows as a brighter or darker panel. The lower title gives
    the Pearson correlation across all cells. At most 50,000 cells are drawn.

    Parameters
    ----------
    positions
        Coordinates, shape (N, D) with D in {2, 3}; the two axes of largest variance are drawn.
    true_expr, pred_expr
        Expression, shape (N, G). ``true_expr`` None (or no measured gene in ``gene_mask``):
        only the predictions are drawn, for the genes that vary most in them.
    gene_names
        G names, in column order.
    path, title
        Output PNG and figure title (see the module docstring).
    n_genes
        How many genes to draw when ``genes`` is not given: the ``n_genes`` measured genes with
        the highest variance in ``true_expr``.
    genes
        Names of the genes to draw, in order; overrides ``n_genes`` and ``gene_mask``.
    gene_mask
        Bool array, shape (G,): the measured genes (the others have no truth to draw).
    """
    pos = _positions(positions, "positions")
    pred_arr = np.asarray(pred_expr)
    measured = None if gene_mask is None else np.asarray(gene_mask, dtype=bool)
    truth = true_expr is not None and (measured is None or bool(measured.any()))
    true_arr = np.asarray(true_expr) if truth else pred_arr
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
    chosen = _select_genes(true_arr, gene_names, genes, measured if truth else None, n_genes)
    keep = _subsample(len(pos))
    xy = pos[keep][:, list(_display_axes(pos))]
    size = _marker_size(len(keep))

    rows = 2 if truth else 1
    panel = 3.4
    fig = Figure(
        figsize=(panel * _aspect(xy) * len(chosen) + 0.4, rows * panel + 1.3 + 0.4 * bool(title)),
        layout="constrained",
    )
    grid = np.asarray(fig.subplots(rows, len(chosen), squeeze=False))
    for col, gene in enumerate(chosen):
        t = true_arr[:, gene].astype(np.float64)
        p = pred_arr[:, gene].astype(np.float64)
        shown = np.concatenate([t[keep], p[keep]]) if truth else p[keep]
        low, high = np.percentile(shown, [1, 99])
        high = high if high > low else low + 1.0
        style = {"cmap": "magma", "vmin": low, "vmax": high, "s": size}
        if truth:
            has_truth = measured is None or bool(measured[gene])
            label = "measured" if has_truth else "not measured"
            _scatter_panel(grid[0, col], xy, f"{gene_names[gene]}: {label}", c=t[keep], **style)
            r = f"Pearson r = {_pcc(t, p):.2f}" if has_truth else "no truth"
            name = f"predicted ({r})"
        else:
            name = f"{gene_names[gene]}: predicted"
        artist = _scatter_panel(grid[-1, col], xy, name, c=p[keep], **style)
        fig.colorbar(
            artist,
            ax=grid[:, col].tolist(),
            shrink=0.7,
            location="bottom",
            label="expression (log-normalised)",
        )
    return _titled_png(fig, path, title)

"""Tests for alphastomics.evaluation.figures: valid PNGs, written atomically."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread
from scipy.spatial.distance import pdist

from alphastomics.evaluation import figures
from alphastomics.evaluation.figures import (
    TissuePanel,
    plot_genes,
    plot_layout,
    plot_layouts,
    plot_tissues,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    assert image.ndim == 3
    assert image.shape[0] > 100
    assert image.shape[1] > 100
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def _slice(n: int = 400, d: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = rng.random((n, d)) * ([8.0, 4.0, 0.5] if d == 3 else [8.0, 4.0])
    theta = 1.1
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pred = true.copy()
    pred[:, :2] = 3.0 * true[:, :2] @ rot.T + 5.0
    return true, pred + rng.normal(scale=0.05, size=pred.shape)


def test_plot_layouts_with_cell_types(tmp_path: Path) -> None:
    true, pred = _slice()
    types = np.array([f"type {i % 35}" for i in range(len(true))], dtype=object)
    types[:5] = None
    out = plot_layouts(true, pred, tmp_path / "sub" / "layout.png", cell_types=types, title="t")
    assert out == tmp_path / "sub" / "layout.png"
    _assert_png(out)


def test_plot_layouts_2d_without_cell_types(tmp_path: Path) -> None:
    true, pred = _slice(d=2)
    _assert_png(plot_layouts(true, pred, tmp_path / "layout.png"))


def test_plot_layouts_rejects_mismatched_shapes(tmp_path: Path) -> None:
    true, pred = _slice()
    with pytest.raises(ValueError, match="same shape"):
        plot_layouts(true, pred[:-1], tmp_path / "layout.png")
    assert not any(tmp_path.iterdir())


def test_plot_genes_default_and_named(tmp_path: Path) -> None:
    pos, _ = _slice()
    rng = np.random.default_rng(1)
    true = np.column_stack([pos[:, 0], pos[:, 1], rng.random(len(pos)), np.zeros(len(pos))])
    pred = true + rng.normal(scale=0.1, size=true.shape)
    names = ["a", "b", "c", "d"]
    _assert_png(plot_genes(pos, true, pred, names, tmp_path / "auto" / "genes.png", n_genes=3))
    _assert_png(plot_genes(pos, true, pred, names, tmp_path / "named" / "genes.png", genes=["d"]))
    with pytest.raises(ValueError, match="not in gene_names"):
        plot_genes(pos, true, pred, names, tmp_path / "bad.png", genes=["zz"])


def test_failed_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    true, pred = _slice()
    target = tmp_path / "layout.png"
    target.write_bytes(b"previous figure")

    def broken_savefig(self: Figure, fname: Path, **kwargs: object) -> None:
        Path(fname).write_bytes(PNG_MAGIC)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="No space left") as failed:
        plot_layouts(true, pred, target)
    assert failed.value.filename == str(target)
    assert target.read_bytes() == b"previous figure"
    assert [p.name for p in tmp_path.iterdir()] == ["layout.png"]


def test_tissues_of_different_sizes_are_drawn_side_by_side(tmp_path):
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(200, 2)) * 10
    generated = rng.normal(size=(350, 3))
    rows = [[TissuePanel("reference", reference), TissuePanel("generated", generated)]]
    _assert_png(plot_tissues(rows, tmp_path / "joint.png", title="t"))


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Figures as they would be saved (laid out), instead of PNG files."""
    made: list[Figure] = []

    def keep(fig: Figure, path: object) -> Path:
        fig.draw_without_rendering()
        made.append(fig)
        return Path(str(path))

    monkeypatch.setattr(figures, "_write_png", keep)
    return made


def _panels(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _titles(fig: Figure) -> str:
    suptitle = fig.get_suptitle() if hasattr(fig, "get_suptitle") else ""
    return " | ".join([suptitle, *(ax.get_title() for ax in _panels(fig))])


def test_figures_fill_their_canvas_and_label_every_colourbar(
    drawn: list[Figure], tmp_path: Path
) -> None:
    """No blank band: the panels cover most of the figure (aspect kept by the data limits)."""
    true, pred = _slice(n=600)
    rng = np.random.default_rng(2)
    expr = rng.random((len(true), 4))
    plot_layouts(true * 100, pred, tmp_path / "a.png", title="slice_5: placed")
    tissues = [[TissuePanel("reference", true * 100), TissuePanel("generated", pred * 0.5)]]
    plot_tissues(tissues, tmp_path / "b.png", title="t")
    plot_genes(true, expr, expr + 0.1 * rng.random(expr.shape), list("abcd"), tmp_path / "c.png")
    for fig in drawn:
        area = sum(ax.get_position().width * ax.get_position().height for ax in _panels(fig))
        assert area > 0.75, _titles(fig)
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert all(bar.get_xlabel() or bar.get_ylabel() for bar in bars)
    assert [len([a for a in f.axes if a.get_label() == "<colorbar>"]) for f in drawn] == [1, 0, 4]
    assert _titles(drawn[2]).count("Pearson r = ") == 4


def test_cell_type_legend_is_sorted_with_non_types_grey_and_last() -> None:
    labels = ["type 10", "Low quality", "type 2", "unknown", "type 1", "Unassigned"]
    entries, colours = figures._type_colours(np.array(labels * 3, dtype=object))
    names = [label for label, _ in entries]
    assert names == ["type 1", "type 2", "type 10", "Low quality", "Unassigned", "unknown"]
    for label, colour in entries:
        grey = colour[0] == colour[1] == colour[2]
        assert grey == (label in ("Low quality", "Unassigned", "unknown")), label
    assert colours.shape == (18, 4)


@pytest.mark.parametrize("n_types", [8, 24])
def test_cell_types_get_distinct_colours(n_types: int) -> None:
    entries, _ = figures._type_colours(np.array([f"t{i}" for i in range(n_types)], dtype=object))
    rgb = np.array([colour[:3] for _, colour in entries])
    assert pdist(rgb).min() > 0.15
    assert all(0.2126 * r + 0.7152 * g + 0.0722 * b < 0.7 for r, g, b in rgb)  # seen on white


def test_generated_layout_without_truth_is_one_panel_named_generated(
    drawn: list[Figure], tmp_path: Path
) -> None:
    _, pred = _slice()
    types = np.array([f"type {i % 3}" for i in range(len(pred))], dtype=object)
    plot_layout(pred, tmp_path / "alone.png", cell_types=types, title="s: placed")
    (panel,) = _panels(drawn[0])
    assert panel.get_title() == "generated" and "true" not in _titles(drawn[0])
    assert [t.get_text() for t in drawn[0].legends[0].get_texts()] == [
        "type 0",
        "type 1",
        "type 2",
    ]


def test_tissues_share_one_colour_per_cell_type_across_panels(
    drawn: list[Figure], tmp_path: Path
) -> None:
    reference, generated = _slice()
    types = np.array([f"type {i % 3}" for i in range(len(reference))], dtype=object)
    fewer = generated[:150]
    predicted = np.array([f"type {i % 4}" for i in range(len(fewer))], dtype=object)
    rows = [
        [
            TissuePanel("a: reference", reference, types),
            TissuePanel("a: generated", fewer, predicted),
        ],
        [TissuePanel("b: generated", generated)],
    ]
    plot_tissues(rows, tmp_path / "j.png")
    fig = drawn[0]
    assert [ax.get_title() for ax in _panels(fig) if ax.axison] == [
        "a: reference",
        "a: generated",
        "b: generated",
    ]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [f"type {i}" for i in range(4)]

    def colour_of(ax, labels):
        colours = ax.collections[0].get_facecolors()
        return {label: tuple(colours[labels == label][0]) for label in np.unique(labels)}

    ref_ax, gen_ax, plain_ax = (ax for ax in _panels(fig) if ax.axison)
    on_reference, on_generated = colour_of(ref_ax, types), colour_of(gen_ax, predicted)
    assert all(on_generated[t] == on_reference[t] for t in on_reference)
    assert len(set(on_generated.values())) == 4
    assert len(np.unique(plain_ax.collections[0].get_facecolors(), axis=0)) == 1


def test_tissues_are_turned_onto_the_reference_principal_axes() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(500, 2)) * [6.0, 1.0]
    reference[:, 0] += 3.0 * (reference[:, 0] > 0)  # skewed along x: its sign is recoverable
    theta = 0.9
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    other = reference[rng.permutation(500)] @ rot.T + 40.0  # the same shape, turned and moved
    turned = figures._orient_like(other, reference)
    np.testing.assert_allclose(turned.mean(axis=0), reference.mean(axis=0), atol=1e-9)
    frame = figures._principal_frame(turned)
    np.testing.assert_allclose(np.abs(np.diag(frame.T @ figures._principal_frame(reference))), 1)
    np.testing.assert_allclose(np.sort(turned[:, 0]), np.sort(reference[:, 0]), atol=1e-6)


def test_genes_without_truth_draw_predictions_only(drawn: list[Figure], tmp_path: Path) -> None:
    pos, _ = _slice()
    pred = np.random.default_rng(3).random((len(pos), 5))
    mask = np.zeros(5, dtype=bool)
    plot_genes(pos, np.zeros_like(pred), pred, list("abcde"), tmp_path / "g.png", gene_mask=mask)
    titles = [ax.get_title() for ax in _panels(drawn[0])]
    assert len(titles) == 4 and all(t.endswith(": predicted") for t in titles)


def test_a_two_column_legend_gets_its_own_width(drawn: list[Figure], tmp_path: Path) -> None:
    """24 cell types (seqFISH) make a two-column legend; the panels keep their share of the
    figure instead of being squeezed by it."""
    reference, generated = _slice(n=600, d=2)
    widths = []
    for n_types in (4, 24):
        types = np.array([f"type {i % n_types}" for i in range(len(reference))], dtype=object)
        rows = [
            [TissuePanel("reference", reference, types), TissuePanel("generated", generated, types)]
        ]
        plot_tissues(rows, tmp_path / f"{n_types}.png", title="t")
        fig = drawn[-1]
        legend = fig.legends[0]
        assert legend._ncols == (1 if n_types <= 16 else 2)
        legend_width = legend.get_window_extent().width / fig.bbox.width
        panels = sum(ax.get_position().width for ax in _panels(fig) if ax.axison)
        assert panels + legend_width <= 1.0
        widths.append(panels * fig.get_size_inches()[0])  # inches of panel
    assert widths[1] >= 0.98 * widths[0]  # a one-column allowance left them 6% narrower

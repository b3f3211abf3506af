"""Tests for alphastomics.utils.figures: valid PNGs, written atomically."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from alphastomics.utils.figures import plot_genes, plot_layouts

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


def test_unpaired_layouts_are_not_aligned(tmp_path):
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(200, 2)) * 10
    generated = rng.normal(size=(200, 2))
    path = plot_layouts(reference, generated, tmp_path / "joint.png", paired=False)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

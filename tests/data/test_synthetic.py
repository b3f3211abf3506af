"""synthetic_tissue: layout, determinism, spatial signal, speed and memory at 200k cells."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.stats import spearmanr

from alphastomics.data.synthetic import synthetic_tissue
from alphastomics.errors import UserInputError


def _log_normalised(x: np.ndarray) -> np.ndarray:
    return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)


def _neighbour_correlation(x: np.ndarray, positions: np.ndarray, k: int = 10) -> float:
    """Mean over genes of the Pearson correlation between a cell and its k neighbours' mean."""
    _, neighbours = cKDTree(positions).query(positions, k=k + 1)
    smoothed = x[neighbours[:, 1:]].mean(axis=1)
    xc, sc = x - x.mean(axis=0), smoothed - smoothed.mean(axis=0)
    r = (xc * sc).sum(axis=0) / np.sqrt((xc**2).sum(axis=0) * (sc**2).sum(axis=0))
    return float(r.mean())


@pytest.mark.parametrize(
    ("n_cells", "n_genes", "n_slices", "n_cell_types"), [(3000, 60, 4, 6), (101, 7, 3, 2)]
)
def test_layout_and_types(n_cells: int, n_genes: int, n_slices: int, n_cell_types: int) -> None:
    adata = synthetic_tissue(n_cells, n_genes, n_slices, n_cell_types, seed=3)
    assert adata.shape == (n_cells, n_genes)
    assert adata.X.dtype == np.float32
    assert np.array_equal(adata.X, np.round(adata.X)) and adata.X.min() >= 0
    ccf = adata.obsm["ccf"]
    assert ccf.shape == (n_cells, 3) and ccf.dtype == np.float32
    assert list(adata.obs["slice"].cat.categories) == [f"slice_{k}" for k in range(n_slices)]
    assert list(adata.obs["cell_type"].cat.categories) == [f"type_{k}" for k in range(n_cell_types)]
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    # Slices are consecutive, non-overlapping cuts along z (the default slice_axis).
    codes = adata.obs["slice"].cat.codes.to_numpy()
    assert np.all(np.diff(codes) >= 0)
    edges = np.linspace(0.0, 400.0, n_slices + 1)
    for k in range(n_slices):
        z = ccf[codes == k, 2]
        assert z.min() >= edges[k] - 1e-3 and z.max() <= edges[k + 1] + 1e-3


def test_deterministic_by_seed() -> None:
    a, b = synthetic_tissue(500, seed=7), synthetic_tissue(500, seed=7)
    c = synthetic_tissue(500, seed=8)
    assert np.array_equal(a.X, b.X)
    assert np.array_equal(a.obsm["ccf"], b.obsm["ccf"])
    assert a.obs.equals(b.obs)
    assert not np.array_equal(a.X, c.X)


def test_log_normalised_output_matches_counts() -> None:
    counts = synthetic_tissue(400, 20, seed=2, counts=True).X
    lognorm = synthetic_tissue(400, 20, seed=2, counts=False).X
    assert not np.array_equal(lognorm, np.round(lognorm))
    np.testing.assert_allclose(lognorm, _log_normalised(counts.astype(np.float64)), rtol=1e-5)


def test_expression_follows_space() -> None:
    adata = synthetic_tissue(3000, 60, seed=0)
    x = _log_normalised(adata.X.astype(np.float64))
    positions = adata.obsm["ccf"]
    shuffled = np.random.default_rng(0).permutation(positions)
    real, control = _neighbour_correlation(x, positions), _neighbour_correlation(x, shuffled)
    assert real > 0.3
    assert abs(control) < 0.05
    # Noisy, not trivial: a cell is not a copy of its neighbourhood.
    assert real < 0.9


def test_position_recoverable_along_every_axis() -> None:
    adata = synthetic_tissue(3000, 60, seed=0)
    x = _log_normalised(adata.X.astype(np.float64))
    positions = adata.obsm["ccf"].astype(np.float64)
    train = np.random.default_rng(0).random(len(x)) < 0.7
    design = np.column_stack([x, np.ones(len(x))])
    coef, *_ = np.linalg.lstsq(design[train], positions[train], rcond=None)
    predicted = design[~train] @ coef
    for axis in range(3):
        r = np.corrcoef(predicted[:, axis], positions[~train, axis])[0, 1]
        assert 0.6 < r < 0.99


def test_cell_types_are_layered_along_y() -> None:
    adata = synthetic_tissue(3000, 20, n_cell_types=6, seed=1, type_mixing=0.0)
    rho = spearmanr(adata.obs["cell_type"].cat.codes, adata.obsm["ccf"][:, 1]).statistic
    assert rho > 0.8
    mixed = synthetic_tissue(3000, 20, n_cell_types=6, seed=1, type_mixing=0.5)
    assert spearmanr(mixed.obs["cell_type"].cat.codes, mixed.obsm["ccf"][:, 1]).statistic < rho


def test_thin_sections_and_other_axis() -> None:
    adata = synthetic_tissue(800, 10, n_slices=4, seed=0, slice_axis=0, section_thickness=10.0)
    x = adata.obsm["ccf"][:, 0]
    for k, centre in enumerate([100.0, 300.0, 500.0, 700.0]):
        in_slice = x[adata.obs["slice"].cat.codes.to_numpy() == k]
        assert np.all(np.abs(in_slice - centre) <= 5.0 + 1e-3)


def test_poisson_and_position_key() -> None:
    adata = synthetic_tissue(300, 10, seed=0, dispersion=None, position_key="spatial")
    assert "spatial" in adata.obsm and "ccf" not in adata.obsm


@pytest.mark.parametrize(
    "kwargs",
    [{"n_cells": 0}, {"n_genes": 0}, {"n_slices": 0}, {"slice_axis": 3}, {"type_mixing": 2.0}],
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(UserInputError, match="synthetic_tissue"):
        synthetic_tissue(**kwargs)


def test_200k_cells_fast_and_small() -> None:
    tracemalloc.start()
    start = time.perf_counter()
    adata = synthetic_tissue(200_000, 60, n_slices=1, seed=0)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert adata.shape == (200_000, 60)
    assert elapsed < 15.0  # about 2-3 s on one core; generous for a shared machine
    assert peak < 2.5 * adata.X.nbytes  # the output plus a few row chunks

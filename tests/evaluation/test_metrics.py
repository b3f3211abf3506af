"""Known-answer tests for alphastomics.evaluation.metrics."""

from __future__ import annotations

import math
import time
import tracemalloc

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.spatial.transform import Rotation
from scipy.stats import spearmanr

from alphastomics.evaluation.metrics import (
    clustering_metrics,
    expression_metrics,
    morans_i,
    position_metrics,
    procrustes_align,
    spatial_metrics,
    summarize,
)


def _layout(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pos = rng.random((n, d)) * 10.0
    if d == 3:
        pos[:, 2] *= 0.3  # a thick slab, like a registered 3D section
    return pos


def _similarity(pos: np.ndarray, seed: int = 1) -> np.ndarray:
    """A random rotation, a reflection, a scale of 2.5 and a translation of ``pos``."""
    d = pos.shape[1]
    rot = Rotation.random(random_state=seed).as_matrix()[:d, :d] if d == 3 else None
    if rot is None:
        theta = 0.9
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    reflect = np.diag([-1.0] + [1.0] * (d - 1))
    return 2.5 * pos @ rot.T @ reflect + np.arange(1, d + 1) * 7.0


# ---------------------------------------------------------------------------------------------
# positions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3])
def test_position_identity_is_perfect(d: int) -> None:
    pos = _layout(400, d)
    m = position_metrics(pos, pos)
    assert m["distance_spearman_median"] == pytest.approx(1.0)
    assert m["distance_spearman_mean"] == pytest.approx(1.0)
    assert m["procrustes_disparity"] == pytest.approx(0.0, abs=1e-12)
    assert m["procrustes_rmsd"] == pytest.approx(0.0, abs=1e-9)
    assert m["distance_mse"] == pytest.approx(0.0, abs=1e-12)
    assert m["distance_mse_unscaled"] == 0.0
    assert m["knn_preservation"] == 1.0
    assert m["knn_jaccard"] == 1.0
    assert m["contact_f1"] == 1.0
    assert (m["n_cells"], m["n_anchors"], m["anchored"]) == (400, 400, False)


@pytest.mark.parametrize("d", [2, 3])
def test_position_similarity_transform_is_perfect(d: int) -> None:
    pos = _layout(400, d)
    moved = _similarity(pos)
    m = position_metrics(pos, moved)
    assert m["procrustes_disparity"] == pytest.approx(0.0, abs=1e-12)
    assert m["procrustes_rmsd"] == pytest.approx(0.0, abs=1e-9)
    assert m["distance_spearman_median"] == pytest.approx(1.0, abs=1e-9)
    assert m["knn_preservation"] == pytest.approx(1.0)
    assert m["contact_f1"] == pytest.approx(1.0, abs=1e-3)
    # the scaled distance MSE ignores the global scale; the unscaled one does not
    assert m["distance_scale"] == pytest.approx(1 / 2.5)
    assert m["distance_mse"] == pytest.approx(0.0, abs=1e-9)
    assert m["distance_mse_unscaled"] > 1.0
    np.testing.assert_allclose(procrustes_align(pos, moved), pos, atol=1e-9)


def test_position_shuffled_is_chance() -> None:
    n, k = 2000, 10
    pos = _layout(n, 2)
    shuffled = pos[np.random.default_rng(3).permutation(n)]
    m = position_metrics(pos, shuffled, k=k)
    assert abs(m["distance_spearman_median"]) < 0.05
    assert m["knn_preservation"] < 5 * k / n
    assert m["contact_f1"] < 0.05
    assert m["procrustes_disparity"] > 0.9


def test_distance_spearman_matches_scipy_rows() -> None:
    pos = _layout(60, 2)
    noisy = pos + np.random.default_rng(4).normal(scale=1.0, size=pos.shape)
    m = position_metrics(pos, noisy)
    d_true, d_pred = cdist(pos, pos), cdist(noisy, noisy)
    rows = [
        spearmanr(np.delete(d_true[i], i), np.delete(d_pred[i], i)).statistic for i in range(60)
    ]
    assert m["distance_spearman_median"] == pytest.approx(np.median(rows))
    assert m["distance_spearman_mean"] == pytest.approx(np.mean(rows))


def test_anchored_agrees_with_exact() -> None:
    pos = _layout(3000, 3)
    noisy = pos + np.random.default_rng(5).normal(scale=0.5, size=pos.shape)
    exact = position_metrics(pos, noisy, max_anchors=3000)
    anchored = position_metrics(pos, noisy, max_anchors=300, seed=7)
    assert (exact["anchored"], exact["n_anchors"]) == (False, 3000)
    assert (anchored["anchored"], anchored["n_anchors"]) == (True, 300)
    assert anchored["distance_spearman_median"] == pytest.approx(
        exact["distance_spearman_median"], abs=0.01
    )
    assert anchored["distance_mse"] == pytest.approx(exact["distance_mse"], rel=0.1)
    assert anchored["distance_mse_unscaled"] == pytest.approx(
        exact["distance_mse_unscaled"], rel=0.1
    )
    assert anchored["contact_f1"] == pytest.approx(exact["contact_f1"], abs=0.03)
    # linear-cost metrics do not depend on anchors
    assert anchored["knn_preservation"] == exact["knn_preservation"]
    assert anchored["procrustes_disparity"] == exact["procrustes_disparity"]


def test_anchors_are_seeded() -> None:
    pos = _layout(500, 2)
    noisy = pos + np.random.default_rng(6).normal(size=pos.shape)
    first = position_metrics(pos, noisy, max_anchors=50, seed=1)
    again = position_metrics(pos, noisy, max_anchors=50, seed=1)
    other = position_metrics(pos, noisy, max_anchors=50, seed=2)
    assert first == again
    assert first["distance_spearman_mean"] != other["distance_spearman_mean"]


def test_100k_cells_never_build_an_n_by_n_matrix() -> None:
    n = 100_000
    pos = _layout(n, 3)
    noisy = pos + np.random.default_rng(8).normal(scale=0.05, size=pos.shape)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        m = position_metrics(pos, noisy, max_anchors=100)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.005 * n * n * 4  # 200 MB, against 40 GB for one float32 N×N matrix
    assert elapsed < 60
    assert (m["n_cells"], m["n_anchors"], m["anchored"]) == (n, 100, True)
    assert m["distance_spearman_median"] > 0.99


def test_collapsed_prediction_gives_nan_not_error() -> None:
    pos = _layout(50, 2)
    m = position_metrics(pos, np.zeros_like(pos))
    assert math.isnan(m["procrustes_disparity"])
    assert math.isnan(m["distance_spearman_median"])
    assert m["distance_mse_relative"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("true", "pred"),
    [
        (np.zeros((10, 4)), np.zeros((10, 4))),  # D = 4
        (np.zeros((10, 2)), np.zeros((9, 2))),  # unpaired rows
        (np.full((10, 2), np.nan), np.zeros((10, 2))),  # NaN
    ],
)
def test_position_bad_input_raises(true: np.ndarray, pred: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"true|pred"):
        position_metrics(true, pred)


# ---------------------------------------------------------------------------------------------
# expression
# ---------------------------------------------------------------------------------------------


def _expression(n: int = 300, g: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, size=(n, g))


def test_expression_identity_and_offset() -> None:
    x = _expression()
    m = expression_metrics(x, x)
    for key in (
        "pcc_gene_mean",
        "pcc_gene_median",
        "spearman_gene_mean",
        "spearman_gene_median",
        "pcc_cell_mean",
        "spearman_cell_median",
    ):
        assert m[key] == pytest.approx(1.0)
    assert m["mse"] == 0.0
    assert m["mae"] == 0.0
    shifted = expression_metrics(x, x + 0.5)
    assert shifted["mse"] == pytest.approx(0.25)
    assert shifted["mae"] == pytest.approx(0.5)
    assert shifted["pcc_gene_mean"] == pytest.approx(1.0)


def test_expression_gene_correlations_match_scipy() -> None:
    x = _expression()
    y = x + np.random.default_rng(1).normal(size=x.shape)
    y[:40, 0] = 3.0  # ties
    m = expression_metrics(x, y)
    rho = [spearmanr(x[:, j], y[:, j]).statistic for j in range(x.shape[1])]
    pcc = [np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(x.shape[1])]
    assert m["spearman_gene_mean"] == pytest.approx(np.mean(rho))
    assert m["spearman_gene_median"] == pytest.approx(np.median(rho))
    assert m["pcc_gene_median"] == pytest.approx(np.median(pcc))
    cell_rho = [spearmanr(x[i], y[i]).statistic for i in range(x.shape[0])]
    assert m["spearman_cell_mean"] == pytest.approx(np.mean(cell_rho))


def test_gene_mask_excludes_genes_and_constant_genes_are_skipped() -> None:
    x = _expression()
    y = x + np.random.default_rng(2).normal(scale=0.3, size=x.shape)
    y[:, 3] = 1e6  # an unmeasured gene with a wild prediction
    x[:, 5] = 2.0  # a constant gene
    mask = np.ones(x.shape[1], dtype=bool)
    mask[3] = False
    masked = expression_metrics(x, y, gene_mask=mask)
    subset = expression_metrics(x[:, mask], y[:, mask])
    assert masked == pytest.approx(subset)
    assert masked["n_genes"] == 11
    assert masked["n_genes_skipped"] == 1
    assert masked["n_genes_scored"] == 10
    assert masked["mse"] < 1.0


def test_gene_mask_must_be_bool_of_length_g() -> None:
    x = _expression()
    with pytest.raises(ValueError, match="gene_mask"):
        expression_metrics(x, x, gene_mask=np.ones(5, dtype=bool))
    with pytest.raises(ValueError, match="gene_mask"):
        expression_metrics(x, x, gene_mask=np.zeros(x.shape[1], dtype=bool))


# ---------------------------------------------------------------------------------------------
# spatial autocorrelation
# ---------------------------------------------------------------------------------------------


def test_morans_i_gradient_high_shuffled_near_zero() -> None:
    pos = _layout(1500, 2)
    rng = np.random.default_rng(9)
    gradient = pos[:, 0] + 0.5 * pos[:, 1]
    values = np.column_stack([gradient, rng.permutation(gradient), np.ones(len(pos))])
    result = morans_i(values, pos, k=10)
    assert result.shape == (3,)
    assert result[0] > 0.9
    assert abs(result[1]) < 0.05
    assert math.isnan(result[2])
    assert morans_i(gradient, pos).shape == (1,)


def test_spatial_metrics_agreement_and_gene_mask() -> None:
    pos = _layout(800, 3)
    rng = np.random.default_rng(10)
    smooth = np.column_stack([pos[:, 0], pos[:, 1] ** 2, np.sin(pos[:, 0])])
    noise = rng.normal(size=(800, 2))
    true = np.column_stack([smooth, noise])
    same = spatial_metrics(true, true, pos)
    assert same["morans_i_pearson"] == pytest.approx(1.0)
    assert same["morans_i_abs_diff_mean"] == 0.0
    assert same["morans_i_n_genes"] == 5
    pred = true.copy()
    pred[:, 4] = pos[:, 0]  # an unmeasured gene, wrongly smooth: masked out, must not matter
    mask = np.array([True, True, True, True, False])
    masked = spatial_metrics(true, pred, pos, gene_mask=mask)
    assert masked["morans_i_n_genes"] == 4
    assert masked["morans_i_abs_diff_mean"] == 0.0
    assert masked["morans_i_true_mean"] > 0.4


# ---------------------------------------------------------------------------------------------
# clustering
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_per_blob", [100, 7000])  # the second takes the MiniBatchKMeans path
def test_clustering_separated_blobs(n_per_blob: int) -> None:
    rng = np.random.default_rng(11)
    centres = np.array([[0, 0, 0], [20, 0, 0], [0, 20, 0], [0, 0, 20]], dtype=float)
    codes = np.repeat(np.arange(4), n_per_blob)
    features = centres[codes] + rng.normal(size=(len(codes), 3))
    labels = np.array(["neuron", "glia", "endo", "immune"], dtype=object)[codes]
    labels[:3] = [None, "", np.nan]  # unlabelled cells are ignored
    m = clustering_metrics(features, labels)
    assert m["ari"] == pytest.approx(1.0)
    assert m["nmi"] == pytest.approx(1.0)
    assert m["accuracy"] == pytest.approx(1.0)
    assert (m["n_clusters"], m["n_labels"], m["n_cells_labelled"]) == (4, 4, len(codes) - 3)


def test_clustering_integer_codes_ignore_minus_one() -> None:
    rng = np.random.default_rng(12)
    codes = np.repeat(np.arange(3), 50)
    features = np.eye(3)[codes] * 30 + rng.normal(size=(150, 3))
    labels = codes.copy()
    labels[::10] = -1
    m = clustering_metrics(features, labels)
    assert m["n_cells_labelled"] == 135
    assert m["accuracy"] == pytest.approx(1.0)
    more = clustering_metrics(features, labels, n_clusters=6)
    assert more["n_clusters"] == 6
    assert more["accuracy"] < 1.0


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------


def test_summarize_weights_counts_and_nan() -> None:
    slices = [
        {"pcc_gene_mean": 0.5, "n_cells": 100, "anchored": False, "mode": "expr_to_pos"},
        {"pcc_gene_mean": 1.0, "n_cells": 300, "anchored": True, "contact_f1": math.nan},
    ]
    equal = summarize(slices)
    assert equal["pcc_gene_mean"] == pytest.approx(0.75)
    assert equal["n_cells"] == 400
    assert equal["anchored"] is True
    assert equal["n_slices"] == 2
    assert math.isnan(equal["contact_f1"])
    assert "mode" not in equal
    weighted = summarize(slices, weights=[100, 300])
    assert weighted["pcc_gene_mean"] == pytest.approx(0.875)
    with pytest.raises(ValueError, match="weights"):
        summarize(slices, weights=[1.0])


def test_summarize_adds_up_cell_counts_only() -> None:
    """Over two slices of a 351-gene panel: 351 genes, not 702; clusters are not averaged."""
    slices = [
        {"mse": 0.5, "n_cells": 100, "n_genes": 351, "cluster_n_clusters": 23,
         "cluster_n_cells_labelled": 90, "morans_i_n_genes": 300, "n_anchors": 100,
         "seconds": 1.0},
        {"mse": 0.3, "n_cells": 300, "n_genes": 351, "cluster_n_clusters": 24,
         "cluster_n_cells_labelled": 280, "morans_i_n_genes": 310, "n_anchors": 300,
         "seconds": 2.5},
    ]  # fmt: skip
    out = summarize(slices, weights=[100, 300])
    assert out["mse"] == pytest.approx(0.35)
    assert out["n_cells"] == 400 and out["cluster_n_cells_labelled"] == 370
    assert out["n_anchors"] == 400 and out["seconds"] == pytest.approx(3.5)
    assert not {"n_genes", "cluster_n_clusters", "morans_i_n_genes"} & set(out)


def test_summary_lines_show_every_metric_beside_its_baseline() -> None:
    from alphastomics.workflows.test import summary_lines

    overall = {
        "expr_to_pos": {"distance_spearman_median": 0.41, "knn_preservation": 0.2},
        "baseline_random_positions": {"distance_spearman_median": 0.0, "knn_preservation": 0.05},
        "pos_to_expr": {"pcc_gene_mean": 0.3, "mse": 0.433},
        "baseline_mean_expression": {"pcc_gene_mean": math.nan, "mse": 0.398},
    }
    lines = summary_lines(overall)
    assert lines == [
        "expr_to_pos: median distance Spearman 0.410 (random positions: 0.000)",
        "expr_to_pos: kNN preservation 0.200 (random positions: 0.050)",
        "pos_to_expr: mean gene Pearson r 0.300 (a constant: 0.000)",
        "pos_to_expr: expression MSE 0.433 (training mean per gene: 0.398; the model is worse)",
    ]

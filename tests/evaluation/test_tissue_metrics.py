"""alphastomics.evaluation.tissue_metrics: hand-computed cases, and tissues whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alphastomics.data.synthetic import synthetic_tissue
from alphastomics.evaluation.tissue_metrics import (
    CellTypeClassifier,
    compare_tissues,
    composition_similarity,
    enrichment_correlation,
    nhood_enrichment,
    realism_auc,
    spatial_neighbors,
    tissue_statistics,
)

FAST = {"n_perms": 200, "moran_k": 10}


def test_enrichment_of_two_pairs_matches_the_hand_computation():
    # cells 0-1 and 2-3 are each other's nearest neighbour: edges 0→1, 1→0, 2→3, 3→2.
    # Types (0, 0, 1, 1): 2 edges within type 0, none from type 0 to type 1. Under a random
    # relabelling each of the 6 ways to give type 0 to two cells is equally likely; two of
    # them (cells {0, 1} or {2, 3}) give 2 edges within type 0, four give 0: mean 2/3,
    # std sqrt(8)/3, so z = (2 - 2/3) / (sqrt(8)/3) = sqrt(2); type 0 → 1 is its mirror.
    positions = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.0, 0.0]])
    rows, cols = spatial_neighbors(positions, n_neighbors=1)
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [
        (0, 1),
        (1, 0),
        (2, 3),
        (3, 2),
    ]
    result = nhood_enrichment(positions, np.array([0, 0, 1, 1]), 2, n_neighbors=1, n_perms=20000)
    np.testing.assert_array_equal(result.counts, [[2, 0], [0, 2]])
    root2 = math.sqrt(2)
    np.testing.assert_allclose(result.zscore, [[root2, -root2], [-root2, root2]], atol=0.05)


def test_enrichment_of_an_absent_type_is_undefined_and_skipped():
    rng = np.random.default_rng(0)
    positions = rng.random((60, 2))
    labels = np.arange(60) % 2  # type 2 of 3 never occurs
    result = nhood_enrichment(positions, labels, 3, n_perms=50)
    assert np.isnan(result.zscore[2]).all() and np.isnan(result.zscore[:, 2]).all()
    assert np.isfinite(result.zscore[:2, :2]).all()
    assert enrichment_correlation(result.zscore, result.zscore) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="type codes in"):
        nhood_enrichment(positions, labels + 2, 3)


def test_composition_is_one_minus_total_variation():
    assert composition_similarity([0, 0, 1], [0, 1, 1], 2) == pytest.approx(2 / 3)
    assert composition_similarity([0, 1, 2, 2], [2, 0, 2, 1], 3) == 1.0
    assert composition_similarity([0, 0], [1, 1], 2) == 0.0


@pytest.mark.slow
def test_realism_auc_tells_shifted_cells_apart_and_not_copies():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8))
    assert realism_auc(real, real + 1.5, n_estimators=20) > 0.95
    # the real cells themselves: scored on the other half of the real cells, about 0.5
    assert abs(realism_auc(real, real[rng.permutation(400)], n_estimators=20) - 0.5) < 0.1
    with pytest.raises(ValueError, match="too few"):
        realism_auc(real[:6], real[:6] + 1)


@pytest.fixture(scope="module")
def tissue():
    """Two slices of one synthetic tissue with cell types arranged in space."""
    adata = synthetic_tissue(n_cells=1000, n_genes=24, n_slices=2, seed=0, counts=False)
    codes = adata.obs["cell_type"].astype("category")
    slices = adata.obs["slice"].to_numpy()
    parts = {
        name: (
            np.asarray(adata.X)[slices == name],
            np.asarray(adata.obsm["ccf"])[slices == name],
            codes.cat.codes.to_numpy()[slices == name].astype(np.int64),
        )
        for name in ("slice_0", "slice_1")
    }
    expr, _, labels = parts["slice_0"]
    classifier = CellTypeClassifier(expr, labels, names=list(codes.cat.categories))
    return parts, classifier


@pytest.mark.slow
def test_a_tissue_scores_perfectly_against_itself_and_its_shuffle_does_not(tissue):
    parts, classifier = tissue
    expr, pos, _ = parts["slice_1"]
    real = tissue_statistics(expr, pos, classifier, **FAST)
    itself = compare_tissues(real, real, classifier.n_types, auc_estimators=20)
    assert itself["composition"] == 1.0
    assert itself["nhood_correlation"] == pytest.approx(1.0)
    assert itself["morans_i_spearman"] == pytest.approx(1.0)
    assert abs(itself["realism_auc"] - 0.5) < 0.1

    shuffled_pos = pos[np.random.default_rng(1).permutation(len(pos))]
    shuffled = tissue_statistics(expr, shuffled_pos, classifier, **FAST)
    against_shuffle = compare_tissues(real, shuffled, classifier.n_types, auc_estimators=20)
    assert against_shuffle["composition"] == 1.0  # the same cells
    assert against_shuffle["nhood_correlation"] < 0.5
    assert against_shuffle["morans_i_spearman"] < 0.5

    other_expr, other_pos, _ = parts["slice_0"]
    other = tissue_statistics(other_expr, other_pos, classifier, **FAST)
    against_other = compare_tissues(real, other, classifier.n_types, auc_estimators=20)
    assert against_other["nhood_correlation"] > against_shuffle["nhood_correlation"] + 0.3
    assert against_other["morans_i_spearman"] > against_shuffle["morans_i_spearman"] + 0.3


def test_without_labels_types_are_clusters_of_the_training_expression(tissue):
    parts, _ = tissue
    expr = parts["slice_0"][0]
    clusters = CellTypeClassifier(expr, None, n_clusters=5)
    assert clusters.names == [f"cluster {c}" for c in range(5)]
    assert "k-means" in clusters.kind
    types = clusters.predict(expr)
    assert set(types.tolist()) <= set(range(5)) and len(set(types.tolist())) > 1
    unlabelled = CellTypeClassifier(expr, np.full(len(expr), -1), n_clusters=4)
    assert unlabelled.n_types == 4


def test_enrichment_matches_squidpy():
    """squidpy's gr.nhood_enrichment on the same graph: the same counts, z-scores within
    permutation noise (runs where squidpy is installed; checked with squidpy 1.8.2)."""
    sq = pytest.importorskip("squidpy")
    import anndata as ad
    import pandas as pd

    adata = synthetic_tissue(n_cells=600, n_genes=8, n_slices=1, seed=2, counts=False)
    adata.obs["cell_type"] = pd.Categorical(adata.obs["cell_type"].astype(str))
    adata = ad.AnnData(X=np.asarray(adata.X), obs=adata.obs, obsm={"spatial": adata.obsm["ccf"]})
    sq.gr.spatial_neighbors(adata, coord_type="generic", n_neighs=6)
    zscore, counts = sq.gr.nhood_enrichment(
        adata, cluster_key="cell_type", n_perms=2000, seed=0, copy=True, show_progress_bar=False
    )
    codes = adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    ours = nhood_enrichment(adata.obsm["spatial"], codes, int(codes.max()) + 1, n_perms=2000)
    np.testing.assert_array_equal(ours.counts, counts)
    np.testing.assert_allclose(ours.zscore, zscore, atol=0.15 + 0.05 * np.abs(zscore))

"""Baselines on known answers, and their scoring on a processed store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alphastomics.data.store import ProcessedStore
from alphastomics.errors import UserInputError
from alphastomics.evaluation.baselines import (
    ExpressionPCAPositions,
    KNNExpression,
    KNNPositions,
    MeanExpression,
    RandomPositions,
    evaluate_baselines,
    infer_n_dims,
)
from alphastomics.evaluation.metrics import position_metrics


def _smooth_tissue(n_cells: int = 1000, n_genes: int = 40, n_dims: int = 3, seed: int = 0):
    """Uniform positions (N, 3) (z = 0 for 2D) and expression that is a smooth function of them."""
    rng = np.random.default_rng(seed)
    positions = np.zeros((n_cells, 3))
    positions[:, :n_dims] = rng.uniform(-1.5, 1.5, size=(n_cells, n_dims))
    directions = rng.normal(size=(3, n_genes))
    phases = rng.uniform(0, 2 * np.pi, size=n_genes)
    expression = np.sin(positions @ directions + phases) + 0.01 * rng.normal(
        size=(n_cells, n_genes)
    )
    return expression.astype(np.float32), positions.astype(np.float32)


def test_knn_positions_recover_coordinates_of_smooth_expression():
    expression, positions = _smooth_tissue()
    train, test = slice(0, 800), slice(800, None)
    knn = KNNPositions(k=5).fit(expression[train], positions[train])
    predicted = knn.predict(expression[test])
    assert predicted.shape == (200, 3)
    assert predicted.dtype == np.float32
    rmse = np.sqrt(np.square(predicted - positions[test]).sum(axis=1).mean())
    assert rmse < 0.25  # cells are spread over a 3 x 3 x 3 cube; neighbours are ~0.3 apart
    assert position_metrics(positions[test], predicted)["distance_spearman_median"] > 0.95
    assert knn.params() == {"k": 5, "n_components": None, "weights": "uniform"}  # 40 genes < 50


def test_knn_positions_without_pca_and_k_capped():
    expression, positions = _smooth_tissue(n_cells=30, n_genes=8)
    knn = KNNPositions(k=50, n_components=None).fit(expression, positions)
    assert knn.params()["k"] == 30 and knn.params()["n_components"] is None
    # with k = N every prediction is the training centroid
    np.testing.assert_allclose(
        knn.predict(expression[:3]), np.tile(positions.mean(0), (3, 1)), atol=1e-5
    )
    with pytest.raises(ValueError, match="k must be"):
        KNNPositions(k=0)


@pytest.mark.parametrize("n_dims", [2, 3])
def test_pca_positions_shapes_and_linear_signal(n_dims):
    rng = np.random.default_rng(1)
    positions = np.zeros((500, 3), dtype=np.float32)
    positions[:, :n_dims] = rng.normal(size=(500, n_dims)) * [3.0, 2.0, 1.0][:n_dims]
    # expression linear in position (plus noise): the top components span the positions
    expression = positions[:, :n_dims] @ rng.normal(size=(n_dims, 20)) + 0.01 * rng.normal(
        size=(500, 20)
    )
    pca = ExpressionPCAPositions().fit(expression, positions)
    predicted = pca.predict(expression)
    assert predicted.shape == (500, 3)
    assert pca.params() == {"n_components": n_dims}
    if n_dims == 2:
        assert not predicted[:, 2].any()
    assert position_metrics(positions, predicted)["distance_spearman_median"] > 0.9
    # scaled to about the training positions' spread
    spread = np.sqrt(np.square(predicted - predicted.mean(0)).sum(1).mean() / n_dims)
    target = np.sqrt(np.square(positions - positions.mean(0)).sum(1).mean() / n_dims)
    assert spread == pytest.approx(target, rel=1e-3)


def test_random_positions_are_centred_seeded_and_respect_2d():
    _, positions = _smooth_tissue(n_cells=200, n_dims=2)
    assert infer_n_dims(positions) == 2
    first = RandomPositions(seed=3).fit(None, positions).predict(np.zeros((100, 5)))
    again = RandomPositions(seed=3).fit(None, positions).predict(np.zeros((100, 5)))
    assert first.shape == (100, 3)
    np.testing.assert_array_equal(first, again)
    assert not first[:, 2].any()
    np.testing.assert_allclose(first.mean(0), 0.0, atol=1e-6)
    assert abs(position_metrics(positions[:100], first)["distance_spearman_median"]) < 0.2


def test_mean_expression_uses_measured_cells_only():
    expression = np.array([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    measured = np.array([[True, True], [True, False], [True, True]])
    mean = MeanExpression().fit(None, expression, measured)
    np.testing.assert_allclose(mean.mean_, [3.0, 3.0])
    predicted = mean.predict(np.zeros((4, 3)))
    assert predicted.shape == (4, 2)
    np.testing.assert_allclose(predicted, [[3.0, 3.0]] * 4)
    np.testing.assert_allclose(MeanExpression().fit(None, expression).mean_, [3.0, 2.0])


def test_knn_expression_recovers_training_cells_and_skips_unmeasured():
    expression, positions = _smooth_tissue(n_cells=300, n_genes=6)
    knn = KNNExpression(k=1).fit(positions, expression)
    np.testing.assert_allclose(knn.predict(positions[:20]), expression[:20])
    # smooth expression is predicted well at new positions by a spatial average
    knn5 = KNNExpression(k=5).fit(positions[:250], expression[:250])
    predicted = knn5.predict(positions[250:])
    corr = [np.corrcoef(predicted[:, g], expression[250:, g])[0, 1] for g in range(6)]
    assert min(corr) > 0.8
    # gene 0 unmeasured in half of the training cells: averaged over the measuring ones only
    measured = np.ones_like(expression, dtype=bool)
    measured[::2, 0] = False
    masked = KNNExpression(k=1).fit(positions, np.where(measured, expression, 0.0), measured)
    out = masked.predict(positions[:4])
    np.testing.assert_allclose(out[1::2], expression[1:4:2])  # measured cells: themselves
    assert np.all(out[0::2, 0] == masked.mean_[0])  # nearest neighbour is itself, unmeasured


def test_evaluate_baselines_on_store(tiny_store: Path):
    store = ProcessedStore(tiny_store)
    results = evaluate_baselines(store, k_grid=(1, 3))
    names = [r.name for r in results]
    assert names == [
        "random positions",
        "expression PCA",
        "kNN regression",
        "gene training mean",
        "kNN spatial average",
    ]
    test_names = store.slice_names("test")
    n_test = sum(store.n_cells(i) for i in store.slice_indices("test"))
    for result in results:
        assert list(result.slices) == test_names
        assert result.overall["n_cells"] == n_test
        assert result.fit_seconds >= 0 and result.predict_seconds >= 0
    by_name = {r.name: r for r in results}
    knn = by_name["kNN regression"]
    assert knn.selection["metric"] == "distance_spearman_median"
    assert knn.selection["val_entries"] == store.slice_names("val")
    assert knn.params["k"] in (1, 3)
    assert "distance_spearman_median" in knn.overall
    assert "pcc_gene_mean" in by_name["kNN spatial average"].overall
    assert "morans_i_pearson" in by_name["kNN spatial average"].overall
    # a constant prediction has no correlation
    assert np.isnan(by_name["gene training mean"].overall["pcc_gene_mean"])
    as_dict = knn.to_dict()
    assert as_dict["task"] == "expr_to_pos" and "slices" in as_dict


def test_evaluate_baselines_without_val_uses_default_k(tiny_store: Path):
    results = evaluate_baselines(tiny_store, split="val", default_k=4)
    knn = {r.name: r for r in results}["kNN regression"]
    assert knn.params["k"] == 4 and knn.selection["metric"] is None
    assert list(knn.slices) == ProcessedStore(tiny_store).slice_names("val")


def test_evaluate_baselines_needs_test_entries(tmp_path: Path, tiny_store: Path):
    import json
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(tiny_store, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    for entry in meta["slices"]:
        if entry["split"] == "test":
            entry["split"] = "train"
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match="no 'test' entries"):
        evaluate_baselines(copy)


def test_baselines_place_cells_with_the_columns_of_a_2d_store(tmp_path: Path):
    from conftest import make_tiny_adata, write_h5ad

    from alphastomics.data.preprocess import SpatialDataPreprocessor

    source = write_h5ad(make_tiny_adata(n_slices=3, n_cells=40, n_dims=2), tmp_path / "flat.h5ad")
    pre = SpatialDataPreprocessor(test_slices=["slice_2"], progress=False)
    pre.preprocess_and_save([source], tmp_path / "store")
    assert np.asarray(ProcessedStore(tmp_path / "store").load_slice(0).positions).shape[1] == 2
    for method in (RandomPositions(), ExpressionPCAPositions()):
        expression, positions = np.ones((40, 5)), np.random.default_rng(0).normal(size=(40, 2))
        expression[:, 0] = positions[:, 0]
        assert method.fit(expression, positions).predict(expression).shape == (40, 2)
    results = evaluate_baselines(tmp_path / "store")  # a (N, 3) prediction raised here before
    placed = {r.name: r for r in results}["expression PCA"]
    assert np.isfinite(placed.overall["distance_spearman_median"])

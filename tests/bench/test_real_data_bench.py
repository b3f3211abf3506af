"""bench/real_data.py: held-out cell splits, and smoke runs on tiny generated data."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import load_bench_script

from alphastomics.data.preprocess import SpatialDataPreprocessor
from alphastomics.data.store import ProcessedStore
from alphastomics.data.synthetic import synthetic_tissue
from alphastomics.errors import UserInputError

MODEL_IMPUTERS = [
    "model: conditional mean from positions alone",
    "model: neighbour read-out among the training cells",
]
TINY_MODEL = ["model.hidden_dim=16", "model.n_layers=1", "diffusion.diffusion_steps=20"]
# one_slice_h5ad: hold out 30% of its cells as a slab along z
Z_SLAB_SPLIT = ["--position_key", "ccf", "--holdout_cells", "0.3", "--split_axis", "z"]
BASELINE_NAMES = [
    "random positions",
    "expression PCA",
    "kNN regression",
    "gene training mean",
    "kNN spatial average",
]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench_script("real_data")


@pytest.fixture(scope="module")
def tissue_h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 slices of 60 cells, 12 genes, raw counts, 3D ``obsm['ccf']``, cell types."""
    path = tmp_path_factory.mktemp("bench") / "tissue.h5ad"
    synthetic_tissue(n_cells=240, n_genes=12, n_slices=4, seed=0).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def one_slice_h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One slice (no ``slice`` column) of 300 cells, like BDTNP."""
    path = tmp_path_factory.mktemp("bench_one") / "embryo.h5ad"
    adata = synthetic_tissue(n_cells=300, n_genes=12, n_slices=1, seed=1, counts=False)
    del adata.obs["slice"]
    adata.write_h5ad(path)
    return path


def test_holdout_rows_random_and_slab(bench: ModuleType):
    rng = np.random.default_rng(0)
    positions = rng.normal(size=(500, 3))
    parts = bench.holdout_rows(positions, 0.2, val_fraction=0.1, seed=0)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [350, 50, 100]
    assert len(np.unique(np.concatenate(list(parts.values())))) == 500  # a partition
    again = bench.holdout_rows(positions, 0.2, val_fraction=0.1, seed=0)
    assert all(np.array_equal(parts[s], again[s]) for s in parts)

    slab = bench.holdout_rows(positions, 0.2, axis="y", val_fraction=0.1, seed=0)
    y = positions[:, 1]
    inside = (y >= y[slab["test"]].min()) & (y <= y[slab["test"]].max())
    assert set(np.flatnonzero(inside)) == set(slab["test"])  # contiguous along y
    assert abs(np.median(y[slab["test"]]) - np.median(y)) < 0.05  # centred by default
    assert slab["val"].size == 50 and not set(slab["val"]) & set(slab["test"])
    edge = bench.holdout_rows(positions, 0.2, axis="x", slab_center=0.0)
    assert set(edge["test"]) == set(np.argsort(positions[:, 0])[:100])  # clipped to the end

    flat = positions.copy()
    flat[:, 2] = 0.0
    with pytest.raises(UserInputError, match="same z coordinate"):
        bench.holdout_rows(flat, 0.2, axis="z")
    with pytest.raises(UserInputError, match="too few"):
        bench.holdout_rows(positions[:5], 0.5, val_fraction=0.4)


def test_split_single_slice_store_keeps_the_frame(
    bench: ModuleType, one_slice_h5ad: Path, tmp_path: Path
):
    whole = tmp_path / "whole"
    pre = SpatialDataPreprocessor(
        position_key="ccf", val_fraction=0.0, test_fraction=0.0, progress=False
    )
    pre.preprocess_and_save([one_slice_h5ad], whole)
    meta = bench.split_single_slice_store(
        whole, tmp_path / "split", 0.2, axis="x", val_fraction=0.1, seed=0
    )
    assert [s["name"] for s in meta["slices"]] == ["embryo/train", "embryo/val", "embryo/test"]
    assert meta["split"]["test"] == ["embryo/test"] and meta["split"]["by"] == "cells"
    original = ProcessedStore(whole).load_slice(0)
    store = ProcessedStore(tmp_path / "split")
    parts = {store.metadata["slices"][i]["split"]: store.load_slice(i) for i in range(3)}
    rows = {}
    for split, data in parts.items():
        index = {name: i for i, name in enumerate(original.obs_names)}
        rows[split] = np.array([index[n] for n in data.obs_names])
        # the same coordinates: nothing re-centred or re-scaled
        np.testing.assert_array_equal(data.positions, original.positions[rows[split]])
        np.testing.assert_array_equal(data.expression, original.expression[rows[split]])
    assert sum(len(r) for r in rows.values()) == original.n_cells
    for info in store.metadata["slices"]:
        assert info["center"] == ProcessedStore(whole).metadata["slices"][0]["center"]
        assert info["scale"] == ProcessedStore(whole).metadata["slices"][0]["scale"]
    train_expr = np.asarray(parts["train"].expression, dtype=np.float64)
    np.testing.assert_allclose(store.metadata["gene_mean"], train_expr.mean(0), rtol=1e-6)
    test_x = parts["test"].positions[:, 0]
    other_x = np.concatenate([parts["train"].positions[:, 0], parts["val"].positions[:, 0]])
    assert ((other_x < test_x.min()) | (other_x > test_x.max())).all()  # a slab along x
    lo, hi = meta["split"]["holdout"]["slab_range_scaled"]
    assert lo == pytest.approx(test_x.min()) and hi == pytest.approx(test_x.max())


def test_bench_smoke_trains_and_writes_table(bench: ModuleType, tissue_h5ad: Path, tmp_path: Path):
    out = tmp_path / "bench"
    result = bench.run(
        [
            "--h5ad",
            str(tissue_h5ad),
            "--position_key",
            "ccf",
            "--cell_type_key",
            "cell_type",
            "--test_slices",
            "slice_3",
            *TINY_MODEL,
            "--val_slices",
            "slice_2",
            "--budget_minutes",
            "0.05",
            "--output_dir",
            str(out),
            "sampling.steps=5",
        ]
    )
    saved = json.loads((out / "results.json").read_text())
    methods = [row["method"] for row in saved["rows"]]
    assert methods[0].startswith("AlphaSTomics (") and methods[2:] == BASELINE_NAMES
    # the sampler's yardstick: the same model's one-step mean layout, scored alike
    assert methods[1].endswith("one-step mean (no sampling)")
    mean_row = saved["rows"][1]
    assert 0 < mean_row["knn_preservation"] <= 1 and mean_row["pcc_gene_mean"] is None
    model_row = saved["rows"][0]
    for key in ("distance_spearman_median", "knn_preservation", "procrustes_disparity"):
        assert isinstance(model_row[key], float)
    for key in ("pcc_gene_mean", "pcc_gene_median", "morans_i_pearson"):
        assert isinstance(model_row[key], float)
    assert model_row["fit_seconds"] > 0 and model_row["predict_seconds"] > 0
    assert saved["test_entries"] == ["slice_3"]
    assert saved["model"]["overall"]["expr_to_pos"]["distance_spearman_median"]["mean"] == (
        pytest.approx(model_row["distance_spearman_median"])
    )
    # the model was scored on the same cells as the baselines
    model_metrics = json.loads((out / "model_eval" / "seed_0" / "metrics.json").read_text())
    baseline = {b["name"]: b for b in saved["baselines"]}["kNN regression"]
    assert model_metrics["slices"]["slice_3"]["n_cells"] == baseline["slices"]["slice_3"]["n_cells"]
    markdown = (out / "results.md").read_text()
    for name in BASELINE_NAMES:
        assert f"| {name} |" in markdown
    assert (out / "run" / "checkpoints" / "last.ckpt").is_file()
    assert [row["method"] for row in result["rows"]] == methods

    # an existing checkpoint, two sampling seeds, no training
    again = bench.run(
        [
            "--h5ad",
            str(tissue_h5ad),
            "--position_key",
            "ccf",
            "--test_slices",
            "slice_3",
            "--val_slices",
            "slice_2",
            "--checkpoint",
            str(out / "run" / "checkpoints" / "last.ckpt"),
            "--num_seeds",
            "2",
            "--steps",
            "3",
            "--output_dir",
            str(tmp_path / "from_ckpt"),
        ]
    )
    assert again["training_seconds"] is None
    assert len(again["model"]["seeds"]) == 2
    assert "±" in (tmp_path / "from_ckpt" / "results.md").read_text()


def test_bench_baselines_only_on_one_slice(bench: ModuleType, one_slice_h5ad: Path, tmp_path: Path):
    out = tmp_path / "one"
    result = bench.run(
        [
            "--h5ad",
            str(one_slice_h5ad),
            *Z_SLAB_SPLIT,
            "--baselines_only",
            "--output_dir",
            str(out),
        ]
    )
    assert [row["method"] for row in result["rows"]] == BASELINE_NAMES
    assert result["test_entries"] == ["embryo/test"] and result["n_test_cells"] == 90
    assert result["model"] is None
    assert "slab along z" in (out / "results.md").read_text()
    assert json.loads((out / "baselines.json").read_text())["n_train_cells"] == 180
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # a non-empty output folder is never reused silently
    assert bench.main([*result["command"][1:]]) == 2


def test_bench_rejects_bad_arguments(bench: ModuleType, tissue_h5ad: Path, tmp_path: Path):
    base = [
        "--h5ad",
        str(tissue_h5ad),
        "--position_key",
        "ccf",
        "--output_dir",
        str(tmp_path / "x"),
    ]
    with pytest.raises(SystemExit):
        bench.run(base)  # neither --test_slices nor --holdout_cells
    with pytest.raises(SystemExit):
        bench.run([*base, "--holdout_cells", "0.2", "--test_slices", "slice_3"])
    with pytest.raises(SystemExit):
        bench.run([*base, "--test_slices", "slice_3", "--baselines_only", "model.hidden_dim=8"])
    with pytest.raises(SystemExit):
        bench.run([*base, "--test_slices", "slice_3", "--checkpoint", "x.ckpt", "a.b=1"])
    with pytest.raises(UserInputError, match="single slice"):
        bench.run([*base, "--holdout_cells", "0.2", "--baselines_only"])
    with pytest.raises(UserInputError, match="slice_9"):
        bench.run([*base, "--test_slices", "slice_9", "--baselines_only"])
    assert not (tmp_path / "x").exists()  # nothing left behind
    assert not list(tmp_path.iterdir())
    assert bench.split_overrides(["--test_slices", "a", "b", "x.y=1", "--seed=3"]) == (
        ["--test_slices", "a", "b", "--seed=3"],
        ["x.y=1"],
    )


@pytest.mark.realdata
def test_bdtnp_slab_split_and_knn_baseline(bench: ModuleType, bdtnp_path: Path, tmp_path: Path):
    """BDTNP: a central slab along z keeps the embryo's frame; kNN regression places it well."""
    from alphastomics.evaluation.baselines import KNNPositions

    flags = ["--position_key", "spatial", "--holdout_cells", "0.2", "--split_axis", "z"]
    args = bench.build_parser().parse_args(
        ["--h5ad", str(bdtnp_path), *flags, "--val_fraction", "0"]
    )
    meta = bench.preprocess(args, tmp_path / "data")
    assert meta["split"]["test"] == ["embryo_half/test"]
    store = ProcessedStore(tmp_path / "data")
    train = store.load_slice(store.slice_indices("train")[0])
    test = store.load_slice(store.slice_indices("test")[0])
    assert (train.n_cells, test.n_cells) == (2431, 608)
    knn = KNNPositions(k=10).fit(train.expression, train.positions)
    predicted = knn.predict(test.expression)
    # same frame: predictions land near the true coordinates, not just the same shape
    # (cells inside the slab are placed at its edges: errors up to half its width, ~0.2)
    error = np.median(np.linalg.norm(predicted - test.positions, axis=1))
    shuffled = np.median(np.linalg.norm(predicted[::-1] - test.positions, axis=1))
    assert error < 0.3 < shuffled


def test_bench_generates_held_out_cells_among_training_cells(
    bench: ModuleType, one_slice_h5ad: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "placed"
    result = bench.run(
        [
            "--h5ad",
            str(one_slice_h5ad),
            *Z_SLAB_SPLIT,
            *TINY_MODEL,
            "--budget_minutes",
            "0.03",
            "--output_dir",
            str(out),
            "sampling.steps=3",
        ]
    )
    methods = [row["method"] for row in result["rows"]]
    assert methods[1].endswith("among the training cells")
    placed = result["rows"][1]
    assert isinstance(placed["distance_spearman_median"], float)
    assert isinstance(placed["pcc_gene_mean"], float)  # expression imputed among them too
    assert "neighbour read-out, k=32" in placed["params"]  # the learned read-out imputed it
    assert result["placement"]["overall"]["expr_to_pos"]["n_cells"]["mean"] == 90
    assert result["placement"]["overall"]["pos_to_expr"]["n_cells"]["mean"] == 90

    # the position-only imputers reference scores the same test cells, and the checkpoint
    imputers = load_bench_script("position_imputers")
    capsys.readouterr()
    imputers.main(
        ["--data_dir", str(out / "data"), "--checkpoint", str(out / "run/checkpoints/last.ckpt")]
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    names = [row.split(" | ")[0][2:] for row in rows[2:]]
    assert names == [*imputers.IMPUTERS, *MODEL_IMPUTERS]
    assert all(-1 <= float(row.split(" | ")[1]) <= 1 for row in rows[2:])

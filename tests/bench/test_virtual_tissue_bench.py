"""bench/virtual_tissue.py: its baselines, and a smoke run on tiny generated data."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import anndata as ad
import numpy as np
import pytest
from conftest import load_bench_script
from scipy.spatial import Delaunay

from alphastomics.data.synthetic import synthetic_tissue

TINY = [
    "model.hidden_dim=16",
    "model.n_layers=1",
    "model.n_heads=2",
    "diffusion.diffusion_steps=20",
    "sampling.steps=3",
    "training.max_epochs=1",
]
FAST_SCORES = ["--n_perms", "20", "--auc_trees", "5", "--n_clusters", "3"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench_script("virtual_tissue")


def test_random_positions_fill_the_convex_hull_and_keep_flat_columns(bench: ModuleType):
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, 300)
    ring = np.column_stack([np.cos(angle) * 4, np.sin(angle), np.full(300, 2.5)])  # z flat
    drawn = bench.uniform_in_hull(ring, 500, rng)
    assert drawn.shape == (500, 3)
    assert (drawn[:, 2] == 2.5).all()
    assert (Delaunay(ring[:, :2]).find_simplex(drawn[:, :2]) >= 0).all()
    assert drawn[:, 0].std() > 1.0  # spread over the hull, not piled up
    expr = rng.random((50, 4))
    cells, positions = bench.random_positions_baseline(expr, ring[:40], rng)
    assert cells.shape == (40, 4) and positions.shape == (40, 3)
    assert len({tuple(row) for row in cells}) == 40  # distinct training cells while enough


def test_bad_arguments_are_refused_before_anything_is_written(bench: ModuleType, tmp_path: Path):
    h5ad = tmp_path / "t.h5ad"
    args = ["--h5ad", str(h5ad), "--position_key", "ccf", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as stop:
        bench.run(args)
    assert stop.value.code == 2
    synthetic_tissue(n_cells=40, n_genes=4, n_slices=2, seed=0).write_h5ad(h5ad)
    for extra in (["--checkpoint", str(tmp_path / "none.ckpt")], ["--n_perms", "1"]):
        with pytest.raises(SystemExit):
            bench.run([*args, *extra])
    with pytest.raises(SystemExit):
        bench.run([*args, "--checkpoint", str(h5ad), "model.hidden_dim=8"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.h5ad"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--other_slice", "slice_9"], "--other_slice 'slice_9' is not a slice of"),
        (["--test_slices", "slice_1", "nope"], "--test_slices 'nope' is not a slice of"),
        (["--test_slices", "slice_1", "--other_slice", "slice_1"], "also in --test_slices"),
        (["--slice_key", "section", "--test_slices", "slice_1"], "no obs['section'] column"),
    ],
)
def test_unknown_slices_are_one_error_line_and_nothing_is_written(
    bench: ModuleType, tmp_path: Path, capsys, extra: list[str], message: str
):
    h5ad = tmp_path / "t.h5ad"
    synthetic_tissue(n_cells=40, n_genes=4, n_slices=2, seed=0).write_h5ad(h5ad)
    out = tmp_path / "o"
    argv = ["--h5ad", str(h5ad), "--position_key", "ccf", "--output_dir", str(out), *extra]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_bench_trains_generates_and_scores_then_takes_a_checkpoint(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    h5ad = tmp_path / "tissue.h5ad"
    synthetic_tissue(n_cells=320, n_genes=10, n_slices=4, seed=0).write_h5ad(h5ad)
    out = tmp_path / "out"
    common = ["--h5ad", str(h5ad), "--position_key", "ccf", "--output_dir", str(out)]
    held_out = ["slice_2", "slice_3"]
    split = ["--cell_type_key", "cell_type", "--test_slices", *held_out]
    argv = [*common, *split, "--other_slice", "slice_0", "--budget_minutes", "1"]
    assert bench.main([*argv, *FAST_SCORES, *TINY]) == 0

    result = json.loads((out / "results.json").read_text())
    assert list(result["per_slice"]) == held_out and result["held_out"]
    reference = ad.read_h5ad(h5ad)
    counts = reference.obs["slice"].value_counts()
    generated = ad.read_h5ad(out / "generated_seed0.h5ad")
    assert generated.obs["slice"].value_counts().to_dict() == {s: counts[s] for s in held_out}
    assert generated.obs["alphastomics_predicted_cell_type"].notna().all()
    assert result["expression_start"] == 0.5  # the default: from stored training cells
    assert generated.layers["alphastomics_denoised"].shape == generated.shape
    store = json.loads((out / "data" / "metadata.json").read_text())
    scales = {e["name"]: e["scale"] for e in store["slices"]}
    for name in held_out:  # each generated slice at the scale of the slice it stands for
        made = generated.uns["alphastomics"]["slices"][name]
        assert made["scale"] == pytest.approx(scales[name]) and made["n_cells"] == counts[name]
    methods = [
        "AlphaSTomics joint",
        "real other slice (slice_0)",
        "held-out cells, shuffled positions",
        "training cells, random positions",
    ]
    for name in held_out:
        scores = result["per_slice"][name]
        assert list(scores) == methods
        assert scores["AlphaSTomics joint"]["n_cells"] == counts[name]
        assert scores["held-out cells, shuffled positions"]["composition"]["mean"] == 1.0
        assert scores["real other slice (slice_0)"]["n_cells"] == counts["slice_0"]
    targets = [(t["metric"], t["against"]) for t in result["targets"]]
    spatial = ["nhood_correlation", "morans_i_spearman"]
    assert targets == [
        *((m, "real other slice (slice_0)") for m in [*spatial, "composition", "realism_auc"]),
        *((m, "held-out cells, shuffled positions") for m in spatial),
        *((m, "training cells, random positions") for m in spatial),
    ]
    bounds = {"nhood_correlation": 0.8, "morans_i_spearman": 0.8, "composition": 0.9}
    for t in result["targets"]:
        model = result["summary"]["AlphaSTomics joint"][t["metric"]]
        other = result["summary"][t["against"]][t["metric"]]
        assert (t["model"], t["reference"]) == (model, other)
        if model is None or other is None:  # NaN (undefined) is written as null
            assert not t["met"]
        elif t["against"] != "real other slice (slice_0)":
            assert t["met"] == (model > other)
        elif t["metric"] == "realism_auc":
            assert t["met"] == (model - other <= 0.05)
        else:
            assert t["met"] == (model / other >= bounds[t["metric"]])
    assert "logistic regression" in result["classifier"] and result["training_steps"] >= 1
    text = (out / "results.md").read_text()
    assert text.count("| mean of 2 |") == 4 and "Targets (issue 18" in text
    assert (out / "tissues.png").read_bytes()[:4] == b"\x89PNG"

    # the diagnostics that read this output: realism after per-gene fixes, and guidance
    diagnostics = load_bench_script("realism_diagnostics")
    capsys.readouterr()  # the bench's own report
    assert diagnostics.main(["--output_dir", str(out), "--slice", "slice_2"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == [
        "as generated",
        "clipped at 0",
        "zero share matched",
        "quantile-mapped to training",
    ]
    assert diagnostics.main(["--output_dir", str(out), "--slice", "nope"]) == 2
    states = ["--output_dir", str(out), "--slice", "slice_2", "--layer"]
    assert diagnostics.main([*states, "alphastomics_denoised"]) == 0
    printed = capsys.readouterr().out
    assert "| as generated |" in printed and "zeros real" in printed
    assert diagnostics.main([*states, "nope"]) == 2
    assert "'nope' is not a layer" in capsys.readouterr().err
    guidance = load_bench_script("guidance")
    argv = ["--data_dir", str(out / "data"), "--checkpoint", str(out / "run/checkpoints/last.ckpt")]
    assert guidance.main([*argv, "--weights", "0", "1", "--seeds", "0"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| 0", "| 1"]
    assert all(0 <= float(row.split(" | ")[2]) <= 1 for row in rows[1:])  # kNN preservation

    # the same checkpoint, every slice scored as trained on, types from clusters (as BDTNP)
    checkpoint = out / "run" / "checkpoints" / "last.ckpt"
    rerun = [*common, "--checkpoint", str(checkpoint), "--overwrite", *FAST_SCORES]
    assert bench.main([*rerun, "--expression_start", "0"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["expression_start"] == 0.0 and "at 0.0 T" in (out / "results.md").read_text()
    assert not again["held_out"] and list(again["per_slice"]) == sorted(counts.index)
    assert again["classifier"].startswith("k-means")
    assert {t["against"] for t in again["targets"]} == set(methods[2:])  # no ceiling row
    assert again["training_seconds"] is None
    assert "not held out" in (out / "results.md").read_text()


def test_realism_corrections_fix_the_marginals_they_name():
    diagnostics = load_bench_script("realism_diagnostics")
    rng = np.random.default_rng(0)
    generated = rng.normal(size=(400, 3)).astype(np.float32)
    reference = np.where(rng.random((500, 3)) < 0.6, 0.0, rng.gamma(2.0, size=(500, 3)))
    matched = diagnostics.zero_share_matched(generated, np.array([0.0, 0.5, 0.9]))
    assert (matched >= 0).all()
    shares = [float((matched[:, g] == 0).mean()) for g in (1, 2)]
    assert shares == pytest.approx([0.5, 0.9], abs=0.01)
    mapped = diagnostics.quantile_mapped(generated, reference)
    for g in range(3):  # each gene now has the reference's distribution, in the same order
        order = np.argsort(generated[:, g])
        assert (np.diff(mapped[order, g]) >= 0).all()
        assert abs((mapped[:, g] == 0).mean() - (reference[:, g] == 0).mean()) < 0.02


def test_gene_structure_tells_low_rank_cells_from_independent_genes():
    diagnostics = load_bench_script("realism_diagnostics")
    rng = np.random.default_rng(0)
    independent = rng.normal(size=(600, 40))
    low_rank = rng.normal(size=(600, 2)) @ rng.normal(size=(2, 40)) + 0.1 * independent
    r_ind, top_ind = diagnostics.gene_structure(independent)
    r_low, top_low = diagnostics.gene_structure(low_rank)
    assert r_ind < 0.06 and top_ind < 0.4
    assert r_low > 0.3 and top_low > 0.95

"""The benchmark scripts still run end to end (tiny sizes; their numbers are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from conftest import BENCH, TINY_OVERRIDES, load_bench_script, make_tiny_adata
from scipy.spatial.distance import pdist

from alphastomics.main import main as cli


def test_scaling_runs(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    # `train_exact` (the exact pairwise-distance loss), `sample`, `place`, the neighbour search
    # and the measured-value draw; `train` is cheaper still
    args = ["--sizes", "200", "--repeats", "1", "--genes", "20", "--exact_max", "200"]
    kinds = ["train_exact", "sample", "place", "neighbors", "expression_neighbors", "observe"]
    args += ["--kinds", *kinds, "--override", "model.local_neighbors=4"]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "scaling.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert {r["kind"] for r in results} == set(kinds)
    assert all("error" not in r and r["seconds"] > 0 for r in results), results


def test_scaling_autocasts_a_mixed_precision_and_refuses_a_true_one() -> None:
    bench = load_bench_script("scaling")
    row = bench._worker("train", 200, 20, 1, 0, False, "cpu", ["training.precision=bf16-mixed"])
    assert row["precision"] == "bf16-mixed" and row["seconds"] > 0
    with pytest.raises(SystemExit, match="bf16-true"):
        bench._worker("sample", 200, 20, 1, 0, False, "cpu", ["training.precision=bf16-true"])


def test_sampler_quality_runs(tmp_path: Path) -> None:
    out = tmp_path / "sampler.json"
    bench = load_bench_script("sampler_quality")
    args = ["--n_cells", "240", "--n_genes", "12", "--n_slices", "4", "--minutes", "1"]
    args += ["--seeds", "0", "1", "--ddim_steps", "5", "--workdir", str(tmp_path / "work")]
    args += ["--json", str(out), "--override", "model.hidden_dim=16", "model.n_layers=1"]
    args += ["model.n_heads=2", "diffusion.diffusion_steps=20", "sampling.steps=5"]
    args += ["training.max_steps=2", "--consensus", "0", "0.5"]
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    names = {(r["mode"], r["metric"], r["label"], r["evaluations"]) for r in rows}
    expected = {("pos_to_expr", "pcc_gene_mean", "mean (1 step)", 4)}
    for mode, metrics in (
        ("expr_to_pos", ("distance_spearman_median", "knn_preservation")),
        ("pos_to_expr", ("pcc_gene_mean",)),
    ):
        shares = (" c=0", " c=0.5") if mode == "expr_to_pos" else ("",)  # placement only
        few_step = [f"ddim eta={eta} p=4{c}" for eta in (0, 1) for c in shares]
        for metric in metrics:
            expected |= {(mode, metric, "ddpm", 20)}
            expected |= {(mode, metric, label, 5) for label in few_step}
    assert names == expected
    assert all(len(r["per_seed"]) == 2 for r in rows)
    placed = {r["label"]: r["per_seed"] for r in rows if r["metric"] == "distance_spearman_median"}
    assert placed["ddim eta=1 p=4 c=0"] != placed["ddim eta=1 p=4 c=0.5"]


def test_placement_ceilings_runs(tiny_store: Path, capsys) -> None:
    assert load_bench_script("placement_ceilings").main(["--data_dir", str(tiny_store)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    split = next(i for i, line in enumerate(lines) if line.startswith("| kNN regression fitted"))
    table, transfer = lines[:split], lines[split:]
    assert table[0].startswith("| reference | slice_3 |")
    # transfer: one row per training entry and per test entry; an entry never places itself
    assert transfer[0] == "| kNN regression fitted on one slice | slice_3 |"
    rows = dict(line.strip("| ").split(" | ") for line in transfer[1:])
    assert set(rows) == {"slice_0", "slice_1", "slice_3"} and rows["slice_3"] == "–"
    assert all(0 <= float(rows[s].split(" / ")[1]) <= 1 for s in ("slice_0", "slice_1"))
    names = [line.split(" | ")[0][2:] for line in table[1:]]  # the rule line starts "|-"
    assert names[0] == "cell types shuffled" and names[-1] == "same-slice spatial kNN average"
    # the exact layout with little jitter keeps most neighbours; a shuffle keeps few
    means = [line.rstrip(" |").split(" | ")[-1] for line in table[1:]]
    spearman = {n: float(mean.split(" / ")[0]) for n, mean in zip(names, means, strict=True)}
    assert spearman["jitter σ=0.05"] > spearman["cell types shuffled"]


def test_bf16_gradients_runs(capsys) -> None:
    bench = load_bench_script("bf16_gradients")
    assert bench.main(["--n_cells", "300", "--genes", "10", "--draws", "2"]) == 0
    out = capsys.readouterr().out
    from alphastomics.utils.hardware import native_bf16

    if native_bf16("cpu") is None:
        assert "changes nothing here" in out
    else:
        rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]
        assert [row[0] for row in rows] == ["0", "1"]
        assert all(0.9 < float(row[2]) <= 1.0 for row in rows)  # cosine of the two gradients


def test_memorisation_scores_training_and_test_entries(tiny_store: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    train = ["train", "--data_dir", str(tiny_store), "--output_dir", str(run)]
    assert cli([*train, *TINY_OVERRIDES, "training.max_steps=2"]) == 0
    capsys.readouterr()
    bench = load_bench_script("memorisation")
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert bench.main(["--data_dir", str(tiny_store), "--checkpoint", str(checkpoint)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = [line.split(" | ") for line in table[1:]]
    assert [(r[0][2:], r[1]) for r in rows] == [
        ("slice_0", "train"),
        ("slice_1", "train"),
        ("slice_3", "test"),
        ("mean", "train"),
        ("mean", "test"),
    ]
    assert all(-1 <= float(r[3]) <= 1 and 0 <= float(r[4].rstrip(" |")) <= 1 for r in rows)


def test_consensus_variants_swap_the_pull_and_put_it_back(
    tiny_store: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    train = ["train", "--data_dir", str(tiny_store), "--output_dir", str(run)]
    assert cli([*train, *TINY_OVERRIDES, "training.max_steps=2"]) == 0
    capsys.readouterr()
    bench = load_bench_script("consensus_variants")
    args = ["--data_dir", str(tiny_store), "--checkpoint", str(run / "checkpoints" / "last.ckpt")]
    assert bench.main([*args, "--seeds", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(bench.VARIANTS)
    assert all(-1 <= float(line.split()[1]) <= 1 for line in lines)
    from alphastomics.diffusion_model import sample

    assert sample.pull_to_neighbors is bench.SHIPPED  # the shipped pull is back


def test_held_out_settings_keep_turn_and_cut(tmp_path: Path) -> None:
    bench = load_bench_script("held_out_settings")
    rng = np.random.default_rng(0)
    slices = np.repeat(["a", "b", "c", "d"], 30)
    positions = rng.normal(size=(120, 2)).astype(np.float32) + 5.0
    adata = ad.AnnData(rng.random((120, 6)).astype(np.float32), obs={"slice": slices})
    adata.obsm["spatial"] = positions
    src = tmp_path / "in.h5ad"
    adata.write_h5ad(src)
    kept, turned, blocks = (tmp_path / f"{n}.h5ad" for n in ("kept", "turned", "blocks"))
    common = ["--h5ad", str(src), "--keep_slices", "a", "c", "d"]
    assert bench.main(["slices", *common, "--output", str(kept)]) == 0
    assert bench.main(["slices", *common, "--rotate", "--output", str(turned)]) == 0
    same, rotated = ad.read_h5ad(kept), ad.read_h5ad(turned)
    assert list(same.obs["slice"].cat.categories) == ["a", "c", "d"] and same.n_obs == 90
    np.testing.assert_array_equal(same.X, rotated.X)
    for name in ("a", "c", "d"):  # each slice turned rigidly about its own centroid
        rows = (same.obs["slice"] == name).to_numpy()
        before, after = same.obsm["spatial"][rows], rotated.obsm["spatial"][rows]
        np.testing.assert_allclose(before.mean(0), after.mean(0), atol=1e-4)
        np.testing.assert_allclose(pdist(before), pdist(after), atol=1e-4)
        assert not np.allclose(before, after)
    assert (
        bench.main(["blocks", "--h5ad", str(src), "--n_blocks", "4", "--output", str(blocks)]) == 0
    )
    cut = ad.read_h5ad(blocks)
    assert cut.obs["block"].value_counts().to_dict() == {f"block{b}": 30 for b in range(4)}
    x = cut.obsm["spatial"][:, 0]
    assert x[cut.obs["block"] == "block0"].max() < x[cut.obs["block"] == "block1"].min()
    with pytest.raises(SystemExit, match="exists"):
        bench.main(["blocks", "--h5ad", str(src), "--output", str(blocks)])
    with pytest.raises(SystemExit, match="no slice"):
        bench.main(
            [
                "slices",
                "--h5ad",
                str(src),
                "--keep_slices",
                "z",
                "--output",
                str(tmp_path / "z.h5ad"),
            ]
        )


def test_region_queries_run_through_the_cli(tmp_path: Path) -> None:
    adata = make_tiny_adata(n_slices=1, n_cells=150)
    source = tmp_path / "volume.h5ad"
    adata.write_h5ad(source)
    bench = load_bench_script("region_queries")
    args = ["--h5ad", str(source), "--position_key", "ccf", "--budget_minutes", "0.2"]
    args += ["--output_dir", str(tmp_path / "out"), *TINY_OVERRIDES, "training.max_steps=3"]
    result = bench.run(args)
    rows = {(r["method"], r["task"]): r for r in result["rows"]}
    assert len(rows) == 6 and result["n_region_cells"] + result["n_train_cells"] == adata.n_obs
    defaults = rows[("model, sample (defaults)", "pos_to_expr")]["pcc_gene_mean"]
    own = rows[("model, sample --frame own", "pos_to_expr")]["pcc_gene_mean"]
    assert np.isfinite(defaults) and np.isfinite(own) and defaults != own
    assert np.isfinite(rows[("kNN regression", "expr_to_pos")]["knn_preservation"])
    assert (tmp_path / "out" / "results.md").is_file()

"""bench/imputation.py: the scores of Li et al.'s protocol on known answers, the folds, the kNN
baseline, and a smoke run on a tiny checkpoint with Tangram and gimVI absent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import load_bench_script, make_tiny_adata

from alphastomics.main import main

bench = load_bench_script("imputation")


def _truth(n: int = 50, g: int = 4) -> np.ndarray:
    return np.random.default_rng(0).gamma(2.0, 1.0, size=(n, g))


def test_a_perfect_prediction_scores_perfectly() -> None:
    truth = _truth()
    for pred in (truth, 3.0 * truth):  # every score is blind to a gene's scale
        scores = bench.score_genes(truth, pred)
        assert np.allclose(scores["pcc"], 1.0) and np.allclose(scores["ssim"], 1.0)
        assert np.allclose(scores["rmse"], 0.0, atol=1e-12)
        assert np.allclose(scores["js"], 0.0, atol=1e-12)


def test_scores_of_known_bad_predictions() -> None:
    truth = _truth()
    flipped = truth.max(0) - truth  # a mirror image: PCC -1, z-scores opposite
    scores = bench.score_genes(truth, flipped)
    assert np.allclose(scores["pcc"], -1.0)
    assert np.allclose(scores["rmse"], 2.0)
    constant = bench.score_genes(truth, np.ones_like(truth))
    assert np.allclose(constant["pcc"], 0.0)  # no information
    assert np.allclose(constant["rmse"], 1.0)  # the truth's z-scores have RMS 1
    # disjoint supports: the largest divergence, ln 2
    a = np.array([[1.0], [0.0]])
    assert bench.js_divergence(a, a[::-1])[0] == pytest.approx(math.log(2))
    # negative predictions are clipped at 0 (expression is non-negative)
    assert np.allclose(bench.score_genes(truth, truth - 100)["pcc"], 0.0)
    # a gene constant in the truth has no correlation
    assert np.isnan(bench.pcc(np.ones((5, 1)), np.arange(5.0)[:, None]))[0]


def test_ssim_matches_the_formula_by_hand() -> None:
    t, p = np.array([[0.0], [1.0], [2.0], [4.0]]), np.array([[1.0], [1.0], [2.0], [2.0]])
    x, y = t[:, 0] / 4, p[:, 0] / 2
    c1, c2 = 1e-4, 9e-4
    sx, sy = x.std(), y.std()
    cov = ((x - x.mean()) * (y - y.mean())).mean()
    expected = (
        (2 * x.mean() * y.mean() + c1)
        / (x.mean() ** 2 + y.mean() ** 2 + c1)
        * (2 * sx * sy + c2)
        / (sx**2 + sy**2 + c2)
        * (cov + c2 / 2)
        / (sx * sy + c2 / 2)
    )
    assert bench.ssim(t, p)[0] == pytest.approx(expected)
    assert 0 < expected < 1


def test_gene_folds_are_kfold_without_shuffling() -> None:
    folds = bench.gene_folds(351, 10)
    assert [len(f) for f in folds] == [36] + [35] * 9
    assert np.array_equal(np.concatenate(folds), np.arange(351))  # contiguous, each gene once


def test_knn_baseline_finds_the_matching_reference_cells() -> None:
    rng = np.random.default_rng(1)
    prototypes = rng.gamma(2.0, 1.0, size=(5, 40))
    reference = np.repeat(prototypes, 20, axis=0)  # 20 copies of each
    measured, dropped = np.arange(30), np.arange(30, 40)
    pred = bench.knn_predict(reference, prototypes[:, measured], measured, dropped)
    assert np.allclose(pred, prototypes[:, dropped])


def test_model_is_trained_by_the_cli_with_only_the_time_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[list[str]] = []
    monkeypatch.setattr(bench, "_run", lambda command, commands: ran.append(command))
    args = bench.build_parser().parse_args(["--dataset", "seqfish", "--output_dir", str(tmp_path)])
    bench.train_model(args, [], tmp_path / "reference.h5ad", tmp_path, [])
    preprocess, train = ran
    assert preprocess[2:4] == ["alphastomics.main", "preprocess"]
    assert train[3] == "train"
    overrides = [a for a in train if "=" in a]
    assert overrides == ["training.max_time_minutes=15.0"]


@pytest.fixture(scope="module")
def checkpoint(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model of the 16 genes gene_0 ... gene_15 (one epoch)."""
    run = tmp_path_factory.mktemp("imputation_bench") / "run"
    args = ["train", "--data_dir", str(tiny_store), "--output_dir", str(run)]
    args += ["model.hidden_dim=16", "model.n_layers=1", "model.n_heads=2"]
    args += ["diffusion.diffusion_steps=20", "sampling.steps=4", "training.max_epochs=1"]
    args += ["training.accelerator=cpu"]
    assert main(args) == 0
    return run / "checkpoints" / "last.ckpt"


def test_a_gene_constant_in_the_query_is_left_out_of_every_score() -> None:
    truth = _truth()
    truth[:, 2] = 1.5
    scores = bench.score_genes(truth, truth + 0.1)
    for name in bench.METRICS:
        assert np.isnan(scores[name][2]) and np.isfinite(np.delete(scores[name], 2)).all()


def test_smoke_run_with_the_peers_absent(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "tissue.h5ad"
    make_tiny_adata(n_slices=3, n_cells=40, seed=2).write_h5ad(data)
    for method in ("tangram", "gimvi"):  # as on a machine without the [peers] extra
        monkeypatch.setitem(bench.PEERS, method, f"no_such_module_{method}")
    out = tmp_path / "bench"
    argv = ["--h5ad", str(data), "--position_key", "ccf", "--query_slices", "slice_2"]
    argv += ["--n_folds", "4", "--checkpoint", str(checkpoint)]
    argv += ["--output_dir", str(out), "--device", "cpu"]
    assert bench.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["rows"]) == {"model", "knn"}
    assert set(result["skipped"]) == {"tangram", "gimvi"}
    assert "pip install -e '.[peers]'" in result["skipped"]["tangram"]
    for row in result["rows"].values():
        assert len(row["scores"]["pcc"]) == 16
        assert all(math.isfinite(row["median"][m]) for m in bench.METRICS)
    text = (out / "results.md").read_text()
    assert "| model |" in text and "| tangram | – |" in text


@pytest.mark.parametrize("method", ["tangram", "gimvi"])
def test_peer_rows_predict_the_dropped_genes(method: str) -> None:
    """Where the [peers] extra is installed: mixed-case gene names, the dropped genes' columns."""
    pytest.importorskip(bench.PEERS[method])
    rng = np.random.default_rng(0)
    reference = np.log1p(rng.poisson(3.0, size=(40, 6)).astype(np.float64))
    genes = ["Abc", "Def", "GHI", "jkl", "Mno", "Pqr"]
    measured, dropped = np.array([0, 1, 2, 3]), np.array([4, 5])
    predict = bench.tangram_predict if method == "tangram" else bench.gimvi_predict
    pred = predict(
        reference,
        reference[:25, measured],
        measured,
        dropped,
        genes=genes,
        epochs=3,
        device="cpu",
        seed=0,
    )
    assert pred.shape == (25, 2) and np.isfinite(pred).all()


def _bench_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = bench.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


def test_too_few_shared_genes_for_the_folds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "tissue.h5ad"
    make_tiny_adata(n_slices=2, n_cells=30, n_genes=3, seed=1).write_h5ad(data)
    argv = ["--h5ad", str(data), "--position_key", "ccf", "--query_slices", "slice_1"]
    argv += ["--methods", "knn", "--output_dir", str(tmp_path / "out")]
    line = _bench_error(argv, capsys)
    assert str(data) in line and "share 3 genes" in line and "--n_folds 10" in line
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_checkpoint_without_the_query_genes(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adata = make_tiny_adata(n_slices=2, n_cells=30, seed=1)
    adata.var_names = [*(f"gene_{i}" for i in range(15)), "not_in_model"]
    data = tmp_path / "tissue.h5ad"
    adata.write_h5ad(data)
    argv = ["--h5ad", str(data), "--position_key", "ccf", "--query_slices", "slice_1"]
    argv += ["--n_folds", "4", "--methods", "model", "--checkpoint", str(checkpoint)]
    argv += ["--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    line = _bench_error(argv, capsys)
    assert str(checkpoint) in line and "lacks 1 of the 16 genes" in line
    assert "not_in_model" in line and "drop --checkpoint" in line


@pytest.mark.slow
def test_the_model_row_trains_by_the_cli_and_imputes_every_fold(tmp_path: Path) -> None:
    """End to end without --checkpoint: preprocess + train subprocesses, then the folds."""
    data = tmp_path / "tissue.h5ad"
    make_tiny_adata(n_slices=3, n_cells=30, n_genes=8, seed=4).write_h5ad(data)
    out = tmp_path / "bench"
    argv = ["--h5ad", str(data), "--position_key", "ccf", "--query_slices", "slice_0"]
    argv += ["--n_folds", "2", "--methods", "model", "--train_minutes", "0.2"]
    argv += ["--output_dir", str(out), "--device", "cpu"]
    argv += ["model.hidden_dim=16", "model.n_layers=1", "model.n_heads=2"]
    argv += ["diffusion.diffusion_steps=20", "sampling.steps=4", "training.max_epochs=2"]
    argv += ["training.accelerator=cpu"]
    assert bench.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert (out / "run" / "checkpoints" / "last.ckpt").is_file()
    assert [c.split()[3] for c in result["commands"][1:]] == ["preprocess", "train"]
    assert "training.max_epochs=2" in result["commands"][2]  # the overrides reach training
    row = result["rows"]["model"]
    assert row["fit_seconds"] > 0 and len(row["scores"]["pcc"]) == 8
    assert all(math.isfinite(row["median"][m]) for m in bench.METRICS)

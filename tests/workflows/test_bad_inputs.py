"""Bad input through the CLI: one line naming the problem and the fix, a non-zero exit, no
traceback, no partial output, and nothing a user had overwritten without --overwrite."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import PYTHON_CLI, TINY_OVERRIDES, cli, make_tiny_adata

from alphastomics.main import main

TINY = [
    *TINY_OVERRIDES,
    "training.max_epochs=1",
    "training.val_every_n_epochs=5",
    "training.accelerator=cpu",
]


def run_cli(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and stderr of ``alphastomics ARGS`` run in-process."""
    code = cli(*args)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, command: str, *fragments: str) -> str:
    """Exit status 2 and exactly one stderr line ``alphastomics CMD: error: ...``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"alphastomics {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-epoch model on ``tiny_store`` and an .h5ad of its genes (16 genes, 3D ``ccf``)."""
    root = tmp_path_factory.mktemp("bad")
    out = root / "run"
    assert main(["train", "--data_dir", str(tiny_store), "--output_dir", str(out), *TINY]) == 0
    h5ad = root / "cells.h5ad"
    make_tiny_adata(n_slices=1, n_cells=30).write_h5ad(h5ad)
    return {"ckpt": out / "checkpoints" / "last.ckpt", "store": tiny_store, "h5ad": h5ad}


# ------------------------------------------------------------------------------------------
# preprocess


def _garbage(adata: ad.AnnData, path: Path) -> None:
    path.write_bytes(b"\x89HDF\r\n this is not an HDF5 file")


def _coords(columns: int) -> Callable[[ad.AnnData, Path], None]:
    def change(adata: ad.AnnData, path: Path) -> None:
        adata.obsm["ccf"] = np.ones((adata.n_obs, columns)) * np.arange(adata.n_obs)[:, None]
        adata.write_h5ad(path)

    return change


def _set(where: str, value: float) -> Callable[[ad.AnnData, Path], None]:
    def change(adata: ad.AnnData, path: Path) -> None:
        if where == "coords":
            coords = adata.obsm["ccf"].copy()
            coords[3, 1] = value
            adata.obsm["ccf"] = coords
        else:
            adata.X = adata.X.astype(np.float32)
            adata.X[5, 2] = value
        adata.write_h5ad(path)

    return change


def _zero_slice(adata: ad.AnnData, path: Path) -> None:
    adata.X[(adata.obs["slice"] == "slice_1").to_numpy()] = 0
    adata.write_h5ad(path)


def _one_cell_slice(adata: ad.AnnData, path: Path) -> None:
    first = np.flatnonzero((adata.obs["slice"] == "slice_1").to_numpy())[0]
    keep = (adata.obs["slice"] != "slice_1").to_numpy()
    keep[first] = True
    adata[keep].copy().write_h5ad(path)


def _small_slice(n_cells: int) -> Callable[[ad.AnnData, Path], None]:
    def change(adata: ad.AnnData, path: Path) -> None:
        rows = np.flatnonzero((adata.obs["slice"] == "slice_1").to_numpy())
        keep = (adata.obs["slice"] != "slice_1").to_numpy()
        keep[rows[:n_cells]] = True
        adata[keep].copy().write_h5ad(path)

    return change


def _duplicate_genes(adata: ad.AnnData, path: Path) -> None:
    adata.var_names = ["gene_0", *adata.var_names[1:-1], "gene_1"]
    adata.write_h5ad(path)


def _no_position_key(adata: ad.AnnData, path: Path) -> None:
    adata.obsm["spatial"] = adata.obsm.pop("ccf")
    adata.write_h5ad(path)


PREPROCESS_CASES: dict[str, tuple[Callable[[ad.AnnData, Path], None], list[str], list[str]]] = {
    "corrupt h5ad": (_garbage, [], ["cannot read", "bad.h5ad", "valid .h5ad"]),
    "missing position key": (
        _no_position_key,
        [],
        ["obsm['ccf']", "'spatial'", "--position_key spatial"],
    ),
    "1-column coordinates": (_coords(1), [], ["shape (60, 1)", "2 or 3 columns"]),
    "4-column coordinates": (_coords(4), [], ["shape (60, 4)", "2 or 3 columns"]),
    "NaN coordinates": (_set("coords", np.nan), [], ["NaN or infinite", "obsm['ccf']", "drop"]),
    "inf coordinates": (_set("coords", np.inf), [], ["NaN or infinite", "obsm['ccf']"]),
    "NaN expression": (_set("X", np.nan), [], ["1 cell has NaN or infinite", "adata.X"]),
    "all-zero slice": (
        _zero_slice,
        [],
        ["slice 'slice_1'", "zero expression", "--normalize none"],
    ),
    "one-cell slice": (_one_cell_slice, [], ["slice 'slice_1'", "has 1 cell;", "at least 3"]),
    "duplicate genes": (_duplicate_genes, [], ["duplicate gene names", "'gene_1'", "unique"]),
    "gene list without overlap": (
        lambda adata, path: adata.write_h5ad(path),
        ["--gene_list_file", "GENES"],
        ["2 genes of the gene list are in no input file", "'GAPDH'"],
    ),
    "unknown slice key": (
        lambda adata, path: adata.write_h5ad(path),
        ["--slice_key", "section"],
        ["no obs column 'section'", "--slice_key"],
    ),
    "two-cell slice (test needs 3)": (
        _small_slice(2),
        [],
        ["slice 'slice_1' has 2 cells", "at least 3"],
    ),
    "no genes": (
        lambda adata, path: ad.AnnData(obs=adata.obs, obsm=dict(adata.obsm)).write_h5ad(path),
        [],
        ["has no genes (adata.var is empty)"],
    ),
    "negative seed": (lambda adata, path: adata.write_h5ad(path), ["--seed", "-1"], ["--seed"]),
    "gene list in UTF-16 without a byte-order mark": (
        lambda adata, path: adata.write_h5ad(path),
        ["--gene_list_file", "UTF16"],
        ["holds NUL characters", "save it as UTF-8"],
    ),
    "gene list in Latin-1": (
        lambda adata, path: adata.write_h5ad(path),
        ["--gene_list_file", "LATIN1"],
        ["is not UTF-8 text", "save it as UTF-8"],
    ),
    "gene list is a folder": (
        lambda adata, path: adata.write_h5ad(path),
        ["--gene_list_file", "FOLDER"],
        ["is a folder", "--gene_list_file FILE"],
    ),
}


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.parametrize("case", list(PREPROCESS_CASES))
def test_preprocess_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    build, flags, fragments = PREPROCESS_CASES[case]
    source = tmp_path / "bad.h5ad"
    build(make_tiny_adata(n_slices=2, n_cells=30), source)
    genes = tmp_path / "genes.txt"
    genes.write_text("GAPDH\nACTB\n")
    utf16 = tmp_path / "genes16.txt"
    utf16.write_bytes("gene_0\ngene_1\n".encode("utf-16-le"))  # no byte-order mark
    latin1 = tmp_path / "genes_latin1.txt"
    latin1.write_bytes("gene_0\ngène_1\n".encode("latin-1"))
    files = {"GENES": genes, "UTF16": utf16, "LATIN1": latin1, "FOLDER": tmp_path}
    flags = [str(files.get(f, f)) for f in flags]
    out = tmp_path / "work" / "store"
    code, err = run_cli(["preprocess", "--input", source, "--output_dir", out, *flags], capsys)
    assert_one_line_error(code, err, "preprocess", *fragments)
    assert not out.parent.exists()  # no partial store, not even its parent folder


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_gene_list_with_a_byte_order_mark(tmp_path: Path, encoding: str) -> None:
    """Editors on Windows write a byte-order mark; it is not part of the first gene's name."""
    source = tmp_path / "a.h5ad"
    make_tiny_adata(n_slices=2, n_cells=30).write_h5ad(source)
    genes = tmp_path / "genes.txt"
    genes.write_bytes("gene_0\r\ngene_3\r\n".encode(encoding))
    out = tmp_path / "store"
    args = ["preprocess", "--input", source, "--output_dir", out, "--gene_list_file", genes]
    assert main([str(a) for a in args]) == 0
    assert json.loads((out / "metadata.json").read_text())["genes"] == ["gene_0", "gene_3"]


def test_all_zero_slice_is_kept_without_normalisation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "zero.h5ad"
    _zero_slice(make_tiny_adata(n_slices=2, n_cells=30), source)
    out = tmp_path / "store"
    assert (
        main(
            ["preprocess", "--input", str(source), "--output_dir", str(out), "--normalize", "none"]
        )
        == 0
    )
    assert "slice 'slice_1' has zero expression" in caplog.text


def test_preprocess_keeps_an_existing_store(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "store"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, err = run_cli(["preprocess", "--input", run["h5ad"], "--output_dir", out], capsys)
    assert_one_line_error(code, err, "preprocess", "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_preprocess_overwrite_keeps_its_inputs_and_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "D"
    folder.mkdir()
    make_tiny_adata(n_slices=2, n_cells=30).write_h5ad(folder / "a.h5ad")
    (folder / "notes.txt").write_text("n\n")
    before = _snapshot(folder)
    for source in (["--input_dir", folder], ["--input", folder / "a.h5ad"]):
        for extra in ([], ["--overwrite"]):
            args = ["preprocess", *source, "--output_dir", folder, *extra]
            code, err = run_cli(args, capsys)
            assert_one_line_error(code, err, "preprocess", "holds the input", "a.h5ad")
            assert _snapshot(folder) == before
    other = tmp_path / "other.h5ad"
    make_tiny_adata(n_slices=2, n_cells=30).write_h5ad(other)
    args = ["preprocess", "--input", other, "--output_dir", folder, "--overwrite"]
    code, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "preprocess", "did not write (a.h5ad, notes.txt)")
    assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D", "other.h5ad"]


def test_preprocess_names_the_file_listed_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_tiny_adata(n_slices=2, n_cells=30).write_h5ad("a.h5ad")
    args = ["preprocess", "--input", "a.h5ad", f"../{tmp_path.name}/a.h5ad", "--output_dir", "s"]
    code, err = run_cli(args, capsys)
    assert_one_line_error(
        code, err, "preprocess", f"input file ../{tmp_path.name}/a.h5ad is listed twice (as a.h5ad"
    )
    code, err = run_cli(
        ["preprocess", "--input", "a.h5ad", "--output_dir", ".", "--overwrite"], capsys
    )
    assert_one_line_error(code, err, "preprocess", "--output_dir . holds the input a.h5ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad"]


# ------------------------------------------------------------------------------------------
# train


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["training.learning_rate=0.1"], ["'training.learning_rate'", "--print_config"]),
        (["diffusion.diffusion_steps=-5"], ["diffusion.diffusion_steps must be >= 2"]),
        (["training.lr=fast"], ["'training.lr'"]),
        (["training.max_epochs"], ["not KEY=VALUE"]),
        (["training.lr=inf"], ["training.lr must be a finite number", "inf"]),
        (["training.lr=nan"], ["training.lr must be a finite number"]),
        (["training.max_time_minutes=-1"], ["training.max_time_minutes must be > 0", "null"]),
        (["training.max_time_minutes=0"], ["training.max_time_minutes must be > 0"]),
        (["training.max_steps=0"], ["training.max_steps must be -1"]),
        (["training.precision=8"], ["training.precision must be one of", "bf16-mixed", "'8'"]),
        (["training.seed=-1"], ["training.seed must be in [0, 4294967295]"]),
        (["training.seed=4294967296"], ["training.seed must be in [0, 4294967295]"]),
    ],
)
def test_train_bad_config(
    tiny_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    fragments: list[str],
) -> None:
    out = tmp_path / "run"
    args = ["train", "--data_dir", tiny_store, "--output_dir", out, *overrides]
    assert_one_line_error(*run_cli(args, capsys), "train", *fragments)
    assert not out.exists()


def test_train_unknown_key_in_config_file(
    tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "my.yaml"
    config.write_text("model:\n  hidden_dim: 16\n  depth: 3\n")
    args = ["train", "--config", config, "--data_dir", tiny_store, "--output_dir", tmp_path / "r"]
    assert_one_line_error(*run_cli(args, capsys), "train", "'model.depth'")


def test_train_needs_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--data_dir", tmp_path, "--output_dir", tmp_path / "run", *TINY]
    assert_one_line_error(*run_cli(args, capsys), "train", "no metadata.json", "preprocess")
    assert not (tmp_path / "run").exists()


def test_train_that_writes_no_checkpoint_fails(
    tiny_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Weights that turn NaN are never saved; the run must then fail, not report success."""
    from alphastomics.training import trainer

    monkeypatch.setattr(trainer, "_nonfinite_weights", lambda checkpoint: ["model.w"])
    out = tmp_path / "run"
    code, err = run_cli(["train", "--data_dir", tiny_store, "--output_dir", out, *TINY], capsys)
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("alphastomics train: training ended at step 2 without writing")
    assert "NaN or inf" in line and "training.lr" in line
    assert not list((out / "checkpoints").glob("*.ckpt"))


def test_demo_refuses_a_negative_time_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    code, err = run_cli(["demo", "--output_dir", out, "--minutes", "-1"], capsys)
    assert_one_line_error(code, err, "demo", "--minutes", "-1")
    assert not out.exists()


def test_two_trainings_into_one_run_folder(
    tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While one run holds the folder, a second is refused and changes nothing in it."""
    from alphastomics.utils.io import folder_lock

    out = tmp_path / "run"
    with folder_lock(out):
        before = sorted(p.name for p in out.iterdir())
        args = ["train", "--data_dir", tiny_store, "--output_dir", out, *TINY]
        code, err = run_cli([*args, "--overwrite"], capsys)
        assert_one_line_error(code, err, "train", "in use by another run", f"process {os.getpid()}")
        assert sorted(p.name for p in out.iterdir()) == before == [".alphastomics.lock"]
    assert not out.exists() or not any(out.iterdir())


def test_stale_run_lock_is_taken_over(
    tiny_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".alphastomics.lock").write_text(f"process {child.pid} on {socket.gethostname()}\n")
    assert main(["train", "--data_dir", str(tiny_store), "--output_dir", str(out), *TINY]) == 0
    assert f"from process {child.pid}" in caplog.text and "no longer runs" in caplog.text
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert not (out / ".alphastomics.lock").exists()


def test_config_file_errors_are_one_line(
    tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {
        "list.yaml": ("- training\n- model\n", ["holds a list, not a mapping of sections"]),
        "indent.yaml": (
            "model:\n  hidden_dim: 16\n   n_layers: 2\n",
            ["is not valid YAML at line 3, column 12", "mapping values are not allowed"],
        ),
        "open.yaml": ("model: [\n", ["is not valid YAML at line 2"]),
    }
    for name, (text, fragments) in cases.items():
        config = tmp_path / name
        config.write_text(text)
        args = [
            "train",
            "--config",
            config,
            "--data_dir",
            tiny_store,
            "--output_dir",
            tmp_path / "r",
        ]
        assert_one_line_error(*run_cli(args, capsys), "train", name, *fragments)
    args = ["train", "--config", tmp_path, "--data_dir", tiny_store]
    assert_one_line_error(*run_cli(args, capsys), "train", "is a folder")
    assert not (tmp_path / "r").exists()


def _tampered(store: Path, change: Callable[[Path, dict], object]) -> None:
    meta = json.loads((store / "metadata.json").read_text())
    replaced = change(store, meta)
    (store / "metadata.json").write_text(json.dumps(meta if replaced is None else replaced))


STORE_CASES: dict[str, tuple[Callable[[Path, dict], object], list[str]]] = {
    "metadata is a list": (lambda store, meta: [meta], ["holds a JSON list"]),
    "missing key": (lambda store, meta: meta.pop("slices") and None, ["has no key 'slices'"]),
    "wrong gene count": (
        lambda store, meta: meta.update(n_genes=15),
        ["'n_genes' says 15 genes but 'genes' lists 16"],
    ),
    "short gene mask": (
        lambda store, meta: meta["slices"][1].update(gene_mask=[True] * 3),
        ["slices[1]: 'gene_mask' must list 16 booleans"],
    ),
    "npy of the wrong shape": (
        lambda store, meta: np.save(
            store / meta["slices"][2]["path"] / "expression.npy", np.zeros((4, 16), np.float32)
        ),
        ["expression.npy has shape (4, 16)", "the store is damaged"],
    ),
}


@pytest.mark.parametrize("case", list(STORE_CASES))
def test_tampered_store_is_one_line(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    change, fragments = STORE_CASES[case]
    store = tmp_path / "store"
    shutil.copytree(run["store"], store)
    _tampered(store, change)
    commands = {
        "train": ["--data_dir", store, "--output_dir", tmp_path / "run", *TINY],
        "test": ["--checkpoint", run["ckpt"], "--data_dir", store, "--output_dir", tmp_path / "t"],
        "extract": [
            "--checkpoint",
            run["ckpt"],
            "--data_dir",
            store,
            "--output",
            tmp_path / "e.npz",
        ],
    }
    for command, args in commands.items():
        code, err = run_cli([command, *args], capsys)
        assert_one_line_error(
            code, err, command, "metadata.json" if "npy" not in case else "", *fragments
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


# ------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("command", ["test", "sample", "extract"])
def test_not_a_checkpoint(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    junk = tmp_path / "model.ckpt"
    junk.write_text("this is a text file, not a checkpoint\n")
    args = {
        "test": ["--data_dir", run["store"], "--output_dir", tmp_path / "t"],
        "sample": ["--input_data", run["h5ad"], "--sample_mode", "joint"],
        "extract": ["--data_dir", run["store"], "--output", tmp_path / "e.npz"],
    }[command]
    code, err = run_cli([command, "--checkpoint", junk, *args], capsys)
    assert_one_line_error(code, err, command, "model.ckpt", "not a readable checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


@pytest.mark.parametrize("command", ["test", "sample", "extract"])
def test_checkpoint_that_is_a_folder(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    folder = run["ckpt"].parent.parent  # the run folder, not its checkpoint
    args = {
        "test": ["--data_dir", run["store"], "--output_dir", tmp_path / "t"],
        "sample": ["--input_data", run["h5ad"], "--sample_mode", "joint"],
        "extract": ["--data_dir", run["store"], "--output", tmp_path / "e.npz"],
    }[command]
    code, err = run_cli([command, "--checkpoint", folder, *args], capsys)
    hint = f"did you mean {folder / 'checkpoints' / 'best.ckpt'}?"
    assert_one_line_error(code, err, command, "is a folder, not a .ckpt file", hint)
    assert not any(tmp_path.iterdir())


def test_test_scores_the_smallest_slice_preprocess_allows(
    run: dict[str, Path], tmp_path: Path
) -> None:
    """preprocess and test agree on the smallest slice: 3 cells."""
    source = tmp_path / "small.h5ad"
    _small_slice(3)(make_tiny_adata(n_slices=2, n_cells=30), source)
    store, out = tmp_path / "store", tmp_path / "t"
    args = ["preprocess", "--input", source, "--output_dir", store, "--test_slices", "slice_1"]
    assert main([str(a) for a in args]) == 0
    args = ["test", "--checkpoint", run["ckpt"], "--data_dir", store, "--output_dir", out]
    assert main([str(a) for a in args]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["slices"]["slice_1"]["n_cells"] == 3


def test_test_seed_out_of_range(run: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["test", "--checkpoint", run["ckpt"], "--data_dir", run["store"], "--seed", "-3"]
    assert_one_line_error(*run_cli(args, capsys), "test", "--seed", "outside [0, 4294967295]")


def test_checkpoint_and_store_with_other_genes(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "other.h5ad"
    make_tiny_adata(n_slices=3, n_cells=30, n_genes=10).write_h5ad(source)
    store = tmp_path / "store"
    assert main(["preprocess", "--input", str(source), "--output_dir", str(store)]) == 0
    capsys.readouterr()
    out = tmp_path / "test"
    args = ["test", "--checkpoint", run["ckpt"], "--data_dir", store, "--output_dir", out]
    assert_one_line_error(
        *run_cli(args, capsys), "test", "10 of the checkpoint's 16 genes", "--gene_list_file"
    )
    args = ["extract", "--checkpoint", run["ckpt"], "--data_dir", store, "--output", out / "e.npz"]
    out.mkdir()
    assert_one_line_error(*run_cli(args, capsys), "extract", "10 of the checkpoint's 16 genes")
    assert not any(out.iterdir())


def test_sample_h5ad_with_too_few_genes(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adata = make_tiny_adata(n_slices=1, n_cells=30)
    adata.var_names = [f"other_{i}" if i >= 4 else g for i, g in enumerate(adata.var_names)]
    source = tmp_path / "few.h5ad"
    adata.write_h5ad(source)
    args = ["sample", "--checkpoint", run["ckpt"], "--input_data", source]
    code, err = run_cli([*args, "--sample_mode", "expr_to_pos"], capsys)
    assert_one_line_error(
        code, err, "sample", "only 4 of the checkpoint's 16", "--min_gene_overlap"
    )
    # one rule for every command that reads a new .h5ad
    extract = ["extract", "--checkpoint", run["ckpt"], "--input_data", source]
    code, err = run_cli([*extract, "--output", tmp_path / "e.npz"], capsys)
    assert_one_line_error(
        code, err, "extract", "only 4 of the checkpoint's 16", "--min_gene_overlap 0.5"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.h5ad"]


# ------------------------------------------------------------------------------------------
# sample / test / extract requests


def _no_positions(path: Path) -> Path:
    adata = make_tiny_adata(n_slices=1, n_cells=30)
    del adata.obsm["ccf"]
    adata.write_h5ad(path)
    return path


SAMPLE_CASES: dict[str, tuple[list[str], list[str]]] = {
    "pos_to_expr without positions": (
        ["--input_data", "{tmp}/nopos.h5ad", "--sample_mode", "pos_to_expr"],
        ["no coordinates in adata.obsm['ccf']", "nopos.h5ad"],
    ),
    "unknown sample mode": (
        ["--sample_mode", "pos2expr"],
        ["unknown --sample_mode 'pos2expr'", "expr_to_pos"],
    ),
    "steps above T": (["--sample_mode", "joint", "--steps", "21"], ["--steps 21", "(20)"]),
    "zero steps": (["--sample_mode", "joint", "--steps", "0"], ["--steps 0", "between 1"]),
    "output in a missing folder": (
        ["--sample_mode", "joint", "--output", "{tmp}/missing/out.h5ad"],
        ["folder", "does not exist", "create it first"],
    ),
    "output with another suffix": (
        ["--sample_mode", "joint", "--output", "{tmp}/out.pt"],
        ["a .h5ad input gives a .h5ad output"],
    ),
    "input is not h5ad or pt": (
        ["--sample_mode", "joint", "--input_data", "{tmp}/cells.csv"],
        ["must be an .h5ad or .pt file"],
    ),
    "bad sampler flag": (["--sample_mode", "joint", "--sampler", "euler"], ["invalid choice"]),
    "seed above 2**63": (
        ["--sample_mode", "joint", "--seed", str(2**63)],
        ["--seed", "outside [0, 4294967295]"],
    ),
    "gene overlap as a percentage": (
        ["--sample_mode", "expr_to_pos", "--min_gene_overlap", "150"],
        ["--min_gene_overlap", "not a share in [0, 1]"],
    ),
    "n_cells not a number": (
        ["--sample_mode", "joint", "--n_cells", "many"],
        ["--n_cells many", "'many' is not a whole number", "--n_cells 2000"],
    ),
    "n_cells too few": (
        ["--sample_mode", "joint", "--n_cells", "slice_0=2"],
        ["--n_cells slice_0=2", "at least 3"],
    ),
    "n_cells of a slice the reference lacks": (
        ["--sample_mode", "joint", "--n_cells", "slice_9=40"],
        ["slice 'slice_9'", "not in", "cells.h5ad (its slices: slice_0)"],
    ),
    "n_cells names a slice twice": (
        ["--sample_mode", "joint", "--n_cells", "slice_0=5,slice_0=6"],
        ["'slice_0' is listed twice"],
    ),
    "n_cells item without a name": (
        ["--sample_mode", "joint", "--n_cells", "slice_0=5,7"],
        ["'7' is not NAME=COUNT"],
    ),
    "n_cells without joint": (
        ["--sample_mode", "expr_to_pos", "--n_cells", "40"],
        ["--n_cells 40", "--sample_mode joint", "got --sample_mode expr_to_pos"],
    ),
    "n_cells with a .pt input": (
        ["--sample_mode", "joint", "--input_data", "{tmp}/items.pt", "--n_cells", "40"],
        ["--n_cells 40", "on items.pt"],
    ),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sample_bad_request(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    flags, fragments = SAMPLE_CASES[case]
    _no_positions(tmp_path / "nopos.h5ad")
    torch.save(_pt(), tmp_path / "items.pt")
    flags = [f.format(tmp=tmp_path) for f in flags]
    base = ["sample", "--checkpoint", run["ckpt"]]
    if "--input_data" not in flags:
        base += ["--input_data", run["h5ad"]]
    code, err = run_cli([*base, *flags], capsys)
    line = assert_one_line_error(code, err, "sample", *fragments)
    if case == "bad sampler flag":
        assert "alphastomics sample --help" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.pt", "nopos.h5ad"]
    assert not list(run["h5ad"].parent.glob("cells_alphastomics_*"))


def _impute_input(change: Callable[[ad.AnnData], ad.AnnData | None]) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        adata = make_tiny_adata(n_slices=1, n_cells=30)
        adata = change(adata) or adata
        path = folder / "panel.h5ad"
        adata.write_h5ad(path)
        return path

    return write


def _rename_genes(adata: ad.AnnData) -> None:
    adata.var_names = [f"other_{i}" for i in range(adata.n_vars)]


def _no_ccf(adata: ad.AnnData) -> ad.AnnData:
    del adata.obsm["ccf"]
    return adata[:, :8].copy()


IMPUTE_CASES: dict[str, tuple[Callable[[Path], Path], list[str], list[str]]] = {
    "every gene present": (
        _impute_input(lambda a: None),
        [],
        ["panel.h5ad has all 16 of the model's genes", "nothing to impute", "pos_to_expr"],
    ),
    "no shared gene": (
        _impute_input(_rename_genes),
        [],
        ["panel.h5ad measures none of the model's 16 genes", "check var_names"],
    ),
    "named position key missing": (
        _impute_input(_no_ccf),
        ["--position_key", "ccf"],
        ["panel.h5ad has no coordinates in adata.obsm['ccf']"],
    ),
    "too few genes for the overlap asked": (
        _impute_input(lambda a: a[:, :4].copy()),
        ["--min_gene_overlap", "0.5"],
        ["only 4 of the checkpoint's 16 genes", "--min_gene_overlap 0.5"],
    ),
    "pt input": (
        lambda folder: folder / "panel.pt",
        [],
        ["--sample_mode impute", "needs an .h5ad input", "panel.pt"],
    ),
}


@pytest.mark.parametrize("case", list(IMPUTE_CASES))
def test_sample_impute_bad_input(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    make, flags, fragments = IMPUTE_CASES[case]
    source = make(tmp_path)
    if source.suffix == ".pt":
        torch.save(_pt(), source)
    args = ["sample", "--checkpoint", run["ckpt"], "--input_data", source, *flags]
    code, err = run_cli([*args, "--sample_mode", "impute"], capsys)
    assert_one_line_error(code, err, "sample", *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]


def test_test_steps_above_T_and_existing_metrics(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "t"
    args = ["test", "--checkpoint", run["ckpt"], "--data_dir", run["store"], "--output_dir", out]
    assert_one_line_error(*run_cli([*args, "--steps", "50"], capsys), "test", "--steps 50", "(20)")
    assert not out.exists()
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert_one_line_error(*run_cli(args, capsys), "test", "--overwrite")
    assert (out / "metrics.json").read_text() == "{}"


def test_outputs_are_never_overwritten_silently(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample_out, npz = tmp_path / "out.h5ad", tmp_path / "emb.npz"
    for path in (sample_out, npz):
        path.write_bytes(b"user data")
    sample = ["sample", "--checkpoint", run["ckpt"], "--input_data", run["h5ad"]]
    code, err = run_cli([*sample, "--sample_mode", "joint", "--output", sample_out], capsys)
    assert_one_line_error(code, err, "sample", "already exists", "--overwrite")
    extract = ["extract", "--checkpoint", run["ckpt"], "--data_dir", run["store"]]
    assert_one_line_error(*run_cli([*extract, "--output", npz], capsys), "extract", "--overwrite")
    assert sample_out.read_bytes() == npz.read_bytes() == b"user data"
    code, err = run_cli([*extract, "--output", tmp_path / "missing" / "e.npz"], capsys)
    assert_one_line_error(code, err, "extract", "does not exist", "create it first")


def test_pt_input_without_the_expected_keys(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.pt"
    torch.save({"expression": torch.zeros(1, 5, 16)}, source)
    args = ["sample", "--checkpoint", run["ckpt"], "--input_data", source, "--sample_mode", "joint"]
    assert_one_line_error(*run_cli(args, capsys), "sample", "positions, node_mask")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt"]


def _pt(n: int = 12, genes: int = 16, dims: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "expression": torch.rand(1, n, genes, generator=generator),
        "positions": torch.randn(1, n, dims, generator=generator),
        "node_mask": torch.ones(1, n, dtype=torch.bool),
    }


def _pt_with(change: Callable[[dict[str, torch.Tensor]], None]) -> dict[str, torch.Tensor]:
    data = _pt()
    change(data)
    return data


PT_CASES: dict[str, tuple[dict[str, torch.Tensor], list[str]]] = {
    "NaN position": (
        _pt_with(lambda d: d["positions"].__setitem__((0, 3, 1), float("nan"))),
        ["1 real cell has NaN or infinite values in 'positions'", "node_mask False"],
    ),
    "inf expression": (
        _pt_with(lambda d: d["expression"].__setitem__((0, 2, 5), float("inf"))),
        ["NaN or infinite values in 'expression'"],
    ),
    "4-column positions": (_pt(dims=4), ["positions have 4 columns", "expected 2 or 3"]),
    "wrong gene count": (_pt(genes=15), ["expression has 15 genes, the checkpoint 16"]),
    "mismatched cells": (
        _pt_with(lambda d: d.__setitem__("node_mask", torch.ones(1, 11, dtype=torch.bool))),
        ["must agree on (B, N)"],
    ),
    "one real cell": (
        _pt_with(lambda d: d["node_mask"][0, 1:].zero_()),
        ["item 0 has 1 real cells", "at least 3"],
    ),
    "node_mask not boolean": (
        _pt_with(lambda d: d.__setitem__("node_mask", torch.full((1, 12), 0.5))),
        ["node_mask must be boolean"],
    ),
}


@pytest.mark.parametrize("case", list(PT_CASES))
def test_pt_input_is_checked_like_h5ad(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    data, fragments = PT_CASES[case]
    source = tmp_path / "in.pt"
    torch.save(data, source)
    args = ["sample", "--checkpoint", run["ckpt"], "--input_data", source]
    code, err = run_cli([*args, "--sample_mode", "pos_to_expr"], capsys)
    assert_one_line_error(code, err, "sample", "in.pt", *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt"]


def test_pt_input_with_2d_positions_and_padding(run: dict[str, Path], tmp_path: Path) -> None:
    """2-column positions are read with z = 0 and come back with 2 columns; NaN in padded
    cells is never read."""
    data = _pt(dims=2)
    data["node_mask"][0, -2:] = False
    data["positions"][0, -1] = float("nan")
    source, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(data, source)
    for mode in ("pos_to_expr", "expr_to_pos"):
        args = ["sample", "--checkpoint", run["ckpt"], "--input_data", source, "--output", out]
        assert main([str(a) for a in [*args, "--sample_mode", mode, "--overwrite"]]) == 0
        result = torch.load(out, weights_only=False)
        assert result["positions"].shape == (1, 12, 2)
        real = result["node_mask"][0]
        assert torch.isfinite(result["expression"][0, real]).all()
        assert torch.isfinite(result["positions"][0, real]).all()


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["test", "--checkpoint", "x.ckpt"], capsys)
    assert_one_line_error(code, err, "test", "--data_dir", "alphastomics test --help")


WRITE_CASES: dict[str, list[str]] = {
    "preprocess": ["preprocess", "--input", "{h5ad}", "--output_dir", "{out}/store"],
    "train": ["train", "--data_dir", "{store}", "--output_dir", "{out}/run", *TINY],
    "test": ["test", "--checkpoint", "{ckpt}", "--data_dir", "{store}", "--output_dir", "{out}/t"],
    "sample": [
        "sample", "--checkpoint", "{ckpt}", "--input_data", "{h5ad}", "--sample_mode", "joint",
        "--output", "{out}/s.h5ad",
    ],
    "extract": ["extract", "--checkpoint", "{ckpt}", "--data_dir", "{store}", "--output", "{out}/e.npz"],
}  # fmt: skip


def _full_disk() -> None:
    """In the child: writes beyond 1 KiB fail with EFBIG, as on a full disk (Python ignores
    SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))


@pytest.mark.slow
@pytest.mark.parametrize("command", list(WRITE_CASES))
def test_full_disk_is_one_line_and_leaves_nothing(
    run: dict[str, Path], tmp_path: Path, command: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    names = {"h5ad": run["h5ad"], "store": run["store"], "ckpt": run["ckpt"], "out": out}
    args = [a.format(**names) for a in WRITE_CASES[command]]
    result = subprocess.run(
        [*PYTHON_CLI, *args],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_full_disk,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"alphastomics {command}: error: cannot write {out}"), last
    assert "File too large" in last and "free disk space" in last
    assert list(out.iterdir()) == []  # nothing half-written, no temporary file


def test_subprocess_shows_no_traceback(tmp_path: Path) -> None:
    """A real process: the user sees one line and exit status 2, never a traceback."""
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(b"not an h5ad")
    result = subprocess.run(
        [*PYTHON_CLI, "preprocess", "--input", str(bad), "--output_dir", str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("alphastomics preprocess: error: cannot read") and "bad.h5ad" in last
    assert not (tmp_path / "store").exists()

"""Every command end to end on tiny generated data, through the CLI entry point."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, cli, make_tiny_adata

from alphastomics.errors import UserInputError
from alphastomics.main import build_parser, main
from alphastomics.training.checkpoint import load_module

TINY = [
    *TINY_OVERRIDES,
    "training.max_epochs=2",
    "training.val_every_n_epochs=1",
    "training.val_sample_steps=2",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A store, a trained run and an .h5ad of the test slice, shared by the tests below."""
    root = tmp_path_factory.mktemp("cli")
    adata = make_tiny_adata(n_slices=4, n_cells=50)
    h5ad = root / "tissue.h5ad"
    adata.write_h5ad(h5ad)
    test_h5ad = root / "slice_3.h5ad"
    adata[adata.obs["slice"] == "slice_3"].copy().write_h5ad(test_h5ad)
    store = root / "store"
    split = ["--cell_type_key", "cell_type", "--test_slices", "slice_3", "--val_slices", "slice_2"]
    assert cli("preprocess", "--input", h5ad, "--output_dir", store, *split) == 0
    run = root / "run"
    assert main(["train", "--data_dir", str(store), "--output_dir", str(run), *TINY]) == 0
    return {
        "root": root,
        "h5ad": h5ad,
        "test_h5ad": test_h5ad,
        "store": store,
        "run": run,
        "ckpt": run / "checkpoints" / "best.ckpt",
    }


def test_train_writes_checkpoints_config_and_csv_logs(trained):
    run = trained["run"]
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "hidden_dim: 16" in (run / "config.yaml").read_text()
    assert list((run / "logs").glob("version_*/metrics.csv"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["cfg"]["model"]["hidden_dim"] == 16
    assert ckpt["hyper_parameters"]["data_info"]["keys"]["position_key"] == "ccf"
    # loss.align_rotation: auto settled for two training slices, each in its own frame
    assert ckpt["hyper_parameters"]["cfg"]["loss"]["align_rotation"] is True
    assert "align_rotation: true" in (run / "config.yaml").read_text()


def test_train_refuses_to_reuse_a_run_folder(trained, capsys):
    code = main(
        ["train", "--data_dir", str(trained["store"]), "--output_dir", str(trained["run"]), *TINY]
    )
    assert code == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("terminal", [True, False])
def test_train_shows_progress_on_stderr_without_lightning_noise(
    tiny_store, tmp_path, capfd, caplog, recwarn, monkeypatch, terminal
):
    """A bar on a terminal; in a log file no bar (its redraws would all be kept)."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr("sys.stderr.isatty", lambda: terminal)
    out = tmp_path / "run"
    assert main(["train", "--data_dir", str(tiny_store), "--output_dir", str(out), *TINY]) == 0
    stdout, stderr = capfd.readouterr()
    assert stdout == "" and ("Epoch 1: 100%" in stderr) is terminal
    assert terminal or "\r" not in stderr
    assert "Tip" not in caplog.text and "checkpoints in" in caplog.text
    assert "model.local_neighbors=0: global attention only" in caplog.text
    noise = [str(w.message) for w in recwarn if "LeafSpec" in str(w.message)]
    noise += [str(w.message) for w in recwarn if "logging interval" in str(w.message)]
    assert noise == []


def test_print_config_shows_types_and_defaults(capsys, tmp_path):
    from alphastomics.config import load_config

    assert main(["train", "--print_config", "training.lr=0.5"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^  lr: 0.5 +# float, default 0.001$", text, re.MULTILINE)
    assert re.search(r"max_time_minutes: null +# float or null, default null", text)
    assert re.search(r"strategy: ddp +# ddp \| fsdp \| deepspeed, default ddp", text)
    saved = tmp_path / "printed.yaml"  # what it prints is a config file
    saved.write_text(text)
    assert load_config(saved) == load_config(overrides=["training.lr=0.5"])


def test_every_flag_has_help():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    bare = [
        f"{name} {action.option_strings[0]}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert bare == []


def test_test_writes_metrics_and_figures(trained, tmp_path):
    out = tmp_path / "test"
    test = ["test", "--checkpoint", trained["ckpt"], "--data_dir", trained["store"]]
    assert cli(*test, "--output_dir", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["slices"]) == {"slice_3"}
    overall = metrics["overall"]
    for key in (
        "distance_spearman_median",
        "knn_preservation",
        "procrustes_disparity",
        "contact_f1",
    ):
        assert key in overall["expr_to_pos"]
    for key in ("pcc_gene_mean", "spearman_gene_mean", "mse", "morans_i_pearson", "cluster_ari"):
        assert key in overall["pos_to_expr"]
    assert "baseline_random_positions" in overall
    assert (out / "layout_slice_3.png").is_file() and (out / "genes_slice_3.png").is_file()
    # a second run refuses to replace the metrics without --overwrite
    assert cli(*test, "--output_dir", out) == 2


@pytest.mark.parametrize("mode", ["expr_to_pos", "pos_to_expr", "joint"])
def test_sample_h5ad_every_mode(trained, tmp_path, mode):
    out = tmp_path / f"{mode}.h5ad"
    draws = ["--num_samples", "2", "--seed", "3"]
    assert main(_sample_argv(trained, trained["test_h5ad"], out, mode, *draws)) == 0
    result = ad.read_h5ad(out)
    source = ad.read_h5ad(trained["test_h5ad"])
    info = result.uns["alphastomics"]
    assert info["mode"] == mode and info["seed"] == 3 and info["num_samples"] == 2
    assert {"steps", "sampler", "checkpoint", "version"} <= set(info)
    if mode == "expr_to_pos":
        pos = result.obsm["alphastomics_positions"]
        assert pos.shape == (source.n_obs, 3) and np.isfinite(pos).all()
        # back in the input's units: similar spread to the true coordinates
        true = source.obsm["ccf"]
        ratio = pos.std(0).sum() / true.std(0).sum()
        assert 0.2 < ratio < 5
        assert "alphastomics_position_spread" in result.obs
    elif mode == "pos_to_expr":
        assert result.layers["alphastomics_expression"].shape == (source.n_obs, source.n_vars)
        assert "alphastomics_expression_std" in result.layers
    else:  # two tissues of the reference's size, each its own slice
        assert result.n_obs == 2 * source.n_obs and result.obsm["spatial"].shape[1] == 3
        assert result.obs["slice"].value_counts().to_dict() == {
            "slice_3_sample0": source.n_obs,
            "slice_3_sample1": source.n_obs,
        }
        assert set(result.obs["alphastomics_reference_slice"]) == {"slice_3"}
        first, second = (result.X[result.obs["slice"] == f"slice_3_sample{k}"] for k in (0, 1))
        assert not np.allclose(first, second)  # separate draws, not one averaged
    assert out.with_suffix(".png").is_file()


def _sample_argv(trained, src: Path, out: Path, mode: str, *extra: str) -> list[str]:
    return [
        "sample",
        "--checkpoint",
        str(trained["ckpt"]),
        "--input_data",
        str(src),
        "--sample_mode",
        mode,
        "--output",
        str(out),
        *extra,
    ]


def test_sample_matches_genes_by_name(trained, tmp_path, caplog):
    adata = ad.read_h5ad(trained["test_h5ad"])
    shuffled = adata[:, list(reversed(adata.var_names))[:-2]].copy()  # reordered, 2 genes missing
    src = tmp_path / "shuffled.h5ad"
    shuffled.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    assert main(_sample_argv(trained, src, out, "expr_to_pos")) == 0
    info = ad.read_h5ad(out).uns["alphastomics"]
    assert len(info["missing_genes"]) == 2
    assert info["missing_gene_share"] == pytest.approx(2 / adata.n_vars)
    assert info["consensus"] == 0.5 and info["consensus_neighbors"] == 10  # the defaults


def test_sampling_settings_change_at_sample_and_test_time_and_nothing_else(
    trained, tmp_path, capsys
):
    out, off = tmp_path / "default.h5ad", tmp_path / "off.h5ad"
    assert main(_sample_argv(trained, trained["test_h5ad"], out, "expr_to_pos")) == 0
    argv = _sample_argv(trained, trained["test_h5ad"], off, "expr_to_pos")
    assert main([*argv, "sampling.consensus=0", "sampling.eta=0.5"]) == 0
    default, changed = (ad.read_h5ad(p) for p in (out, off))
    info = changed.uns["alphastomics"]
    assert info["consensus"] == 0 and list(info["sampling_overrides"]) == [
        "sampling.consensus=0",
        "sampling.eta=0.5",
    ]
    assert "sampling_overrides" not in default.uns["alphastomics"]
    assert not np.allclose(
        default.obsm["alphastomics_positions"], changed.obsm["alphastomics_positions"]
    )
    test_out = tmp_path / "test"
    test = ["test", "--checkpoint", trained["ckpt"], "--data_dir", trained["store"]]
    assert cli(*test, "--output_dir", test_out, "sampling.consensus=0") == 0
    metrics = json.loads((test_out / "metrics.json").read_text())
    assert metrics["sampling_overrides"] == ["sampling.consensus=0"]
    # what training fixed, or a bad value: one line, exit 2, nothing written
    for bad, said in (
        ("model.hidden_dim=8", "only sampling.* settings"),
        ("sampling.consensus=2", "sampling.consensus"),
        ("sampling.no_such_key=1", "sampling.no_such_key"),
    ):
        refused = tmp_path / f"refused_{bad.split('=')[0]}.h5ad"
        assert main([*_sample_argv(trained, trained["test_h5ad"], refused, "joint"), bad]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1 and not refused.exists()


def test_sampled_anndata_keeps_what_the_user_gave(trained, tmp_path):
    """pos_to_expr on a gene subset keeps X, obs, var, uns; ours is beside them."""
    adata = ad.read_h5ad(trained["test_h5ad"])[:, :10].copy()
    adata.uns["source"] = "my lab"
    adata.obs["batch"] = "b1"
    adata.layers["counts"] = adata.X.copy()
    src, out = tmp_path / "subset.h5ad", tmp_path / "out.h5ad"
    adata.write_h5ad(src)
    assert main(_sample_argv(trained, src, out, "pos_to_expr")) == 0
    result = ad.read_h5ad(out)
    np.testing.assert_array_equal(result.X, adata.X)
    np.testing.assert_array_equal(result.layers["counts"], adata.layers["counts"])
    assert list(result.var_names) == list(adata.var_names)
    assert result.uns["source"] == "my lab" and list(result.obs["batch"]) == ["b1"] * adata.n_obs
    predicted = result.obsm["alphastomics_expression"]
    assert list(predicted.columns) == [f"gene_{i}" for i in range(16)]
    assert predicted.shape == (adata.n_obs, 16) and np.isfinite(predicted.to_numpy()).all()
    assert result.uns["alphastomics"]["expression_key"] == "obsm/alphastomics_expression"


def test_joint_output_labels_each_cell_with_its_reference_slice(trained, tmp_path):
    adata = ad.read_h5ad(trained["h5ad"])
    reference = adata[adata.obs["slice"].isin(["slice_2", "slice_3"])].copy()
    reference.uns["source"] = "my lab"
    src, out = tmp_path / "two.h5ad", tmp_path / "joint.h5ad"
    reference.write_h5ad(src)
    assert main(_sample_argv(trained, src, out, "joint", "--steps", "2")) == 0
    result = ad.read_h5ad(out)
    assert result.obs["slice"].value_counts().to_dict() == (
        reference.obs["slice"].value_counts().to_dict()
    )
    predicted = result.obs["alphastomics_predicted_cell_type"]
    assert set(predicted) <= set(reference.obs["cell_type"])
    assert result.uns["source"] == "my lab" and result.obsm["spatial"].shape[0] == result.n_obs


def _scale(coordinates: np.ndarray) -> float:
    """The isotropic scale preprocess gives a slice (RMS distance to the centre per axis)."""
    centred = coordinates - coordinates.mean(axis=0)
    return float(np.sqrt((centred**2).sum(axis=1).mean() / coordinates.shape[1]))


@pytest.mark.parametrize(
    ("flag", "expected"),
    [("11", {"slice_2": 11, "slice_3": 11}), ("slice_3=9", {"slice_2": None, "slice_3": 9})],
)
def test_joint_n_cells_sets_the_count_of_each_generated_slice(trained, tmp_path, flag, expected):
    adata = ad.read_h5ad(trained["h5ad"])
    reference = adata[adata.obs["slice"].isin(["slice_2", "slice_3"])].copy()
    src, out = tmp_path / "two.h5ad", tmp_path / "joint.h5ad"
    reference.write_h5ad(src)
    argv = _sample_argv(trained, src, out, "joint", "--steps", "2", "--n_cells", flag)
    assert main(argv) == 0
    result = ad.read_h5ad(out)
    own = reference.obs["slice"].value_counts().to_dict()
    counts = {name: n or own[name] for name, n in expected.items()}
    assert result.obs["slice"].value_counts().to_dict() == counts
    assert list(result.obs["slice"].cat.categories) == ["slice_2", "slice_3"]
    info = result.uns["alphastomics"]["slices"]
    for name, n in counts.items():
        coordinates = reference.obsm["ccf"][(reference.obs["slice"] == name).to_numpy()]
        assert info[name]["n_cells"] == n and info[name]["reference_n_cells"] == own[name]
        assert info[name]["scale"] == pytest.approx(_scale(coordinates))
        generated = result.obsm["spatial"][(result.obs["slice"] == name).to_numpy()]
        np.testing.assert_allclose(generated.mean(0), coordinates.mean(0), rtol=1e-5)
    assert out.with_suffix(".png").is_file()


def test_joint_cli_and_python_api_generate_the_same_tissue(trained, tmp_path):
    from alphastomics.training.checkpoint import load_module
    from alphastomics.workflows.generate import generate_tissue

    out = tmp_path / "joint.h5ad"
    argv = _sample_argv(trained, trained["test_h5ad"], out, "joint", "--steps", "2", "--seed", "4")
    assert main([*argv, "--n_cells", "13"]) == 0
    module = load_module(trained["ckpt"])
    reference = ad.read_h5ad(trained["test_h5ad"])
    tissue = generate_tissue(module, reference, n_cells=13, steps=2, seed=4)
    written = ad.read_h5ad(out)
    np.testing.assert_array_equal(tissue.X, written.X)
    np.testing.assert_array_equal(tissue.obsm["spatial"], written.obsm["spatial"])
    assert list(tissue.obs["slice"]) == ["slice_3"] * 13


def test_joint_expression_is_measured_values_near_the_denoised_states(trained, tmp_path, caplog):
    """X of a generated tissue holds training cells' measured values, gene by gene; the
    denoised states are a layer; a checkpoint without stored cells writes the states."""
    from alphastomics.data.store import ProcessedStore
    from alphastomics.diffusion_model.observation import CHECKPOINT_KEY
    from alphastomics.training.checkpoint import load_module
    from alphastomics.workflows.generate import generate_tissue

    store = ProcessedStore(trained["store"])
    train = np.concatenate(
        [np.asarray(store.load_slice(i).expression) for i in store.slice_indices("train")]
    )
    module = load_module(trained["ckpt"])
    assert module.observation_model is not None and module.observation_model.n_cells == len(train)
    reference = ad.read_h5ad(trained["test_h5ad"])
    tissue = generate_tissue(module, reference, steps=2, seed=1)
    states = tissue.layers["alphastomics_denoised"]
    assert states.shape == tissue.shape and not np.array_equal(tissue.X, states)
    for g in range(tissue.n_vars):
        assert np.isin(tissue.X[:, g], train[:, g]).all()
    assert "measured values drawn per gene" in tissue.uns["alphastomics"]["expression"]
    assert tissue.uns["alphastomics"]["expression_start"] == 0.5
    with pytest.raises(UserInputError, match=r"expression_start 1.0 must be in \[0, 1\)"):
        generate_tissue(module, reference, steps=2, expression_start=1.0)

    old = torch.load(trained["ckpt"], weights_only=False)
    del old[CHECKPOINT_KEY]  # as written before joint samples drew measured values
    torch.save(old, tmp_path / "old.ckpt")
    old_module = load_module(tmp_path / "old.ckpt")
    assert old_module.observation_model is None
    with caplog.at_level(logging.INFO):
        again = generate_tissue(old_module, reference, steps=2, seed=1)
    np.testing.assert_array_equal(again.X, again.layers["alphastomics_denoised"])
    assert again.uns["alphastomics"]["expression_start"] == 0.0  # nothing stored to start from
    assert "stores no training cells" in caplog.text


@pytest.mark.parametrize("kind", ["no genes", "zero expression"])
def test_pos_to_expr_needs_no_expression(trained, tmp_path, kind):
    adata = ad.read_h5ad(trained["test_h5ad"])
    if kind == "no genes":
        adata = ad.AnnData(obs=adata.obs, obsm={"ccf": adata.obsm["ccf"]})
    else:
        adata.X = np.zeros(adata.shape, dtype=np.float32)
    src, out = tmp_path / "positions.h5ad", tmp_path / "out.h5ad"
    adata.write_h5ad(src)
    assert main(_sample_argv(trained, src, out, "pos_to_expr")) == 0
    result = ad.read_h5ad(out)
    where, key = result.uns["alphastomics"]["expression_key"].split("/")
    assert where == ("obsm" if kind == "no genes" else "layers")
    assert getattr(result, where)[key].shape == (adata.n_obs, 16)
    assert result.n_vars == adata.n_vars and out.with_suffix(".png").is_file()


def test_input_of_another_kind_than_the_training_data(trained, tmp_path, capsys):
    """The model was trained on raw counts: normalised input is refused, unless --normalize
    says what to do; sample and extract follow the same rule."""
    adata = make_tiny_adata(n_slices=1, n_cells=30, counts=False)
    src = tmp_path / "lognorm.h5ad"
    adata.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    capsys.readouterr()
    assert main(_sample_argv(trained, src, out, "expr_to_pos")) == 2
    line = capsys.readouterr().err.strip()
    assert "holds already-normalised expression, but the model was trained on raw counts" in line
    assert "--normalize none" in line and not out.exists()
    extract = ["extract", "--checkpoint", str(trained["ckpt"]), "--input_data", str(src)]
    assert main([*extract, "--output", str(tmp_path / "e.npz")]) == 2
    assert "the model was trained on raw counts" in capsys.readouterr().err
    assert main(_sample_argv(trained, src, out, "expr_to_pos", "--normalize", "none")) == 0
    assert ad.read_h5ad(out).uns["alphastomics"]["normalization"] == "none"


def test_sample_pt_round_trip(trained, tmp_path):
    from alphastomics.data.store import ProcessedStore

    store = ProcessedStore(trained["store"])
    arrays = store.load_slice(store.slice_indices("test")[0])
    src = tmp_path / "in.pt"
    torch.save(
        {
            "expression": torch.tensor(np.array(arrays.expression)),
            "positions": torch.tensor(np.array(arrays.positions)),
            "node_mask": torch.ones(len(arrays.positions), dtype=torch.bool),
        },
        src,
    )
    out = tmp_path / "out.pt"
    assert main(_sample_argv(trained, src, out, "expr_to_pos")) == 0
    result = torch.load(out, weights_only=False)
    assert result["positions"].shape == (1, len(arrays.positions), 3)
    assert result["mode"] == "expr_to_pos"


def test_sample_refuses_to_overwrite(trained, tmp_path, capsys):
    out = tmp_path / "exists.h5ad"
    out.write_text("keep me")
    code = main(_sample_argv(trained, trained["test_h5ad"], out, "joint"))
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me"


def test_frame_training_needs_a_model_of_one_frame_and_an_h5ad(trained, tmp_path, capsys):
    # this model was trained on several slices, each centred and scaled on its own
    module = load_module(trained["ckpt"])
    assert module.data_info.training_frame is None and module.reference_cells is None
    out = tmp_path / "out.h5ad"
    argv = _sample_argv(trained, trained["test_h5ad"], out, "pos_to_expr", "--frame", "training")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--frame training needs a model trained on one slice or volume" in err
    assert len(err.splitlines()) == 1 and not out.exists()
    pt = tmp_path / "in.pt"
    torch.save({"expression": torch.zeros(3, 16), "positions": torch.zeros(3, 3)}, pt)
    argv = _sample_argv(trained, pt, tmp_path / "out.pt", "pos_to_expr", "--frame", "own")
    assert main(argv) == 2 and "Drop --frame" in capsys.readouterr().err


def test_extract_store_and_h5ad(trained, tmp_path):
    out = tmp_path / "emb.npz"
    extract = ["extract", "--checkpoint", trained["ckpt"]]
    assert cli(*extract, "--data_dir", trained["store"], "--output", out) == 0
    emb = np.load(out)
    n = sum(
        s["n_cells"] for s in json.loads((trained["store"] / "metadata.json").read_text())["slices"]
    )
    assert emb["expression_embeddings"].shape == (n, 16)
    assert emb["position_embeddings"].shape == (n, 16)
    assert emb["cell_types"].shape == (n,) and emb["cell_types"][0].startswith("type_")
    source = ad.read_h5ad(trained["h5ad"])
    assert sorted(emb["obs_names"]) == sorted(source.obs_names)  # every cell, by its name
    first = emb["obs_names"][0]
    assert emb["slice"][0] == source.obs.loc[first, "slice"]
    out2 = tmp_path / "emb2.npz"
    from_h5ad = [*extract, "--input_data", trained["test_h5ad"], "--output", out2]
    assert cli(*from_h5ad, "--extract_mode", "transformer") == 0
    written = ad.read_h5ad(out2.with_suffix(".h5ad"))
    assert written.obsm["X_alphastomics"].shape == (written.n_obs, 16)


def test_outputs_are_readable_by_others(trained, tmp_path):
    """Every output gets the mode the umask gives (0644 under umask 022), as any other file."""
    ckpt = ["--checkpoint", str(trained["ckpt"])]
    old = os.umask(0o022)
    try:
        store = tmp_path / "store"
        assert (
            main(["preprocess", "--input", str(trained["test_h5ad"]), "--output_dir", str(store)])
            == 0
        )
        test = ["test", *ckpt, "--data_dir", trained["store"], "--output_dir", tmp_path / "t"]
        assert cli(*test, "--steps", "2") == 0
        sample = _sample_argv(
            trained, trained["test_h5ad"], tmp_path / "s.h5ad", "joint", "--steps", "2"
        )
        assert main(sample) == 0
        extract = ["extract", *ckpt, "--input_data", str(trained["test_h5ad"])]
        assert main([*extract, "--output", str(tmp_path / "e.npz")]) == 0
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in written} >= {".json", ".png", ".h5ad", ".npz", ".npy"}
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {"0o644"}, modes


def test_resume_continues_from_last(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    before = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    longer = [*(o for o in TINY if "max_epochs" not in o), "training.max_epochs=3"]
    assert (
        cli("train", "--data_dir", trained["store"], "--output_dir", run, "--resume", *longer) == 0
    )
    after = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert after > before
    assert len(list((run / "logs").glob("version_*/metrics.csv"))) == 2  # earlier logs kept


def test_module_entry_point_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "alphastomics.main", "sample", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--sample_mode" in result.stdout and "--num_samples" in result.stdout


def test_sample_imputes_unmeasured_cells_from_measured_ones(trained, tmp_path):
    adata = ad.read_h5ad(trained["test_h5ad"])
    measured = np.arange(adata.n_obs) % 3 != 0  # a third of the cells to impute
    adata.obs["measured"] = measured
    src = tmp_path / "partly_measured.h5ad"
    adata.write_h5ad(src)
    out = tmp_path / "imputed.h5ad"
    assert main(_sample_argv(trained, src, out, "pos_to_expr", "--measured_key", "measured")) == 0
    result = ad.read_h5ad(out)
    info = result.uns["alphastomics"]
    assert info["measured_key"] == "measured" and info["n_measured"] == int(measured.sum())
    assert info["imputed_by"] == "neighbour read-out"
    imputed = result.layers["alphastomics_expression"]
    counts = np.asarray(adata.X, dtype=np.float64)
    log_normalised = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    # measured cells keep their own (log-normalised) expression, the others are imputed
    np.testing.assert_allclose(imputed[measured], log_normalised[measured], rtol=1e-4, atol=1e-4)
    assert np.isfinite(imputed).all()
    assert not np.allclose(imputed[~measured], log_normalised[~measured], atol=1e-3)
    # an imputed cell lies within the range of the measured cells' expression (an average)
    lo, hi = log_normalised[measured].min(0), log_normalised[measured].max(0)
    assert ((imputed[~measured] >= lo - 1e-4) & (imputed[~measured] <= hi + 1e-4)).all()


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing column", "is not an obs column"),
        ("strings", "must be boolean"),
        ("none measured", "has no cell with obs['measured'] True"),
        ("wrong mode", "--measured_key measured marks measured cells for pos_to_expr"),
        ("draws", "--num_samples 2 with --measured_key"),
        ("few genes", "--min_gene_overlap"),
    ],
)
def test_measured_key_errors_name_the_column_and_write_nothing(
    trained, tmp_path, capsys, case, fragment
):
    adata = ad.read_h5ad(trained["test_h5ad"])
    if case == "strings":
        adata.obs["measured"] = ["yes"] * adata.n_obs
    elif case == "none measured":
        adata.obs["measured"] = np.zeros(adata.n_obs, dtype=bool)
    elif case in ("wrong mode", "draws"):
        adata.obs["measured"] = np.ones(adata.n_obs, dtype=bool)
    elif case == "few genes":
        adata = adata[:, :2].copy()
        adata.obs["measured"] = np.arange(adata.n_obs) % 2 == 0
    src = tmp_path / "in.h5ad"
    adata.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    mode = "expr_to_pos" if case == "wrong mode" else "pos_to_expr"
    draws = ["--num_samples", "2"] if case == "draws" else []
    argv = _sample_argv(trained, src, out, mode, "--measured_key", "measured", *draws)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err and "Traceback" not in err
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_2d_data_is_modelled_and_written_back_in_2d(tmp_path):
    # 2D in, 2D out: the store, the model and every sampled layout have 2 columns, no invented z
    adata = make_tiny_adata(n_slices=3, n_cells=40, n_dims=2)
    h5ad = tmp_path / "flat.h5ad"
    adata.write_h5ad(h5ad)
    store, run = tmp_path / "store", tmp_path / "run"
    argv = ["preprocess", "--input", h5ad, "--output_dir", store, "--test_slices", "slice_2"]
    assert main([str(a) for a in argv]) == 0
    assert json.loads((store / "metadata.json").read_text())["n_dims"] == 2
    assert np.load(store / "slices" / "0" / "positions.npy").shape[1] == 2
    assert main(["train", "--data_dir", str(store), "--output_dir", str(run), *TINY]) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["hyper_parameters"]["n_dims"] == 2
    for mode, key in (("expr_to_pos", "alphastomics_positions"), ("joint", "spatial")):
        out = tmp_path / f"{mode}.h5ad"
        argv = ["sample", "--checkpoint", ckpt, "--input_data", h5ad, "--sample_mode", mode]
        assert main([str(a) for a in [*argv, "--output", out]]) == 0
        positions = ad.read_h5ad(out).obsm[key]
        assert positions.shape == (adata.n_obs, 2), mode
        assert np.isfinite(positions).all()


def test_preprocess_reads_data_preprocessing_of_config_and_flags_win(tmp_path):
    adata = make_tiny_adata(n_slices=3, n_cells=30, n_genes=12, position_key="spatial")
    h5ad = tmp_path / "tissue.h5ad"
    adata.write_h5ad(h5ad)
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(map(str, adata.var_names[:8])) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"data:\n  preprocessing:\n    position_key: spatial\n    gene_list_file: {genes}\n"
    )
    store = tmp_path / "store"
    argv = ["preprocess", "--input", h5ad, "--output_dir", store, "--config", config]
    assert main([str(a) for a in argv]) == 0
    meta = json.loads((store / "metadata.json").read_text())
    assert meta["keys"]["position_key"] == "spatial"
    assert meta["n_genes"] == 8
    # the packaged config's key (ccf) is not in this file: without --config it is refused
    assert main(["preprocess", "--input", str(h5ad), "--output_dir", str(tmp_path / "b")]) == 2
    # a flag wins over the config
    adata.obsm["other"] = adata.obsm["spatial"]
    adata.write_h5ad(h5ad)
    argv += ["--position_key", "other", "--overwrite"]
    assert main([str(a) for a in argv]) == 0
    assert json.loads((store / "metadata.json").read_text())["keys"]["position_key"] == "other"

"""A model of one slice or volume reads new coordinates in its training frame (`sample --frame`),
and its `pos_to_expr` reads the stored training cells there (`sampling.reference_cells`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, make_tiny_adata

from alphastomics.data.batch import DataHolder
from alphastomics.data.store import ProcessedStore
from alphastomics.data.units import to_model_units
from alphastomics.evaluation.metrics import expression_metrics
from alphastomics.main import main
from alphastomics.training.checkpoint import load_module

TINY = [*TINY_OVERRIDES, "training.max_epochs=2", "training.val_every_n_epochs=1"]
FROM_POSITIONS = "sampling.reference_cells=none"


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> dict[str, Path]:
    """A model trained on one volume without its central band along x, and that band."""
    root = tmp_path_factory.mktemp("frames")
    adata = make_tiny_adata(n_slices=1, n_cells=160)
    x = np.asarray(adata.obsm["ccf"])[:, 0]
    band = (x > np.quantile(x, 0.4)) & (x < np.quantile(x, 0.6))
    adata[~band].copy().write_h5ad(root / "train.h5ad")
    region = adata[band].copy()
    region.write_h5ad(root / "region.h5ad")
    far = region.copy()
    far.obsm["ccf"] = np.asarray(far.obsm["ccf"]) + 1e4  # another origin: not in the frame
    far.write_h5ad(root / "far.h5ad")
    store, run = root / "store", root / "run"
    argv = ["preprocess", "--input", root / "train.h5ad", "--output_dir", store]
    assert main([str(a) for a in argv]) == 0
    assert main(["train", "--data_dir", str(store), "--output_dir", str(run), *TINY]) == 0
    return {"root": root, "store": store, "ckpt": run / "checkpoints" / "last.ckpt"}


def _pos_to_expr(volume: dict[str, Path], name: str, *flags: str) -> ad.AnnData:
    out = volume["root"] / "out" / f"{len(list(volume['root'].glob('out/*.h5ad')))}.h5ad"
    out.parent.mkdir(exist_ok=True)
    argv = ["sample", "--checkpoint", volume["ckpt"], "--input_data", volume["root"] / name]
    argv += ["--sample_mode", "pos_to_expr", "--output", out, "--overwrite", *flags]
    assert main([str(a) for a in argv]) == 0
    return ad.read_h5ad(out)


def _model_units(volume: dict[str, Path], name: str, center, scale) -> np.ndarray:
    adata = ad.read_h5ad(volume["root"] / name)
    return to_model_units(np.asarray(adata.obsm["ccf"]), center, scale)


def _expected(volume: dict[str, Path], name: str, center, scale) -> np.ndarray:
    """The conditional mean from positions at the file's coordinates centred by ``center`` and
    scaled by ``scale``."""
    module = load_module(volume["ckpt"], sampling_overrides=[FROM_POSITIONS])
    adata = ad.read_h5ad(volume["root"] / name)
    positions = _model_units(volume, name, center, scale)
    holder = DataHolder.from_arrays(
        np.zeros((adata.n_obs, adata.n_vars), np.float32),
        positions,
        gene_mask=np.ones(adata.n_vars, bool),  # the file has every gene
    )
    generator = torch.Generator().manual_seed(0)
    expression, _ = module.predictor.sample(
        holder, "pos_to_expr", expression_estimate="mean", generator=generator
    )
    return expression[0].numpy()


def test_a_region_of_the_volume_is_read_in_the_training_frame(volume, caplog):
    frame = load_module(volume["ckpt"]).data_info.training_frame
    assert frame is not None
    with caplog.at_level(logging.INFO, logger="alphastomics"):
        out = _pos_to_expr(volume, "region.h5ad", FROM_POSITIONS)
    assert "read in the model's training frame" in caplog.text
    assert out.uns["alphastomics"]["frames"] == {"slice_0": "training"}
    predicted = out.layers["alphastomics_expression"]
    np.testing.assert_allclose(
        predicted, _expected(volume, "region.h5ad", frame.center, frame.scale), atol=1e-4
    )

    own = _pos_to_expr(volume, "region.h5ad", "--frame", "own", FROM_POSITIONS)
    assert own.uns["alphastomics"]["frames"] == {"slice_0": "own"}
    coordinates = np.asarray(own.obsm["ccf"], dtype=np.float64)
    centred = coordinates - coordinates.mean(axis=0)
    own_scale = float(np.sqrt((centred**2).sum(axis=1).mean() / 3))
    np.testing.assert_allclose(
        own.layers["alphastomics_expression"],
        _expected(volume, "region.h5ad", coordinates.mean(axis=0), own_scale),
        atol=1e-4,
    )
    assert not np.allclose(own.layers["alphastomics_expression"], predicted, atol=1e-3)


def test_coordinates_outside_the_training_extent_are_read_on_their_own(volume, caplog):
    with caplog.at_level(logging.WARNING, logger="alphastomics"):
        out = _pos_to_expr(volume, "far.h5ad")
    assert "lies outside the extent" in caplog.text and "--frame training" in caplog.text
    assert out.uns["alphastomics"]["frames"] == {"slice_0": "own"}
    forced = _pos_to_expr(volume, "far.h5ad", "--frame", "training")
    assert forced.uns["alphastomics"]["frames"] == {"slice_0": "training"}


def test_pos_to_expr_reads_the_stored_training_cells_in_the_training_frame(volume):
    module = load_module(volume["ckpt"])
    stored = module.observation_model
    assert stored is not None and stored.atlas and module.reference_cells is not None
    frame = module.data_info.training_frame
    out = _pos_to_expr(volume, "region.h5ad")
    assert out.uns["alphastomics"]["expression_from"] == {
        "slice_0": "training cells (neighbour read-out)"
    }
    # what the learned read-out makes of the stored cells around each position
    scaler, readout = module.scaler, module.neighbor_readout
    references = torch.from_numpy(stored.expression).unsqueeze(0)
    standardized = scaler.standardize(
        references,
        torch.ones(references.shape[:2], dtype=torch.bool),
        torch.ones(1, 16, dtype=torch.bool),
    )[0]
    queries = torch.from_numpy(_model_units(volume, "region.h5ad", frame.center, frame.scale))
    with torch.no_grad():
        expected = scaler.unstandardize(
            readout(queries, torch.from_numpy(stored.positions), standardized)
        )
    np.testing.assert_allclose(out.layers["alphastomics_expression"], expected, atol=1e-4)

    own = _pos_to_expr(volume, "region.h5ad", "--frame", "own")  # not in the cells' frame
    assert own.uns["alphastomics"]["expression_from"] == {"slice_0": "positions"}
    unmixed = _pos_to_expr(volume, "region.h5ad", FROM_POSITIONS)
    assert unmixed.uns["alphastomics"]["expression_from"] == {"slice_0": "positions"}
    assert unmixed.uns["alphastomics"]["sampling_overrides"] == [FROM_POSITIONS]


@pytest.mark.parametrize("words", [[], [FROM_POSITIONS]])
def test_test_reads_the_training_cells_for_parts_of_the_training_slice(volume, tmp_path, words):
    out = tmp_path / "scores"
    argv = ["test", "--checkpoint", volume["ckpt"], "--data_dir", volume["store"]]
    assert main([str(a) for a in [*argv, "--split", "val", "--output_dir", out, *words]]) == 0
    scored = json.loads((out / "metrics.json").read_text())["slices"]
    expected = "positions" if words else "training cells (neighbour read-out)"
    assert [m["pos_to_expr"]["expression_from"] for m in scored.values()] == [expected]


def test_test_reads_a_block_preprocessed_as_a_slice_of_its_own_in_the_training_frame(
    volume, tmp_path
):
    # the held-out band given to preprocess as a file of its own: its entry is centred and
    # scaled on its own, and `test` re-reads it in the training frame, as `sample` reads the file
    region = ad.read_h5ad(volume["root"] / "region.h5ad")
    region.obs["slice"] = "band"
    band = tmp_path / "band.h5ad"
    region.write_h5ad(band)
    store, scores = tmp_path / "store", tmp_path / "scores"
    argv = ["preprocess", "--input", volume["root"] / "train.h5ad", band, "--output_dir", store]
    assert main([str(a) for a in [*argv, "--test_slices", "band"]]) == 0
    argv = ["test", "--checkpoint", volume["ckpt"], "--data_dir", store, "--output_dir", scores]
    assert main([str(a) for a in argv]) == 0
    scored = json.loads((scores / "metrics.json").read_text())["slices"]["band"]
    assert scored["frame"] == "training"
    assert scored["pos_to_expr"]["expression_from"] == "training cells (neighbour read-out)"
    sampled = _pos_to_expr(volume, "region.h5ad")  # the same cells through `sample`
    entry = ProcessedStore(store)
    arrays = entry.load_slice(entry.slice_indices("test")[0])
    rows = sampled.obs_names.get_indexer(arrays.obs_names)
    pcc = expression_metrics(
        np.asarray(arrays.expression), sampled.layers["alphastomics_expression"][rows]
    )["pcc_gene_mean"]
    assert scored["pos_to_expr"]["pcc_gene_mean"] == pytest.approx(pcc, abs=1e-4)

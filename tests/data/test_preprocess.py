"""SpatialDataPreprocessor and prepare_anndata: store format, transforms, splits and every error."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from conftest import assert_nothing_written, make_tiny_adata, write_h5ad

import alphastomics
from alphastomics.data.anndata import TARGET_SUM, prepare_anndata, read_gene_list
from alphastomics.data.preprocess import GENE_STD_FLOOR, SpatialDataPreprocessor
from alphastomics.data.units import to_model_units, to_user_units
from alphastomics.errors import UserInputError


def _run(files: list[Path], out: Path, overwrite: bool = False, **kwargs: object) -> dict:
    kwargs.setdefault("progress", False)
    pre = SpatialDataPreprocessor(**kwargs)  # type: ignore[arg-type]
    return pre.preprocess_and_save(files, out, overwrite=overwrite)


def _entry(out: Path, info: dict, name: str) -> np.ndarray:
    return np.load(out / info["path"] / f"{name}.npy")


def _lognorm(x: np.ndarray) -> np.ndarray:
    return np.log1p(x / x.sum(axis=1, keepdims=True) * TARGET_SUM)


# ------------------------------------------------------------------------------------------
# Store format


def test_store_layout_and_metadata(tiny_store: Path) -> None:
    meta = json.loads((tiny_store / "metadata.json").read_text())
    for key in (
        "format_version",
        "alphastomics_version",
        "genes",
        "n_genes",
        "n_dims",
        "input_files",
        "keys",
        "normalization",
        "cell_types",
        "split",
        "slices",
        "gene_mean",
        "gene_std",
    ):
        assert key in meta
    assert meta["alphastomics_version"] == alphastomics.__version__
    assert meta["n_genes"] == len(meta["genes"]) == 16 and meta["n_dims"] == 3
    assert meta["keys"] == {
        "position_key": "ccf",
        "slice_key": "slice",
        "cell_type_key": "cell_type",
        "layer": None,
    }
    assert meta["normalization"]["requested"] == "auto"
    assert list(meta["normalization"]["applied"].values()) == ["log1p"]
    assert meta["cell_types"] == sorted(meta["cell_types"]) and len(meta["cell_types"]) == 4
    assert meta["split"] == {
        "by": "slice",
        "train": ["slice_0", "slice_1"],
        "val": ["slice_2"],
        "test": ["slice_3"],
        "seed": 0,
    }
    assert [s["path"] for s in meta["slices"]] == [f"slices/{k}" for k in range(4)]
    for info in meta["slices"]:
        n = info["n_cells"]
        expression = _entry(tiny_store, info, "expression")
        assert expression.dtype == np.float32 and expression.shape == (n, 16)
        positions = _entry(tiny_store, info, "positions")
        assert positions.dtype == np.float32 and positions.shape == (n, 3)
        cell_type = _entry(tiny_store, info, "cell_type")
        assert cell_type.dtype == np.int64 and cell_type.min() >= 0 and cell_type.max() < 4
        obs_names = _entry(tiny_store, info, "obs_names")
        assert obs_names.dtype.kind == "U" and obs_names.shape == (n,)
        assert len(info["center"]) == 3 and info["scale"] > 0 and info["input_dims"] == 3
        assert info["gene_mask"] == [True] * 16
    assert sum(s["n_cells"] for s in meta["slices"]) == 200


def test_gene_moments_over_train_cells(tiny_store: Path) -> None:
    meta = json.loads((tiny_store / "metadata.json").read_text())
    train = np.concatenate(
        [_entry(tiny_store, s, "expression") for s in meta["slices"] if s["split"] == "train"]
    ).astype(np.float64)
    np.testing.assert_allclose(meta["gene_mean"], train.mean(axis=0), rtol=1e-5, atol=1e-6)
    expected_std = np.maximum(train.std(axis=0), GENE_STD_FLOOR)
    np.testing.assert_allclose(meta["gene_std"], expected_std, rtol=1e-4, atol=1e-6)


def test_expression_is_normalised_counts_in_gene_order(tmp_path: Path) -> None:
    adata = make_tiny_adata()
    out = tmp_path / "out"
    meta = _run([write_h5ad(adata, tmp_path / "a.h5ad")], out, val_fraction=0, test_fraction=0)
    assert meta["genes"] == list(adata.var_names)
    for info in meta["slices"]:
        rows = adata.obs_names.get_indexer(_entry(out, info, "obs_names"))
        assert (rows >= 0).all()
        assert np.all(adata.obs["slice"].to_numpy()[rows] == info["name"])
        expected = _lognorm(adata.X[rows].astype(np.float64))
        np.testing.assert_allclose(_entry(out, info, "expression"), expected, rtol=1e-5, atol=1e-6)
        assert np.all(_entry(out, info, "cell_type") == -1)  # no cell_type_key given
    assert meta["cell_types"] == []


# ------------------------------------------------------------------------------------------
# Coordinates


@pytest.mark.parametrize("n_dims", [2, 3])
def test_isotropic_scale_round_trips_to_user_units(tmp_path: Path, n_dims: int) -> None:
    adata = make_tiny_adata(n_dims=n_dims)
    out = tmp_path / "out"
    meta = _run([write_h5ad(adata, tmp_path / "a.h5ad")], out)
    for info in meta["slices"]:
        assert info["input_dims"] == n_dims
        positions = _entry(out, info, "positions").astype(np.float64)
        rows = adata.obs_names.get_indexer(_entry(out, info, "obs_names"))
        original = adata.obsm["ccf"][rows].astype(np.float64)
        user = to_user_units(positions, info["center"], info["scale"])
        np.testing.assert_allclose(user[:, :n_dims], original, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(
            to_model_units(user, info["center"], info["scale"]), positions, atol=1e-5
        )
        # Centred; one factor for all axes, so the per-axis spread ratios are kept.
        np.testing.assert_allclose(positions.mean(axis=0), 0.0, atol=1e-5)
        assert (positions**2).sum(axis=1).mean() / n_dims == pytest.approx(1.0, rel=1e-4)
        ratio = positions[:, :n_dims].std(axis=0) / original.std(axis=0)
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
        assert positions.shape[1] == n_dims and len(info["center"]) == n_dims  # 2D stays 2D
    assert meta["n_dims"] == n_dims


def test_2d_and_3d_files_make_a_3d_store_with_z_0(tmp_path: Path) -> None:
    flat = write_h5ad(make_tiny_adata(n_slices=1, n_dims=2), tmp_path / "flat.h5ad")
    deep = write_h5ad(make_tiny_adata(n_slices=1, seed=1), tmp_path / "deep.h5ad")
    out = tmp_path / "out"
    meta = _run([flat, deep], out)
    assert meta["n_dims"] == 3
    for info in meta["slices"]:
        positions = _entry(out, info, "positions")
        assert positions.shape[1] == 3
        if info["input_dims"] == 2:
            assert np.all(positions[:, 2] == 0.0) and info["center"][2] == 0.0


# ------------------------------------------------------------------------------------------
# Genes


def test_gene_list_masks_genes_a_file_lacks(tmp_path: Path) -> None:
    full = make_tiny_adata(n_slices=2, seed=1)
    partial = make_tiny_adata(n_slices=2, seed=2)
    partial.obs["slice"] = partial.obs["slice"].cat.rename_categories(["other_0", "other_1"])
    partial = partial[:, [g for g in partial.var_names if g != "gene_3"]].copy()
    genes = [f"gene_{g}" for g in (5, 3, 0, 1)]
    out = tmp_path / "out"
    meta = _run(
        [write_h5ad(full, tmp_path / "full.h5ad"), write_h5ad(partial, tmp_path / "partial.h5ad")],
        out,
        gene_list=genes,
        val_fraction=0,
        test_fraction=0,
    )
    assert meta["genes"] == genes
    for info in meta["slices"]:
        from_partial = info["source_file"].endswith("partial.h5ad")
        assert info["gene_mask"] == [True, not from_partial, True, True]
        expression = _entry(out, info, "expression")
        if from_partial:
            assert np.all(expression[:, 1] == 0.0)
        else:
            assert expression[:, 1].std() > 0
    # gene_3's moments come from the full file's slices only.
    full_rows = np.concatenate(
        [_entry(out, s, "expression")[:, 1] for s in meta["slices"] if "full" in s["source_file"]]
    )
    assert meta["gene_mean"][1] == pytest.approx(full_rows.mean(), rel=1e-5)


def test_gene_intersection_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = make_tiny_adata(n_slices=2, seed=1)
    b = make_tiny_adata(n_slices=2, seed=2)
    b.obs["slice"] = b.obs["slice"].cat.rename_categories(["b0", "b1"])
    a = a[:, a.var_names[2:]].copy()
    b = b[:, b.var_names[:-3]].copy()
    with caplog.at_level(logging.INFO, logger="alphastomics.data.preprocess"):
        meta = _run(
            [write_h5ad(a, tmp_path / "a.h5ad"), write_h5ad(b, tmp_path / "b.h5ad")],
            tmp_path / "out",
        )
    assert meta["genes"] == [f"gene_{g}" for g in range(2, 13)]
    assert "using the 11 genes common to all 2 files" in caplog.text


def test_read_gene_list(tmp_path: Path) -> None:
    path = tmp_path / "genes.txt"
    path.write_text("gene_1\n\n# comment\ngene_2  # trailing\n")
    assert read_gene_list(path) == ["gene_1", "gene_2"]
    with pytest.raises(UserInputError, match="does not exist"):
        read_gene_list(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------
# Normalisation and input variants


@pytest.mark.parametrize("counts", [True, False])
def test_sparse_input_equals_dense(tmp_path: Path, counts: bool) -> None:
    dense = write_h5ad(make_tiny_adata(counts=counts), tmp_path / "dense.h5ad")
    sparse = write_h5ad(make_tiny_adata(counts=counts, sparse=True), tmp_path / "sparse.h5ad")
    meta_d = _run([dense], tmp_path / "d")
    meta_s = _run([sparse], tmp_path / "s")
    assert (
        list(meta_d["normalization"]["applied"].values())
        == ["log1p" if counts else "none"]
        == list(meta_s["normalization"]["applied"].values())
    )
    for info_d, info_s in zip(meta_d["slices"], meta_s["slices"], strict=True):
        for name in ("expression", "positions", "cell_type", "obs_names"):
            np.testing.assert_array_equal(
                _entry(tmp_path / "d", info_d, name), _entry(tmp_path / "s", info_s, name)
            )
    np.testing.assert_allclose(meta_d["gene_mean"], meta_s["gene_mean"], rtol=1e-6)


@pytest.mark.parametrize(
    ("counts", "normalize", "applied"),
    [
        (True, "auto", "log1p"),
        (False, "auto", "none"),
        (True, "log1p", "log1p"),
        (False, "log1p", "log1p"),
        (True, "none", "none"),
    ],
)
def test_normalisation_modes(tmp_path: Path, counts: bool, normalize: str, applied: str) -> None:
    adata = make_tiny_adata(counts=counts)
    out = tmp_path / "out"
    meta = _run([write_h5ad(adata, tmp_path / "a.h5ad")], out, normalize=normalize)
    assert meta["normalization"]["requested"] == normalize
    assert list(meta["normalization"]["applied"].values()) == [applied]
    info = meta["slices"][0]
    rows = adata.obs_names.get_indexer(_entry(out, info, "obs_names"))
    x = adata.X[rows].astype(np.float64)
    expected = _lognorm(x) if applied == "log1p" else x
    np.testing.assert_allclose(_entry(out, info, "expression"), expected, rtol=1e-5, atol=1e-6)


def test_layer_is_used_instead_of_x(tmp_path: Path) -> None:
    adata = make_tiny_adata(counts=True)
    adata.layers["counts"] = adata.X.copy()
    adata.X = np.zeros_like(adata.X)
    out = tmp_path / "out"
    meta = _run([write_h5ad(adata, tmp_path / "a.h5ad")], out, layer="counts")
    assert meta["keys"]["layer"] == "counts"
    assert list(meta["normalization"]["applied"].values()) == ["log1p"]
    assert _entry(out, meta["slices"][0], "expression").max() > 0


def test_missing_slice_column_makes_one_slice_named_after_the_file(tmp_path: Path) -> None:
    adata = make_tiny_adata(n_slices=2)
    del adata.obs["slice"]
    meta = _run([write_h5ad(adata, tmp_path / "whole_brain.h5ad")], tmp_path / "out")
    assert {s["slice"] for s in meta["slices"]} == {"whole_brain"}
    assert meta["split"]["by"] == "cells"


def test_same_slice_name_in_two_files_gets_the_file_stem(tmp_path: Path) -> None:
    a = write_h5ad(make_tiny_adata(n_slices=2, seed=1), tmp_path / "a.h5ad")
    b = write_h5ad(make_tiny_adata(n_slices=2, seed=2), tmp_path / "b.h5ad")
    meta = _run([a, b], tmp_path / "out", val_fraction=0, test_fraction=0)
    assert [s["name"] for s in meta["slices"]] == [
        "a/slice_0",
        "a/slice_1",
        "b/slice_0",
        "b/slice_1",
    ]


# ------------------------------------------------------------------------------------------
# Splits


def test_split_by_explicit_slice_names(tmp_path: Path) -> None:
    path = write_h5ad(make_tiny_adata(n_slices=4), tmp_path / "a.h5ad")
    meta = _run([path], tmp_path / "out", val_slices=["slice_1"], test_slices=["slice_0"])
    assert meta["split"]["train"] == ["slice_2", "slice_3"]
    assert meta["split"]["val"] == ["slice_1"] and meta["split"]["test"] == ["slice_0"]
    assert {s["name"]: s["split"] for s in meta["slices"]}["slice_0"] == "test"


@pytest.mark.parametrize(
    ("n_slices", "val_fraction", "test_fraction", "sizes"),
    [
        (6, 0.2, 0.2, (2, 2, 2)),
        (3, 0.1, 0.1, (1, 1, 1)),
        (2, 0.4, 0.4, (1, 0, 1)),
        (5, 0.0, 0.0, (5, 0, 0)),
    ],
)
def test_split_by_seeded_fractions(
    tmp_path: Path, n_slices: int, val_fraction: float, test_fraction: float, sizes: tuple
) -> None:
    path = write_h5ad(make_tiny_adata(n_slices=n_slices, n_cells=20), tmp_path / "a.h5ad")
    kwargs = {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": 4}
    split = _run([path], tmp_path / "one", **kwargs)["split"]
    again = _run([path], tmp_path / "two", **kwargs)["split"]
    assert split == again
    assert split["by"] == "slice"
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == sizes
    assert sorted(split["train"] + split["val"] + split["test"]) == [
        f"slice_{k}" for k in range(n_slices)
    ]


@pytest.mark.parametrize(
    ("n_slices", "test_slices", "sizes"),
    [
        (3, ["slice_0"], (2, 0, 1)),  # few slices: all but the test slice train
        (6, ["slice_0", "slice_1"], (4, 0, 2)),
        (7, ["slice_0"], (5, 1, 1)),  # enough slices: one validates
    ],
)
def test_default_split_never_starves_training(
    tmp_path: Path, n_slices: int, test_slices: list[str], sizes: tuple
) -> None:
    path = write_h5ad(make_tiny_adata(n_slices=n_slices, n_cells=12), tmp_path / "a.h5ad")
    split = _run([path], tmp_path / "out", test_slices=test_slices)["split"]
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == sizes


def test_single_slice_splits_cells(tmp_path: Path) -> None:
    adata = make_tiny_adata(n_slices=1, n_cells=100)
    out = tmp_path / "out"
    meta = _run([write_h5ad(adata, tmp_path / "a.h5ad")], out, val_fraction=0.1, test_fraction=0.2)
    assert meta["split"]["by"] == "cells"
    assert meta["split"]["train"] == ["slice_0/train"]
    assert meta["split"]["val"] == ["slice_0/val"] and meta["split"]["test"] == ["slice_0/test"]
    sizes = {s["split"]: s["n_cells"] for s in meta["slices"]}
    assert sizes == {"train": 70, "val": 10, "test": 20}
    names = [set(_entry(out, s, "obs_names")) for s in meta["slices"]]
    assert set.union(*names) == set(adata.obs_names) and sum(map(len, names)) == 100
    assert len({json.dumps([s["center"], s["scale"]]) for s in meta["slices"]}) == 1
    # The shared centre/scale maps every part back to the input coordinates.
    for info in meta["slices"]:
        rows = adata.obs_names.get_indexer(_entry(out, info, "obs_names"))
        user = to_user_units(_entry(out, info, "positions"), info["center"], info["scale"])
        np.testing.assert_allclose(user, adata.obsm["ccf"][rows], rtol=1e-5, atol=1e-3)
    again = _run([tmp_path / "a.h5ad"], tmp_path / "again", val_fraction=0.1, test_fraction=0.2)
    np.testing.assert_array_equal(
        _entry(tmp_path / "again", again["slices"][1], "obs_names"),
        _entry(out, meta["slices"][1], "obs_names"),
    )


# ------------------------------------------------------------------------------------------
# Bad input: one-line UserInputError naming the problem and the fix; nothing written


def _bad_position_key(tmp_path: Path) -> tuple[list[Path], dict]:
    adata = make_tiny_adata(position_key="spatial")
    return [write_h5ad(adata, tmp_path / "a.h5ad")], {}


def _with(change: Callable[[ad.AnnData], ad.AnnData | None], **adata_kwargs: object):
    def build(tmp_path: Path) -> tuple[list[Path], dict]:
        adata = make_tiny_adata(**adata_kwargs)  # type: ignore[arg-type]
        changed = change(adata)  # an AnnData with no cells is falsy, so test for None
        adata = adata if changed is None else changed
        return [write_h5ad(adata, tmp_path / "a.h5ad")], {}

    return build


def _set_coords(value: np.ndarray) -> Callable[[ad.AnnData], None]:
    def change(adata: ad.AnnData) -> None:
        adata.obsm["ccf"] = value(adata) if callable(value) else value

    return change


def _nan_coords(adata: ad.AnnData) -> None:
    ccf = adata.obsm["ccf"].copy()
    rows = np.flatnonzero(adata.obs["slice"].to_numpy() == "slice_1")[:3]
    ccf[rows, 0] = np.nan
    adata.obsm["ccf"] = ccf


def _inf_expression(adata: ad.AnnData) -> None:
    rows = np.flatnonzero(adata.obs["slice"].to_numpy() == "slice_2")[:2]
    adata.X[rows, 1] = np.inf


def _one_cell_slice(adata: ad.AnnData) -> ad.AnnData:
    keep = np.ones(adata.n_obs, dtype=bool)
    keep[np.flatnonzero(adata.obs["slice"].to_numpy() == "slice_1")[1:]] = False
    return adata[keep].copy()


def _duplicate_genes(adata: ad.AnnData) -> None:
    adata.var_names = ["gene_0", *adata.var_names[1:-1], "gene_0"]


def _negative(adata: ad.AnnData) -> None:
    adata.X[0, 0] = -1.0


def _two_files(change: Callable[[ad.AnnData, ad.AnnData], None], **kwargs: object):
    def build(tmp_path: Path) -> tuple[list[Path], dict]:
        a, b = make_tiny_adata(seed=1), make_tiny_adata(seed=2)
        b.obs["slice"] = b.obs["slice"].cat.rename_categories(["b0", "b1", "b2"])
        change(a, b)
        return [write_h5ad(a, tmp_path / "a.h5ad"), write_h5ad(b, tmp_path / "b.h5ad")], kwargs

    return build


def _disjoint_genes(a: ad.AnnData, b: ad.AnnData) -> None:
    b.var_names = [f"other_{g}" for g in range(b.n_vars)]


def _kwargs(base: Callable, **kwargs: object):
    def build(tmp_path: Path) -> tuple[list[Path], dict]:
        files, _ = base(tmp_path)
        return files, kwargs

    return build


def _missing_file(tmp_path: Path) -> tuple[list[Path], dict]:
    return [tmp_path / "nope.h5ad"], {}


def _not_h5ad(tmp_path: Path) -> tuple[list[Path], dict]:
    path = tmp_path / "table.csv"
    path.write_text("a,b\n1,2\n")
    return [path], {}


def _garbage_h5ad(tmp_path: Path) -> tuple[list[Path], dict]:
    path = tmp_path / "broken.h5ad"
    path.write_bytes(b"not an hdf5 file")
    return [path], {}


_plain = _with(lambda adata: None)

BAD_INPUTS = {
    "missing file": (_missing_file, ["nope.h5ad", "does not exist"]),
    "not h5ad": (_not_h5ad, ["table.csv", "not an .h5ad"]),
    "unreadable": (_garbage_h5ad, ["broken.h5ad", "cannot read"]),
    "missing obsm key": (_bad_position_key, ["obsm['ccf']", "'spatial'", "--position_key spatial"]),
    "4 columns": (
        _with(_set_coords(lambda a: np.ones((a.n_obs, 4), dtype=np.float32))),
        ["shape (180, 4)", "2 or 3 columns"],
    ),
    "nan coordinates": (_with(_nan_coords), ["3 cells", "slice_1", "NaN"]),
    "inf expression": (_with(_inf_expression), ["2 cells", "slice_2", "adata.X"]),
    "one-cell slice": (_with(_one_cell_slice), ["slice_1", "1 cell", "at least 3"]),
    "no cells": (_with(lambda adata: adata[:0].copy()), ["a.h5ad has no cells"]),
    "duplicate genes": (_with(_duplicate_genes), ["duplicate gene names", "gene_0"]),
    "negative with log1p": (
        _kwargs(_with(_negative, counts=False), normalize="log1p"),
        ["negative values", "--normalize none"],
    ),
    "missing slice key": (_kwargs(_plain, slice_key="section"), ["'section'", "--slice_key"]),
    "missing cell type key": (
        _kwargs(_plain, cell_type_key="celltype"),
        ["'celltype'", "'cell_type'"],
    ),
    "unknown val slice": (
        _kwargs(_plain, val_slices=["slice_9"]),
        ["'slice_9'", "existing slices", "'slice_0'"],
    ),
    "no common genes": (_two_files(_disjoint_genes), ["no gene in common", "--gene_list_file"]),
    "gene list genes nowhere": (
        _kwargs(_plain, gene_list=["gene_0", "GAPDH"]),
        ["1 genes of the gene list", "'GAPDH'"],
    ),
}


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path: Path, case: str) -> None:
    build, fragments = BAD_INPUTS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    files, kwargs = build(inputs)
    out = tmp_path / "work" / "out"
    with pytest.raises(UserInputError) as err:
        _run(files, out, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert not out.parent.exists() or not any(out.parent.iterdir())
    assert not out.exists()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"normalize": "zscore"}, "auto, log1p or none"),
        ({"val_fraction": 1.5}, "--val_fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "must be < 1"),
        ({"gene_list": ["a", "b", "a"]}, "duplicate gene names"),
        ({"val_slices": ["s1"], "test_slices": ["s1"]}, "both --val_slices and --test_slices"),
    ],
)
def test_bad_arguments(kwargs: dict, fragment: str) -> None:
    with pytest.raises(UserInputError, match=fragment):
        SpatialDataPreprocessor(**kwargs)


def test_holding_out_every_slice_is_an_error(tmp_path: Path) -> None:
    path = write_h5ad(make_tiny_adata(n_slices=2), tmp_path / "a.h5ad")
    with pytest.raises(UserInputError, match="leave at least one"):
        _run([path], tmp_path / "out", val_slices=["slice_0"], test_slices=["slice_1"])
    assert_nothing_written(tmp_path / "out")


# ------------------------------------------------------------------------------------------
# Atomic write


def test_existing_output_is_refused_then_replaced(tmp_path: Path, tiny_h5ad: Path) -> None:
    out = tmp_path / "out"
    _run([tiny_h5ad], out, cell_type_key="cell_type")
    with pytest.raises(UserInputError, match="--overwrite"):
        _run([tiny_h5ad], out)
    # A failing run with overwrite leaves the old store untouched.
    with pytest.raises(UserInputError):
        _run([tiny_h5ad], out, position_key="spatial", overwrite=True)
    assert json.loads((out / "metadata.json").read_text())["cell_types"]
    meta = SpatialDataPreprocessor(progress=False).preprocess_and_save(
        [tiny_h5ad], out, overwrite=True
    )
    assert json.loads((out / "metadata.json").read_text()) == meta
    assert meta["cell_types"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.h5ad"]


def test_overwrite_never_deletes_what_the_store_did_not_write(
    tmp_path: Path, tiny_h5ad: Path
) -> None:
    out = tmp_path / "out"
    _run([tiny_h5ad], out)
    (out / "keep.txt").write_text("user data")
    (out / "slices" / "notes.md").write_text("mine")
    with pytest.raises(UserInputError, match=r"did not write \(keep.txt, slices/notes.md\)"):
        _run([tiny_h5ad], out, overwrite=True)
    assert (out / "keep.txt").read_text() == "user data"
    assert (out / "slices" / "notes.md").read_text() == "mine"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_run_leaves_nothing_the_next_run_keeps(tmp_path: Path, tiny_h5ad: Path) -> None:
    """SIGKILL during preprocess leaves a hidden temporary store; the next run removes it, and
    puts back a store it had moved aside, while a live process's temporary store is kept."""
    out = tmp_path / "out"
    host = socket.gethostname()
    dead = tmp_path / f".out.tmp-{_dead_pid()}-0123abcd@{host}"
    (dead / "slices" / "0").mkdir(parents=True)
    (dead / "slices" / "0" / "expression.npy").write_bytes(b"\0" * 1000)
    alive = tmp_path / f".out.tmp-{os.getppid()}-4567abcd@{host}"
    alive.mkdir()
    _run([tiny_h5ad], out)
    assert not dead.exists() and alive.is_dir()

    # killed between moving the old store aside and moving the new one in
    moved = tmp_path / f".out.old-{_dead_pid()}-89abcdef@{host}"
    os.replace(out, moved)
    with pytest.raises(UserInputError, match="--overwrite"):
        _run([tiny_h5ad], out)
    assert (out / "metadata.json").is_file() and not moved.exists()


def test_output_dir_that_is_the_current_folder(
    tmp_path: Path, tiny_h5ad: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(UserInputError, match="current folder"):
        _run([tiny_h5ad], Path("."), overwrite=True)
    assert not any(here.iterdir())


def test_empty_existing_output_folder_is_fine(tmp_path: Path, tiny_h5ad: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _run([tiny_h5ad], out)
    assert (out / "metadata.json").is_file()


# ------------------------------------------------------------------------------------------
# prepare_anndata (new data for a trained model)


def test_prepare_anndata_matches_the_store(tmp_path: Path, tiny_h5ad: Path) -> None:
    out = tmp_path / "out"
    meta = _run([tiny_h5ad], out, cell_type_key="cell_type")
    prepared = prepare_anndata(
        ad.read_h5ad(tiny_h5ad),
        genes=meta["genes"],
        cell_type_key="cell_type",
        cell_types=meta["cell_types"],
        source=str(tiny_h5ad),
    )
    assert [p.name for p in prepared] == [s["name"] for s in meta["slices"]]
    for p, info in zip(prepared, meta["slices"], strict=True):
        np.testing.assert_array_equal(p.expression, _entry(out, info, "expression"))
        np.testing.assert_array_equal(p.positions, _entry(out, info, "positions"))
        np.testing.assert_array_equal(p.cell_type, _entry(out, info, "cell_type"))
        np.testing.assert_array_equal(p.obs_names, _entry(out, info, "obs_names"))
        assert p.scale == info["scale"] and p.normalization == "log1p"
        assert p.n_missing_genes == 0


def test_prepare_anndata_reports_missing_genes_and_optional_positions(
    tiny_adata: ad.AnnData, caplog: pytest.LogCaptureFixture
) -> None:
    genes = ["gene_2", "ABSENT", "gene_0", "ALSO_ABSENT"]
    adata = tiny_adata.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    del adata.obsm["ccf"]
    with caplog.at_level(logging.WARNING):
        prepared = prepare_anndata(
            adata,
            genes=genes,
            require_positions=False,
            cell_type_key="cell_type",
            cell_types=["type_1", "unused"],
            source="new.h5ad",
        )
    assert "2 of the model's 4 genes (50.0%)" in caplog.text
    first = prepared[0]
    assert first.missing_genes == ("ABSENT", "ALSO_ABSENT") and first.missing_gene_share == 0.5
    assert first.gene_mask.tolist() == [True, False, True, False]
    assert np.all(first.expression[:, [1, 3]] == 0)
    assert first.positions is None and first.center is None and first.scale is None
    labels = adata.obs["cell_type"].to_numpy()[first.obs_indices]
    np.testing.assert_array_equal(first.cell_type, np.where(labels == "type_1", 0, -1))
    with pytest.raises(UserInputError, match=r"adata\.obsm is empty"):
        prepare_anndata(adata, genes=genes, require_positions=True)
    with pytest.raises(UserInputError, match="none of the model's 2 genes"):
        prepare_anndata(tiny_adata, genes=["X1", "X2"])


# ------------------------------------------------------------------------------------------
# Real data (../shared/data)


@pytest.mark.realdata
def test_seqfish(tmp_path: Path, seqfish_path: Path) -> None:
    out = tmp_path / "seqfish"
    meta = _run([seqfish_path], out, position_key="spatial", cell_type_key="cell_type")
    assert meta["n_genes"] == 351 and len(meta["genes"]) == 351
    counts = {s["name"]: s["n_cells"] for s in meta["slices"]}
    assert counts == {
        "embryo1_z2": 2180,
        "embryo1_z5": 1668,
        "embryo2_z2": 1593,
        "embryo2_z5": 1393,
        "embryo3_z2": 2483,
        "embryo3_z5": 2124,
    }
    assert list(meta["normalization"]["applied"].values()) == ["none"]  # already log-normalised
    assert len(meta["cell_types"]) == 24
    for info in meta["slices"]:
        positions = _entry(out, info, "positions")
        assert positions.shape == (info["n_cells"], 2) and info["input_dims"] == 2
        assert (_entry(out, info, "cell_type") >= 0).all()


@pytest.mark.realdata
def test_bdtnp_keeps_three_axes(tmp_path: Path, bdtnp_path: Path) -> None:
    out = tmp_path / "bdtnp"
    meta = _run([bdtnp_path], out, position_key="spatial")
    assert meta["n_genes"] == 84 and meta["split"]["by"] == "cells"
    assert sum(s["n_cells"] for s in meta["slices"]) == 3039
    positions = np.concatenate([_entry(out, s, "positions") for s in meta["slices"]])
    assert np.all(positions.std(axis=0) > 0.1)
    assert meta["slices"][0]["input_dims"] == 3


@pytest.mark.realdata
def test_seqfish_default_position_key_names_spatial(tmp_path: Path, seqfish_path: Path) -> None:
    out = tmp_path / "seqfish"
    with pytest.raises(UserInputError, match=r"--position_key spatial"):
        _run([seqfish_path], out)
    assert_nothing_written(out)

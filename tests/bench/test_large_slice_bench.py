"""bench/large_slice.py: tiles a slice, runs `alphastomics sample` per mode, checks outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_OVERRIDES, load_bench_script, make_tiny_adata

from alphastomics.main import main

TINY = [
    *TINY_OVERRIDES,
    "training.max_steps=2",
    "training.val_every_n_epochs=1",
    "training.val_sample_steps=2",
]


def test_tiled_slice_keeps_the_expression_and_spreads_the_copies():
    adata = make_tiny_adata(n_slices=2, n_cells=40, n_dims=2, sparse=True)
    piece = adata[adata.obs["slice"] == "slice_1"]
    tiled = load_bench_script("large_slice").tile_slice(
        adata, slice_key="slice", name="slice_1", position_key="ccf", n_cells=3 * piece.n_obs - 5
    )
    assert tiled.n_obs == 3 * piece.n_obs - 5 and tiled.obsm["ccf"].shape[1] == 2
    n = piece.n_obs
    assert np.allclose(tiled.X[n : 2 * n].toarray(), piece.X.toarray())
    first, second = tiled.obsm["ccf"][:n], tiled.obsm["ccf"][n : 2 * n]
    assert first[:, 0].max() < second[:, 0].min()  # copies side by side, not overlapping
    assert list(tiled.obs["cell_type"][n : 2 * n]) == list(piece.obs["cell_type"])
    assert set(tiled.obs["slice"]) == {"slice_1_tiled"}


@pytest.mark.slow
def test_large_slice_bench_runs_the_cli(tmp_path: Path) -> None:
    adata = make_tiny_adata(n_slices=3, n_cells=40, n_dims=2)
    h5ad = tmp_path / "tissue.h5ad"
    adata.write_h5ad(h5ad)
    store, run = tmp_path / "store", tmp_path / "run"
    assert main(["preprocess", "--input", str(h5ad), "--output_dir", str(store)]) == 0
    assert main(["train", "--data_dir", str(store), "--output_dir", str(run), *TINY]) == 0
    out = tmp_path / "large.json"
    args = ["--h5ad", str(h5ad), "--slice", "slice_2", "--position_key", "ccf"]
    args += ["--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--n_cells", "150"]
    args += ["--workdir", str(tmp_path / "work"), "--json", str(out), "--test"]
    assert load_bench_script("large_slice").main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["expr_to_pos", "pos_to_expr", "preprocess", "test"]
    assert all(r["n_cells"] == 150 and r["peak_gib"] > 0 for r in rows)
    assert rows[-1]["n_anchors"] == 150 and rows[-1]["anchored"] is False
    assert not list((tmp_path / "work").iterdir())  # inputs, outputs and figures removed


def test_large_slice_bench_refuses_no_modes_without_test(tmp_path: Path, capsys) -> None:
    args = ["--h5ad", str(tmp_path / "a.h5ad"), "--slice", "s", "--checkpoint", "c.ckpt"]
    with pytest.raises(SystemExit) as exit_info:
        load_bench_script("large_slice").main([*args, "--workdir", str(tmp_path), "--modes"])
    assert exit_info.value.code == 2
    assert "nothing to run" in capsys.readouterr().err

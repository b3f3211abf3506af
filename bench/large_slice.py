"""Whole-section scale through the CLI: `alphastomics sample` on one slice of up to millions of cells.

A real slice of ``--h5ad`` (``--slice``) is tiled on a grid, side by side with a gap, until the
tiled slice holds ``--n_cells`` cells (the last tile is cut short); it is written as one .h5ad
with the source's expression matrix format (sparse stays sparse), the source's ``obs`` columns
and its own ``obs[slice_key]``.
Each ``--modes`` entry is then run as a user runs it, in a fresh process::

    alphastomics sample --checkpoint CKPT --input_data tiled.h5ad --sample_mode MODE

under ``/usr/bin/time``, which gives the wall time and the peak resident set of the whole
command (reading, normalising, sampling, writing). The output is checked: one row per input
cell, finite values, ``obsm["alphastomics_positions"]`` with as many columns as the input's.
This measures scale only: a tiled slice repeats the same tissue, so its placement is ambiguous
and no accuracy is scored.

With ``--test`` the tiled slice also goes through ``alphastomics test``, timed the same way:
``alphastomics preprocess`` writes a store of the tiled file beside the source's own slices
(``--test_slices`` the tiled one; the source's slices are the rest of the split), then
``alphastomics test`` samples it in every mode and scores it with anchor cells
(``metrics.json``, checked for the tiled slice, every cell and the anchor count). Its scores
show the metrics run at this size, not accuracy (see above).

Usage::

    python bench/large_slice.py --h5ad ../shared/data/seqfish_embryo/seqfish_embryo.h5ad \\
        --slice embryo3_z2 --checkpoint runs/final/seqfish_s0/run/checkpoints/last.ckpt \\
        --n_cells 1000000 --workdir runs/large
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

TIME = "/usr/bin/time"


def tile_slice(
    adata: ad.AnnData, *, slice_key: str, name: str, position_key: str, n_cells: int
) -> ad.AnnData:
    """Copies of slice ``name`` on a square grid, cut to ``n_cells`` cells -> a new AnnData."""
    piece = adata[adata.obs[slice_key].astype(str) == name]
    if piece.n_obs == 0:
        raise SystemExit(f"no cells with obs[{slice_key!r}] == {name!r}")
    positions = np.asarray(piece.obsm[position_key], dtype=np.float64)  # (n, D)
    extent = positions.max(axis=0) - positions.min(axis=0)
    copies = math.ceil(n_cells / piece.n_obs)
    side = math.ceil(math.sqrt(copies))
    offsets = np.zeros((copies, positions.shape[1]))
    offsets[:, 0] = (np.arange(copies) % side) * extent[0] * 1.1
    offsets[:, 1] = (np.arange(copies) // side) * extent[1] * 1.1
    tiled = (positions[None] + offsets[:, None]).reshape(-1, positions.shape[1])[:n_cells]
    x = piece.X
    if sp.issparse(x):
        matrix = sp.vstack([sp.csr_matrix(x)] * copies, format="csr")[:n_cells]
    else:
        matrix = np.tile(np.asarray(x), (copies, 1))[:n_cells]
    rows = np.tile(np.arange(piece.n_obs), copies)[:n_cells]
    obs = piece.obs.iloc[rows].reset_index(drop=True)  # every column, e.g. the cell types
    obs[slice_key] = f"{name}_tiled"
    out = ad.AnnData(X=matrix, obs=obs, var=piece.var[[]].copy())
    out.obs_names = [f"cell_{i}" for i in range(n_cells)]
    out.obsm[position_key] = tiled.astype(np.float32)
    return out


def run_timed(command: list[str]) -> dict[str, Any]:
    """Run ``command`` under /usr/bin/time; wall seconds and peak resident set in GiB."""
    start = time.perf_counter()
    proc = subprocess.run(
        [TIME, "-f", "TIME %e %M", *command], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    lines = [line for line in proc.stderr.splitlines() if line.startswith("TIME ")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise SystemExit(f"{' '.join(command[:3])} failed (exit {proc.returncode}): {tail}")
    _, seconds, peak_kib = lines[-1].split()
    return {"seconds": float(seconds), "wall_seconds": wall, "peak_gib": int(peak_kib) / 2**20}


def check_output(path: Path, mode: str, n_cells: int, n_dims: int) -> None:
    """The output has every cell, finite values and the input's number of position columns."""
    out = ad.read_h5ad(path)
    if out.n_obs != n_cells:
        raise SystemExit(f"{path}: {out.n_obs} cells, expected {n_cells}")
    if mode == "expr_to_pos":
        values = np.asarray(out.obsm["alphastomics_positions"])
        if values.shape != (n_cells, n_dims):
            raise SystemExit(f"{path}: positions {values.shape}, expected {(n_cells, n_dims)}")
    else:
        values = np.asarray(out.layers["alphastomics_expression"])
    if not np.isfinite(values).all():
        raise SystemExit(f"{path}: non-finite values in the {mode} output")


def check_test_metrics(path: Path, name: str, n_cells: int) -> dict[str, Any]:
    """``metrics.json`` of ``alphastomics test`` scored slice ``name`` with all ``n_cells`` cells."""
    result = json.loads(path.read_text())
    scores = result["slices"].get(name)
    if scores is None or scores["n_cells"] != n_cells:
        raise SystemExit(f"{path}: no scores of {name!r} with {n_cells} cells")
    placement = scores["expr_to_pos"]
    if not np.isfinite(placement["distance_spearman_median"]):
        raise SystemExit(f"{path}: non-finite distance Spearman of {name!r}")
    return {"n_anchors": placement["n_anchors"], "anchored": placement["anchored"]}


def main(argv: list[str] | None = None) -> int:
    """Tile the slice, run each mode through the CLI, print and optionally save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h5ad", type=Path, required=True, help="source data with the slice")
    parser.add_argument("--slice", required=True, help="obs[slice_key] value of the slice to tile")
    parser.add_argument("--checkpoint", type=Path, required=True, help="model trained on it")
    parser.add_argument("--n_cells", type=int, default=1_000_000)
    parser.add_argument("--slice_key", default="slice")
    parser.add_argument("--position_key", default="spatial")
    parser.add_argument(
        "--modes",
        nargs="*",
        default=["expr_to_pos", "pos_to_expr"],
        help="sample modes (none: `--modes` alone, e.g. with --test only)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)"
    )
    parser.add_argument("--workdir", type=Path, required=True, help="tiled input and outputs")
    parser.add_argument("--keep", action="store_true", help="keep the tiled input and outputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--test", action="store_true", help="also preprocess the tiled slice and run `test` on it"
    )
    args = parser.parse_args(argv)
    if not args.modes and not args.test:
        parser.error("nothing to run: give --modes a mode, or pass --test")
    if not Path(TIME).exists():
        raise SystemExit(f"{TIME} is needed to measure peak memory (GNU time)")

    args.workdir.mkdir(parents=True, exist_ok=True)
    source = ad.read_h5ad(args.h5ad)
    tiled = tile_slice(
        source,
        slice_key=args.slice_key,
        name=args.slice,
        position_key=args.position_key,
        n_cells=args.n_cells,
    )
    n_dims = tiled.obsm[args.position_key].shape[1]
    del source
    data = args.workdir / f"tiled_{args.n_cells}.h5ad"
    tiled.write_h5ad(data)
    del tiled
    cli = shutil.which("alphastomics") or str(Path(sys.executable).parent / "alphastomics")
    rows = []
    print(f"# {args.n_cells:,} cells tiled from {args.h5ad.name}:{args.slice}; {args.checkpoint}")
    print(f"{'mode':<12} {'cells':>10} {'seconds':>9} {'peak GiB':>9}")
    for mode in args.modes:
        folder = args.workdir / mode  # the output and the figure `sample` writes beside it
        folder.mkdir(exist_ok=True)
        output = folder / f"{mode}.h5ad"
        command = [cli, "sample", "--checkpoint", str(args.checkpoint), "--input_data", str(data)]
        command += ["--sample_mode", mode, "--output", str(output), "--overwrite"]
        command += [] if args.steps is None else ["--steps", str(args.steps)]
        row = {"mode": mode, "n_cells": args.n_cells, **run_timed(command)}
        check_output(output, mode, args.n_cells, n_dims)
        rows.append(row)
        print(f"{mode:<12} {args.n_cells:>10,} {row['seconds']:>9.1f} {row['peak_gib']:>9.2f}")
        if not args.keep:
            shutil.rmtree(folder)
    if args.test:
        rows += run_test(args, cli, data, f"{args.slice}_tiled")
    if not args.keep:
        data.unlink()
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
        )
    return 0


def run_test(args: argparse.Namespace, cli: str, data: Path, name: str) -> list[dict[str, Any]]:
    """Preprocess ``data`` beside ``args.h5ad`` (``name`` the test slice), run ``test`` on it."""
    store, scores = args.workdir / "store", args.workdir / "test"
    preprocess = [cli, "preprocess", "--input", str(data), str(args.h5ad)]
    preprocess += ["--output_dir", str(store), "--position_key", args.position_key]
    preprocess += ["--slice_key", args.slice_key, "--test_slices", name, "--overwrite"]
    test = [cli, "test", "--checkpoint", str(args.checkpoint), "--data_dir", str(store)]
    test += ["--output_dir", str(scores), "--overwrite"]
    test += [] if args.steps is None else ["--steps", str(args.steps)]
    rows = []
    for mode, command in (("preprocess", preprocess), ("test", test)):
        row = {"mode": mode, "n_cells": args.n_cells, **run_timed(command)}
        if mode == "test":
            row |= check_test_metrics(scores / "metrics.json", name, args.n_cells)
        rows.append(row)
        print(f"{mode:<12} {args.n_cells:>10,} {row['seconds']:>9.1f} {row['peak_gib']:>9.2f}")
    if not args.keep:
        shutil.rmtree(store)
        shutil.rmtree(scores)
    return rows


if __name__ == "__main__":
    sys.exit(main())

"""Data sets for held-out settings the two shared benchmarks do not cover, from their files.

``bench/real_data.py`` runs on what this writes, so the model and the baselines meet settings
the seqFISH (4 training slices in roughly one frame) and BDTNP slab (one frame, cells held out)
commands do not test:

- ``slices``: keep some slices of a multi-slice file (e.g. one plane of each of 3 embryos: a
  3-slice data set, one slice held out, 2 left to train on); with ``--rotate``, each slice is
  also turned about its centroid by a random angle and mirrored with probability 1/2 (slices in
  arbitrary orientation, as unregistered sections are);
- ``blocks``: cut a one-slice (e.g. 3D) file into ``--n_blocks`` blocks of equal cell count along
  an axis, named in a new ``obs`` column (a volume whose held-out block is a slice of its own).

Usage::

    python bench/held_out_settings.py slices --h5ad ../shared/data/seqfish_embryo/seqfish_embryo.h5ad \\
        --keep_slices embryo1_z2 embryo2_z2 embryo3_z2 --output runs/settings/seqfish_3.h5ad
    python bench/held_out_settings.py slices --h5ad ../shared/data/seqfish_embryo/seqfish_embryo.h5ad \\
        --keep_slices embryo1_z2 embryo2_z2 embryo3_z2 --rotate --output runs/settings/seqfish_3_rotated.h5ad
    python bench/held_out_settings.py blocks --h5ad ../shared/data/bdtnp_drosophila/bdtnp_drosophila.h5ad \\
        --output runs/settings/bdtnp_blocks.h5ad
    python bench/real_data.py --h5ad runs/settings/seqfish_3.h5ad --position_key spatial \\
        --cell_type_key cell_type --test_slices embryo3_z2 --budget_minutes 6 --num_seeds 1 \\
        --output_dir runs/settings/seqfish_3
    python bench/real_data.py --h5ad runs/settings/bdtnp_blocks.h5ad --position_key spatial \\
        --slice_key block --test_slices block2 --budget_minutes 4 --num_seeds 1 \\
        --output_dir runs/settings/bdtnp_blocks

Expression, ``obs`` and ``var`` are copied unchanged; only the kept cells, the coordinates
(``--rotate``) and the new ``obs`` column (``blocks``) differ. Seconds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd


def keep_slices(
    adata: ad.AnnData,
    slice_key: str,
    names: Sequence[str],
    position_key: str,
    rotate_seed: int | None,
) -> ad.AnnData:
    """The cells of slices ``names``; with ``rotate_seed``, each slice turned about its centroid
    by a random angle and mirrored (second axis) with probability 1/2, in sorted slice order."""
    slices = adata.obs[slice_key].astype(str)
    missing = sorted(set(names) - set(slices))
    if missing:
        raise SystemExit(f"{slice_key} has no slice {missing}; it has {sorted(set(slices))}")
    kept = adata[slices.isin(names).to_numpy()].copy()
    kept.obs[slice_key] = kept.obs[slice_key].astype(str).astype("category")
    if rotate_seed is None:
        return kept
    positions = np.asarray(kept.obsm[position_key], dtype=np.float64).copy()
    if positions.shape[1] != 2:
        raise SystemExit(
            f"--rotate turns 2D slices; obsm['{position_key}'] has {positions.shape[1]} columns"
        )
    rng = np.random.default_rng(rotate_seed)
    for name in kept.obs[slice_key].cat.categories:
        rows = (kept.obs[slice_key] == name).to_numpy()
        angle = rng.uniform(0.0, 2.0 * np.pi)
        turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        if rng.random() < 0.5:
            turn = turn @ np.diag([1.0, -1.0])
        centre = positions[rows].mean(axis=0)
        positions[rows] = (positions[rows] - centre) @ turn.T + centre
        print(f"{name}: turned {np.degrees(angle):.0f} degrees, mirrored {np.linalg.det(turn) < 0}")
    kept.obsm[position_key] = positions.astype(np.float32)
    return kept


def cut_blocks(
    adata: ad.AnnData, position_key: str, axis: int, n_blocks: int, block_key: str
) -> ad.AnnData:
    """``adata`` with ``obs[block_key]`` = ``block0`` ... : ``n_blocks`` runs of equal cell count
    along coordinate ``axis`` (quantile edges)."""
    coordinate = np.asarray(adata.obsm[position_key])[:, axis]
    edges = np.quantile(coordinate, np.linspace(0.0, 1.0, n_blocks + 1)[1:-1])
    out = adata.copy()
    out.obs[block_key] = pd.Categorical([f"block{b}" for b in np.digitize(coordinate, edges)])
    print(out.obs[block_key].value_counts().sort_index().to_string())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    slices = sub.add_parser("slices", help="keep some slices; --rotate turns each")
    slices.add_argument("--keep_slices", nargs="+", required=True)
    slices.add_argument("--slice_key", default="slice")
    slices.add_argument("--rotate", action="store_true", help="turn and mirror each slice")
    slices.add_argument("--seed", type=int, default=7, help="seed of the turns")
    blocks = sub.add_parser("blocks", help="cut one slice into blocks along an axis")
    blocks.add_argument("--axis", type=int, default=0, help="coordinate column (0 = x)")
    blocks.add_argument("--n_blocks", type=int, default=5)
    blocks.add_argument("--block_key", default="block")
    for p in (slices, blocks):
        p.add_argument("--h5ad", type=Path, required=True)
        p.add_argument("--position_key", default="spatial")
        p.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.output.exists():
        raise SystemExit(f"{args.output} exists; remove it or choose another --output")
    adata = ad.read_h5ad(args.h5ad)
    if args.kind == "slices":
        seed = args.seed if args.rotate else None
        out = keep_slices(adata, args.slice_key, args.keep_slices, args.position_key, seed)
    else:
        out = cut_blocks(adata, args.position_key, args.axis, args.n_blocks, args.block_key)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    out.write_h5ad(args.output)
    print(f"wrote {args.output}: {out.n_obs} cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What tells generated cells from real ones: the realism AUC after per-gene corrections.

Reads an output folder of ``bench/virtual_tissue.py`` (its ``data`` store and
``generated_seed0.h5ad``) and, for one held-out slice, scores the random-forest realism AUC
(:func:`alphastomics.evaluation.tissue_metrics.realism_auc`, 0.5 best) of the generated cells
as they are and after corrections that fix each gene's marginal distribution only:

- **clipped at 0**: log-normalised expression is never negative;
- **zero share matched**: per gene, the lowest generated values are set to 0 until the gene's
  share of zeros equals its share in the training cells (then clipped at 0);
- **quantile-mapped**: per gene, the generated values are replaced by the training values of
  the same rank (each gene's marginal becomes exactly the training one).

If the AUC stays high after the quantile map, what the forest reads is how genes combine
within a cell, not any one gene's distribution. The shares of zeros and negative values, the
median ratio of per-gene standard deviations (generated / real) and, for real and generated
cells, the mean absolute correlation of gene pairs and the variance share of the top 10
principal components (how low-rank the cells are) are printed beside it.

Usage (``--layer alphastomics_denoised`` scores the denoised expression states instead of the
measurement-like ``X``)::

    python bench/realism_diagnostics.py --output_dir runs/virtual_seqfish --slice embryo3_z2

Prints one markdown table. About a minute for 2,500 cells on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np

from alphastomics import keys
from alphastomics.data.store import ProcessedStore
from alphastomics.evaluation.tissue_metrics import realism_auc


def zero_share_matched(generated: np.ndarray, zero_share: np.ndarray) -> np.ndarray:
    """(N, G) ``generated`` with each gene's lowest ``zero_share[g]`` values set to 0, clipped at 0."""
    out = generated.copy()
    for g in range(out.shape[1]):
        threshold = np.quantile(out[:, g], zero_share[g])
        out[out[:, g] <= threshold, g] = 0.0
    return np.clip(out, 0.0, None)


def quantile_mapped(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N, G) ``generated`` with every value replaced by the ``reference`` value of its rank."""
    out = np.empty_like(generated)
    n = len(generated)
    for g in range(generated.shape[1]):
        ranks = np.argsort(np.argsort(generated[:, g])) / max(n - 1, 1)
        out[:, g] = np.quantile(reference[:, g], ranks)
    return out


def gene_structure(values: np.ndarray, n_components: int = 10) -> tuple[float, float]:
    """How genes combine in the cells of ``values`` (N, G): the mean absolute correlation of
    gene pairs (genes constant here left out), and the share of variance in the top
    ``n_components`` principal components (low rank: cells vary along few programmes)."""
    varying = values[:, values.std(0) > 0]
    corr = np.corrcoef(varying.T)
    pairs = np.triu_indices(corr.shape[0], 1)
    centred = varying - varying.mean(0)
    power = np.linalg.svd(centred, compute_uv=False) ** 2
    return float(np.abs(corr[pairs]).mean()), float(power[:n_components].sum() / power.sum())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", type=Path, required=True, help="virtual_tissue output")
    parser.add_argument("--slice", required=True, help="held-out slice to score")
    parser.add_argument("--seed", type=int, default=0, help="seed of the AUC's forest and folds")
    parser.add_argument(
        "--layer",
        default=None,
        help=f"score this layer of the generated cells instead of X (e.g. {keys.DENOISED_EXPRESSION})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = ProcessedStore(args.output_dir / "data")
    names = store.slice_names()
    if args.slice not in names:
        print(f"--slice {args.slice!r} is not in the store (its entries: {names})", file=sys.stderr)
        return 2
    part = store.load_slice(names.index(args.slice), mmap=False)
    genes = part.gene_mask
    real = part.expression[:, genes]
    train = np.concatenate(
        [store.load_slice(i, mmap=False).expression for i in store.slice_indices("train")]
    )[:, genes]
    tissue = ad.read_h5ad(args.output_dir / "generated_seed0.h5ad")
    entry = store.metadata["slices"][names.index(args.slice)]
    source = entry.get("slice", entry["name"])  # a cell-split entry is generated as its slice
    cells = (tissue.obs[keys.SLICE_KEY] == source).to_numpy()
    if not cells.any():
        print(f"no generated cells of slice {source!r} in {args.output_dir}", file=sys.stderr)
        return 2
    if args.layer is not None and args.layer not in tissue.layers:
        print(
            f"--layer {args.layer!r} is not a layer of {args.output_dir / 'generated_seed0.h5ad'} "
            f"(its layers: {list(tissue.layers)})",
            file=sys.stderr,
        )
        return 2
    values = tissue.X if args.layer is None else tissue.layers[args.layer]
    generated = np.asarray(values[cells], dtype=np.float32)[:, genes]
    candidates = {
        "as generated": generated,
        "clipped at 0": np.clip(generated, 0.0, None),
        "zero share matched": zero_share_matched(generated, (train == 0).mean(0)),
        "quantile-mapped to training": quantile_mapped(generated, train),
    }
    std_ratio = np.median(generated.std(0) / np.maximum(real.std(0), 1e-9))
    print(
        f"{args.slice}: {len(real)} real, {len(generated)} generated cells; zeros real "
        f"{(real == 0).mean():.3f} / generated {(generated == 0).mean():.3f}; negative "
        f"generated {(generated < 0).mean():.3f}; per-gene std generated/real {std_ratio:.2f}"
    )
    for label, values in (("real", real), ("generated", generated)):
        mean_r, top = gene_structure(values)
        print(f"{label}: mean |r| of gene pairs {mean_r:.3f}; top-10 PCs {top:.3f} of the variance")
    print("| candidate | realism AUC (0.5 best) |")
    print("|---|---|")
    for label, values in candidates.items():
        print(f"| {label} | {realism_auc(real, values, seed=args.seed):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

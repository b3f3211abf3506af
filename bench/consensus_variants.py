"""Other ways of pulling cells toward their alike cells, against ``sampling.consensus`` as shipped.

The sampler's consensus (``alphastomics.diffusion_model.sample.pull_to_neighbors``) moves each
cell's clean-position estimate the share ``sampling.consensus`` of the way to the weighted mean
estimate of its alike cells, at every step. This script swaps that pull for a variant while it
places a checkpoint's test entries (``expr_to_pos``, each entry alone) and scores them as
``bench/placement_ceilings.py`` does (median distance Spearman, kNN(10) preservation,
cell-weighted over the entries). The variants (share ``s`` = the checkpoint's
``sampling.consensus``, step ``i`` of ``n``):

- ``default``: the pull as shipped;
- ``rising`` / ``falling``: share 0.25 to 0.75 / 0.75 to 0.25 over the steps;
- ``late``: share ``s``, then 0.9 in the last 3 steps;
- ``twice``: two pulls per step;
- ``shared``: each alike cell also weighted by the share of alike cells the two have in common
  (a shared-nearest-neighbour weight);
- ``beyond_spacing``: only the part of a cell's move beyond the layout's mean nearest-neighbour
  spacing;
- ``overlap``: share ``s`` times (1 - the share of each cell's alike cells already among its
  nearest cells in the current estimate, averaged over the item).

Usage::

    python bench/consensus_variants.py --data_dir RUN/data --checkpoint RUN/run/checkpoints/last.ckpt \\
        --variants default rising falling late twice shared --seeds 0 1

Prints one line per variant: distance Spearman / kNN(10). Sampling seed ``s`` of entry ``i``
is ``100 s + i``. A minute or two per checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch
from placement_ceilings import placement
from scipy.spatial import cKDTree
from torch import Tensor

import alphastomics.diffusion_model.sample as sample_module
from alphastomics.attn_model.local_attention import gather_cells
from alphastomics.data.batch import DataHolder
from alphastomics.data.store import ProcessedStore
from alphastomics.training.checkpoint import load_module

SHIPPED = sample_module.pull_to_neighbors
Pull = Callable[[Tensor, Tensor, Tensor, float], Tensor]


def _shared_weight_pull(positions: Tensor, index: Tensor, valid: Tensor, share: float) -> Tensor:
    near = gather_cells(positions, index)  # (B, N, k, D)
    squared = (near - positions.unsqueeze(2)).square().sum(-1)
    real = valid.to(positions.dtype)
    variance = (squared * real).sum((1, 2)) / real.sum((1, 2)).clamp(min=1)
    variance = variance.clamp(min=1e-30).view(-1, 1, 1)
    their = gather_cells(index.to(positions.dtype), index).long()  # (B, N, k, k)
    common = (their.unsqueeze(-1) == index.unsqueeze(2).unsqueeze(2)).any(-1).float().mean(-1)
    weight = torch.exp(-0.5 * squared / variance) * real * common
    total = weight.sum(2, keepdim=True)
    mean = (near * weight.unsqueeze(-1)).sum(2) / total.clamp(min=1e-30)
    return torch.where(total > 0, torch.lerp(positions, mean, share), positions)


def _nearest(positions: Tensor, k: int) -> np.ndarray:
    points = positions[0].double().numpy()  # one item, no padding (see place)
    return cKDTree(points).query(points, k + 1)[1][:, 1:]


def variant(name: str, n_steps: int) -> Pull:
    """The pull of variant ``name`` for a sample of ``n_steps`` steps (counts its own calls)."""
    calls = [0]

    def pull(positions: Tensor, index: Tensor, valid: Tensor, share: float) -> Tensor:
        step = calls[0] % n_steps
        calls[0] += 1
        fraction = step / max(n_steps - 1, 1)
        if name == "rising":
            return SHIPPED(positions, index, valid, 0.25 + 0.5 * fraction)
        if name == "falling":
            return SHIPPED(positions, index, valid, 0.75 - 0.5 * fraction)
        if name == "late":
            return SHIPPED(positions, index, valid, share if step < n_steps - 3 else 0.9)
        if name == "twice":
            return SHIPPED(SHIPPED(positions, index, valid, share), index, valid, share)
        if name == "shared":
            return _shared_weight_pull(positions, index, valid, share)
        if name == "beyond_spacing":
            move = SHIPPED(positions, index, valid, 1.0) - positions
            length = move.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            points = positions[0].double().numpy()
            spacing = float(cKDTree(points).query(points, 2)[0][:, 1].mean())
            return positions + share * move * (1 - spacing / length).clamp(min=0)
        if name == "overlap":
            alike, near = index[0].numpy(), _nearest(positions, index.shape[-1])
            common = np.mean([len(set(a) & set(b)) for a, b in zip(alike, near, strict=True)])
            return SHIPPED(positions, index, valid, share * max(0.0, 1 - common / index.shape[-1]))
        return SHIPPED(positions, index, valid, share)

    return pull


VARIANTS = ("default", "rising", "falling", "late", "twice", "shared", "beyond_spacing", "overlap")


def place(data_dir: str, checkpoint: str, names: Sequence[str], seeds: Sequence[int]) -> dict:
    """(distance Spearman, kNN(10)) of each variant, cell-weighted over the test entries."""
    store = ProcessedStore(data_dir)
    module = load_module(checkpoint)
    if module.cfg.sampling.consensus <= 0:
        raise SystemExit(f"{checkpoint} samples without the consensus; nothing to vary")
    steps = module.cfg.sampling.steps
    scores = {}
    for name in names:
        rows = []
        for i in store.slice_indices("test"):
            entry = store.load_slice(i)
            truth = np.asarray(entry.positions)
            holder = DataHolder.from_arrays(
                np.asarray(entry.expression), truth, gene_mask=np.asarray(entry.gene_mask)
            )
            for seed in seeds:
                sample_module.pull_to_neighbors = variant(name, steps)
                try:
                    generator = torch.Generator().manual_seed(100 * seed + i)
                    _, layout = module.predictor.sample(holder, "expr_to_pos", generator=generator)
                finally:
                    sample_module.pull_to_neighbors = SHIPPED
                rows.append((len(truth), placement(truth, layout[0].numpy())))
        weights = np.array([n for n, _ in rows], dtype=float)
        values = np.array([m for _, m in rows])
        scores[name] = tuple((weights[:, None] * values).sum(0) / weights.sum())
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="a preprocessed store with test entries")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    for name, (spearman, knn) in place(
        args.data_dir, args.checkpoint, args.variants, args.seeds
    ).items():
        print(f"{name:15s} {spearman:.4f} / {knn:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

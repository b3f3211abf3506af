"""Classifier-free guidance on the clean modality, at sampling time, on a trained checkpoint.

A joint model also learns the denoiser with both modalities noisy (the items that hold neither
clean), so guidance needs no retraining: at every reverse step the guided clean-data estimate of
the generated modality is ``cond + w * (cond - uncond)``, where ``uncond`` is the network's
estimate with the clean modality replaced by pure noise at time 1 (Ho & Salimans 2022). It costs
a second network evaluation per step. ``w = 0`` is the sampler as shipped.

Scores, per guidance weight ``w`` and averaged over the sampling seeds: ``expr_to_pos`` median
distance Spearman and kNN(10) preservation, ``pos_to_expr`` mean gene PCC of draws
(``expression_estimate="sample"``: guidance acts on the reverse process, not on the one-step
mean), cell-weighted over the store's test entries, scored by
:func:`alphastomics.evaluation.evaluate.score_slice`.

Usage (a store and a checkpoint of ``bench/real_data.py`` or the CLI)::

    python bench/guidance.py --data_dir runs/seqfish_s0/data \
        --checkpoint runs/seqfish_s0/run/checkpoints/last.ckpt --weights 0 0.25 0.5 1 --seeds 0 1 2

Prints one markdown table. About 5 s per slice, weight and seed for seqFISH on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from alphastomics.data.batch import center
from alphastomics.data.store import ProcessedStore
from alphastomics.evaluation.evaluate import score_slice
from alphastomics.training.checkpoint import load_module

COLUMNS = ("distance_spearman_median", "knn_preservation", "pcc_gene_mean")


class GuidedDenoiser(nn.Module):
    """The denoiser with guidance weight ``weight`` on whichever modality is clean.

    Calls with one modality clean (time 0) and the other noisy get the guided estimate of the
    noisy one; other calls (joint mode) pass through.
    """

    def __init__(self, denoiser: nn.Module, weight: float, seed: int = 0) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.weight = weight
        self.generator = torch.Generator().manual_seed(seed)

    def forward(
        self,
        expression: Tensor,
        positions: Tensor,
        t_expression: Tensor,
        t_position: Tensor,
        node_mask: Tensor,
        gene_mask: Tensor,
    ) -> object:
        out = self.denoiser(expression, positions, t_expression, t_position, node_mask, gene_mask)
        if self.weight == 0:
            return out
        ones = torch.ones_like(t_expression)
        if bool((t_expression == 0).all()) and bool((t_position > 0).all()):  # expr_to_pos
            noise = torch.randn(expression.shape, generator=self.generator)
            noise = noise * node_mask.unsqueeze(-1)
            free = self.denoiser(noise, positions, ones, t_position, node_mask, gene_mask)
            guided = out.positions + self.weight * (out.positions - free.positions)
            return dataclasses.replace(out, positions=guided)
        if bool((t_position == 0).all()) and bool((t_expression > 0).all()):  # pos_to_expr
            noise = center(torch.randn(positions.shape, generator=self.generator), node_mask)
            free = self.denoiser(expression, noise, t_expression, ones, node_mask, gene_mask)
            guided = out.expression + self.weight * (out.expression - free.expression)
            return dataclasses.replace(out, expression=guided)
        return out


def score_weight(
    store: ProcessedStore, module: nn.Module, weight: float, seeds: Sequence[int]
) -> dict[str, float]:
    """Cell-weighted test-entry scores at guidance ``weight``, averaged over ``seeds``."""
    predictor = module.predictor
    predictor.denoiser = GuidedDenoiser(module.model, weight)
    per_seed = []
    for seed in seeds:
        totals, cells = dict.fromkeys(COLUMNS, 0.0), 0
        for index in store.slice_indices("test"):
            part = store.load_slice(index, mmap=False)
            batch = part.batch()
            _, positions = predictor.sample(
                batch, "expr_to_pos", generator=torch.Generator().manual_seed(seed)
            )
            expression, _ = predictor.sample(
                batch,
                "pos_to_expr",
                generator=torch.Generator().manual_seed(seed),
                expression_estimate="sample",
            )
            scores = score_slice(
                part.expression,
                part.positions,
                part.gene_mask,
                predicted_positions=positions[0].numpy(),
                predicted_expression=expression[0].numpy(),
            )
            flat = scores["expr_to_pos"] | scores["pos_to_expr"]
            for name in COLUMNS:
                totals[name] += part.n_cells * float(flat[name])
            cells += part.n_cells
        per_seed.append({name: value / cells for name, value in totals.items()})
    return {name: float(np.mean([s[name] for s in per_seed])) for name in COLUMNS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", type=Path, required=True, help="processed store")
    parser.add_argument("--checkpoint", type=Path, required=True, help="trained joint model")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = ProcessedStore(args.data_dir)
    module = load_module(args.checkpoint)
    if module.cfg.training_mode != "joint":
        print(f"{args.checkpoint}: guidance needs a joint model", file=sys.stderr)
        return 2
    print("| guidance w | dist. Spearman | kNN(10) pres. | gene PCC (draws) |")
    print("|---|---|---|---|")
    for weight in args.weights:
        m = score_weight(store, module, weight, args.seeds)
        print(
            f"| {weight:g} | {m['distance_spearman_median']:.4f} | "
            f"{m['knn_preservation']:.4f} | {m['pcc_gene_mean']:.4f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

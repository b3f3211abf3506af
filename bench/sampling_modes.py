"""Compare ways of reading out a trained checkpoint on the test split of a processed store.

For each test slice: ``expr_to_pos`` from cold starts and SDEdit warm starts (distance Spearman
and kNN preservation), the one-step conditional-mean estimate of positions, and ``pos_to_expr``
as a single draw vs the conditional mean (mean gene PCC).

    python bench/sampling_modes.py --checkpoint RUN/checkpoints/last.ckpt --data_dir STORE \\
        --warm_starts 0 0.1 0.2 0.4 0.6 --steps 20
"""

from __future__ import annotations

import argparse

import torch

from alphastomics.data.batch import DataHolder
from alphastomics.data.store import ProcessedStore
from alphastomics.diffusion_model.sample import DiffusionSampler
from alphastomics.evaluation.metrics import expression_metrics, position_metrics
from alphastomics.training.checkpoint import load_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--warm_starts", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    module = load_module(args.checkpoint)
    store = ProcessedStore(args.data_dir)
    for index in store.slice_indices("test"):
        a = store.load_slice(index)
        holder = DataHolder.from_arrays(a.expression, a.positions, gene_mask=a.gene_mask)
        row: dict[str, str] = {}
        for warm in args.warm_starts:
            gen = torch.Generator().manual_seed(args.seed)
            _, pos = module.predictor.sample(
                holder, "expr_to_pos", steps=args.steps, generator=gen, warm_start=warm
            )
            pm = position_metrics(a.positions, pos[0].numpy())
            row[f"warm {warm}"] = (
                f"{pm['distance_spearman_median']:.3f} / {pm['knn_preservation']:.3f}"
            )
        gen = torch.Generator().manual_seed(args.seed)
        expr = module.scaler.standardize(holder.expression, holder.node_mask, holder.gene_mask)
        sampler = DiffusionSampler(module.model, module.noise_model)
        _, pos = sampler.predict_mean(
            expr, holder.positions, holder.node_mask, "expr_to_pos", generator=gen
        )
        pm = position_metrics(a.positions, pos[0].numpy())
        row["mean"] = f"{pm['distance_spearman_median']:.3f} / {pm['knn_preservation']:.3f}"
        for estimate in ("sample", "mean"):
            gen = torch.Generator().manual_seed(args.seed)
            e, _ = module.predictor.sample(
                holder,
                "pos_to_expr",
                steps=args.steps,
                generator=gen,
                expression_estimate=estimate,
            )
            em = expression_metrics(a.expression, e[0].numpy(), gene_mask=a.gene_mask)
            row[f"pos_to_expr {estimate} PCC"] = f"{em['pcc_gene_mean']:.3f}"
        name = store.metadata["slices"][index]["name"]
        print(f"{name} (expr_to_pos: distance Spearman / kNN preservation): {row}")


if __name__ == "__main__":
    main()

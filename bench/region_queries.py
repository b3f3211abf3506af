"""A region of one slice or volume held out and queried through ``alphastomics sample``.

What a user of registered coordinates does: train on one slice or volume without a region, then
ask for the expression at the region's coordinates (``pos_to_expr``) and for the place of its
cells from their expression (``expr_to_pos``), with the CLI and its defaults. This is the
protocol of issue 17's held-out checks (``sample`` on the held-out cells, scored by a script),
which ``bench/real_data.py`` does not follow: it scores the store's arrays, in the store's frame.

Steps (each a CLI command, its output in ``logs/``): the cells whose coordinate ``--axis`` is
ranked between the ``--region`` quantiles are written to ``inputs/region.h5ad``, the others to
``inputs/train.h5ad``; ``alphastomics preprocess`` (one slice: a random 10 % of its cells are
held out for validation, as by default) and ``alphastomics train`` with
``training.max_time_minutes`` = ``--budget_minutes`` (and any ``KEY=VALUE`` overrides); then
``alphastomics sample`` on ``region.h5ad`` in both modes. Scored on the region's cells against its own coordinates and expression:
gene PCC (``pos_to_expr``), distance Spearman and kNN(10) preservation (``expr_to_pos``);
beside the kNN spatial average and kNN regression (k = 10) fitted on ``train.h5ad``.
``pos_to_expr`` runs three times (:data:`POS_TO_EXPR_RUNS`): with the defaults, from positions
alone (``sampling.reference_cells=none``), and with the region read on its own
(``--frame own``: how ``sample`` read every input before it knew the training frame).

Usage::

    python bench/region_queries.py --h5ad ../shared/data/bdtnp_drosophila/bdtnp_drosophila.h5ad \\
        --position_key spatial --budget_minutes 4 --output_dir runs/region/bdtnp_s0
    python bench/region_queries.py ... --checkpoint runs/region/bdtnp_s0/run/checkpoints/last.ckpt

About ``--budget_minutes`` + 2 minutes (preprocess, two samples, scoring).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
from bench_common import (
    add_output_arguments,
    input_parser,
    run_cli,
    split_overrides,
    write_results,
)

from alphastomics.data.anndata import TARGET_SUM
from alphastomics.evaluation.baselines import KNNExpression, KNNPositions
from alphastomics.evaluation.metrics import expression_metrics, position_metrics
from alphastomics.keys import EXPRESSION, POSITIONS

K_BASELINES = 10  # neighbours of both kNN baselines
POS_TO_EXPR_RUNS = {  # name: extra `sample` words
    "defaults": [],
    "from_positions": ["sampling.reference_cells=none"],  # in the training frame
    "own_frame": ["--frame", "own"],  # from positions, the region centred and scaled on its own
}


def split_region(
    adata: ad.AnnData, position_key: str, axis: int, region: Sequence[float]
) -> tuple[ad.AnnData, ad.AnnData]:
    """(cells outside, cells inside) the ``region`` quantiles of coordinate ``axis``."""
    coordinate = np.asarray(adata.obsm[position_key])[:, axis]
    low, high = np.quantile(coordinate, region)
    inside = (coordinate >= low) & (coordinate <= high)
    return adata[~inside].copy(), adata[inside].copy()


def _expression(adata: ad.AnnData, normalization: str) -> np.ndarray:
    """(N, G) ``X`` as the model reads it: ``log1p`` = library size + log1p, as preprocess."""
    x = adata.X
    values = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
    if normalization == "log1p":
        library = values.sum(axis=1, keepdims=True)
        values = np.log1p(values * np.divide(TARGET_SUM, library, where=library > 0))
    return values.astype(np.float32)


def _sampled_expression(out: ad.AnnData, genes: list[str]) -> np.ndarray:
    frame = out.to_df(layer=EXPRESSION) if EXPRESSION in out.layers else out.obsm[EXPRESSION]
    return np.asarray(frame[genes], dtype=np.float32)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser, data = input_parser("region_queries.py", __doc__.splitlines()[0])
    data.add_argument("--axis", type=int, default=0, help="coordinate column of the region")
    data.add_argument(
        "--region", type=float, nargs=2, default=(0.4, 0.6), help="quantiles bounding it"
    )
    run_group = parser.add_argument_group("training and sampling")
    run_group.add_argument("--budget_minutes", type=float, default=4.0)
    run_group.add_argument("--checkpoint", type=Path, default=None, help="skip training")
    add_output_arguments(parser, "runs/region_queries")
    arguments, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(arguments)
    out = args.output_dir or Path("runs/region_queries")
    if out.exists() and any(out.iterdir()) and not args.overwrite and args.checkpoint is None:
        raise SystemExit(f"{out} is not empty; pass --overwrite or another --output_dir")
    inputs, logs = out / "inputs", out / "logs"  # logs: one file per command
    inputs.mkdir(parents=True, exist_ok=True)
    logs.mkdir(exist_ok=True)

    adata = ad.read_h5ad(args.h5ad)
    train, region = split_region(adata, args.position_key, args.axis, args.region)
    train.write_h5ad(inputs / "train.h5ad")
    region.write_h5ad(inputs / "region.h5ad")
    checkpoint = args.checkpoint
    steps = None
    train_seconds = 0.0
    if checkpoint is None:
        start = time.perf_counter()
        run_cli(
            [
                "preprocess",
                "--input",
                str(inputs / "train.h5ad"),
                "--position_key",
                args.position_key,
                "--test_fraction",
                "0",
                "--output_dir",
                str(out / "data"),
            ],
            logs / "preprocess.log",
        )
        run_cli(
            [
                "train",
                "--data_dir",
                str(out / "data"),
                "--output_dir",
                str(out / "run"),
                f"training.max_time_minutes={args.budget_minutes:g}",
                *overrides,
            ],
            logs / "train.log",
        )
        train_seconds = time.perf_counter() - start
        checkpoint = out / "run" / "checkpoints" / "last.ckpt"
        metrics = sorted((out / "run" / "logs").glob("*/metrics.csv"))
        if metrics:
            import pandas as pd

            steps = int(pd.read_csv(metrics[-1])["step"].max())

    genes = list(map(str, region.var_names))
    truth_positions = np.asarray(region.obsm[args.position_key], dtype=np.float64)
    rows: list[dict[str, Any]] = []

    def sample(mode: str, path: Path, words: Sequence[str] = ()) -> ad.AnnData:
        """``alphastomics sample`` of the region in ``mode`` to ``path``, read back."""
        argv = ["sample", "--checkpoint", str(checkpoint), "--input_data", str(region_h5ad)]
        command = [*argv, "--sample_mode", mode, "--output", str(path), "--overwrite", *words]
        run_cli(command, logs / f"{path.stem}.log")
        return ad.read_h5ad(path)

    region_h5ad = inputs / "region.h5ad"
    for name, words in POS_TO_EXPR_RUNS.items():
        sampled = sample("pos_to_expr", out / f"pos_to_expr_{name}.h5ad", words)
        normalization = str(sampled.uns["alphastomics"]["normalization"])
        truth_expression = _expression(region, normalization)
        scored = expression_metrics(truth_expression, _sampled_expression(sampled, genes))
        rows.append(
            {"method": f"model, sample {' '.join(words) or '(defaults)'}", "task": "pos_to_expr"}
            | scored
        )
    placed_cells = sample("expr_to_pos", out / "expr_to_pos.h5ad")
    placed = np.asarray(placed_cells.obsm[POSITIONS], dtype=np.float64)
    rows.append(
        {"method": "model", "task": "expr_to_pos"} | position_metrics(truth_positions, placed)
    )

    train_expression = _expression(train, normalization)
    train_positions = np.asarray(train.obsm[args.position_key], dtype=np.float64)
    average = KNNExpression(k=K_BASELINES).fit(train_positions, train_expression)
    rows.append(
        {"method": "kNN spatial average", "task": "pos_to_expr"}
        | expression_metrics(truth_expression, average.predict(truth_positions))
    )
    regression = KNNPositions(k=K_BASELINES).fit(train_expression, train_positions)
    rows.append(
        {"method": "kNN regression", "task": "expr_to_pos"}
        | position_metrics(truth_positions, regression.predict(truth_expression))
    )
    result = {
        "h5ad": str(args.h5ad),
        "axis": args.axis,
        "region": list(args.region),
        "n_train_cells": int(train.n_obs),
        "n_region_cells": int(region.n_obs),
        "checkpoint": str(checkpoint),
        "overrides": overrides,
        "optimizer_steps": steps,
        "train_seconds": train_seconds,
        "rows": rows,
    }
    write_results(out, json.loads(json.dumps(result, default=float)), _table(result))
    return result


def _table(result: dict[str, Any]) -> str:
    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        return "–" if value is None else f"{value:.3f}"

    lines = [
        f"# Region queries: `{result['h5ad']}`",
        "",
        f"- region: quantiles {result['region']} of axis {result['axis']}, "
        f"{result['n_region_cells']} cells; {result['n_train_cells']} cells to train on",
        f"- checkpoint: {result['checkpoint']}; optimiser steps: {result['optimizer_steps']}; "
        f"overrides: {result['overrides'] or 'none'}",
        "",
        "| method | task | gene PCC mean | dist. Spearman (median) | kNN(10) pres. |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['method']} | {row['task']} | {cell(row, 'pcc_gene_mean')} | "
            f"{cell(row, 'distance_spearman_median')} | {cell(row, 'knn_preservation')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from bench_common import main

    sys.exit(main(run, None))

"""How much better a checkpoint places the slices it was trained on than held-out ones.

For every training and test entry of a store, the checkpoint's one-step mean layout
(``expr_to_pos``, :meth:`Predictor.predict_mean`, one network evaluation, the same yardstick as
``bench/real_data.py``'s one-step row) is scored against the true positions. A model that
places its training slices far better than held-out ones has memorised its training cells (a
map from each cell's exact expression to its position) instead of learning how expression
relates to place; the gap shows how much a regulariser could win.

Usage (the store and checkpoint of a ``bench/real_data.py`` run)::

    python bench/memorisation.py --data_dir runs/final/seqfish_s0/data \\
        --checkpoint runs/final/seqfish_s0/run/checkpoints/last.ckpt

Prints one markdown table: a row per entry (split, cells, distance Spearman, kNN(10)
preservation) and the cell-weighted mean of each split. Seconds on CPU at seqFISH size.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from real_data import one_step_mean_scores

from alphastomics.data.store import ProcessedStore
from alphastomics.evaluation.metrics import summarize
from alphastomics.training.checkpoint import load_module

SPLITS = ("train", "test")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True, help="store written by `preprocess`")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint trained on that store")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prior draws")
    return parser


def score_entries(module: Any, store: ProcessedStore, seed: int) -> list[dict[str, Any]]:
    """One row per training and test entry: its one-step mean layout scored."""
    rows: list[dict[str, Any]] = []
    for split in SPLITS:
        for i in store.slice_indices(split):
            scores = one_step_mean_scores(module, store, i, seed + i)
            rows.append(
                {
                    "entry": store.metadata["slices"][i]["name"],
                    "split": split,
                    "cells": store.n_cells(i),
                    "spearman": scores["distance_spearman_median"],
                    "knn": scores["knn_preservation"],
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows and each split's cell-weighted mean as a markdown table."""
    lines = [
        "| entry | split | cells | dist. Spearman | kNN(10) pres. |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['entry']} | {row['split']} | {row['cells']} | "
            f"{row['spearman']:.3f} | {row['knn']:.3f} |"
        )
    for split in SPLITS:
        part = [row for row in rows if row["split"] == split]
        if not part:
            continue
        cells = [row["cells"] for row in part]
        scores = [{"spearman": row["spearman"], "knn": row["knn"]} for row in part]
        mean = summarize(scores, weights=cells)
        lines.append(
            f"| mean | {split} | {sum(cells)} | {mean['spearman']:.3f} | {mean['knn']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = load_module(args.checkpoint, map_location="cpu")
    module.eval()
    print(markdown(score_entries(module, ProcessedStore(args.data_dir), args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

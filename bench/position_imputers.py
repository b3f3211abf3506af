"""How far position-only imputers get on the test cells of a processed store (pos_to_expr).

A reference for the real-data table: the issue's kNN spatial average is one point in a family
of regressors from coordinates to expression, all fitted on the training entries and scored on
the test entries with the bench's mean gene PCC. It says what any such method reaches on a
split, and so how much a model can be expected to add. Optionally it also scores a checkpoint:
its conditional mean from positions alone, and its neighbour read-out among the training cells.

    python bench/position_imputers.py --data_dir runs/bench_bdtnp/data \\
        [--checkpoint runs/bench_bdtnp/run/checkpoints/last.ckpt]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.ensemble import ExtraTreesRegressor, RandomForestRegressor
from sklearn.kernel_ridge import KernelRidge
from sklearn.neighbors import KNeighborsRegressor

from alphastomics.data.batch import DataHolder
from alphastomics.data.store import ProcessedStore
from alphastomics.evaluation.metrics import expression_metrics

Imputer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Entries = tuple[np.ndarray, np.ndarray, np.ndarray]  # positions, expression, gene mask


def _sklearn(make: Callable[[], object]) -> Imputer:
    def impute(train_pos: np.ndarray, train_expr: np.ndarray, test_pos: np.ndarray) -> np.ndarray:
        mean = train_expr.mean(axis=0)
        model = make()
        model.fit(train_pos, train_expr - mean)  # type: ignore[attr-defined]
        return model.predict(test_pos) + mean  # type: ignore[attr-defined]

    return impute


IMPUTERS: dict[str, Imputer] = {
    "kNN average, k=5": _sklearn(lambda: KNeighborsRegressor(n_neighbors=5)),
    "kNN average, k=20, distance-weighted": _sklearn(
        lambda: KNeighborsRegressor(n_neighbors=20, weights="distance")
    ),
    "kernel ridge, RBF gamma=1, alpha=1": _sklearn(
        lambda: KernelRidge(alpha=1.0, kernel="rbf", gamma=1.0)
    ),
    "random forest, 300 trees, min leaf 3": _sklearn(
        lambda: RandomForestRegressor(300, min_samples_leaf=3, n_jobs=-1, random_state=0)
    ),
    "extra trees, 300 trees, min leaf 3": _sklearn(
        lambda: ExtraTreesRegressor(300, min_samples_leaf=3, n_jobs=-1, random_state=0)
    ),
}


def _concat(store: ProcessedStore, split: str) -> Entries:
    parts = [store.load_slice(i) for i in store.slice_indices(split)]  # type: ignore[arg-type]
    return (
        np.concatenate([np.asarray(p.positions) for p in parts]),
        np.concatenate([np.asarray(p.expression) for p in parts]),
        np.asarray(parts[0].gene_mask),
    )


def _model_rows(
    checkpoint: str, train: Entries, test: Entries
) -> dict[str, tuple[np.ndarray, float]]:
    """The checkpoint's two point estimates on the concatenated test entries, with seconds."""
    from alphastomics.training.checkpoint import load_module

    module = load_module(checkpoint).eval()
    (train_pos, train_expr, _), (test_pos, test_expr, gene_mask) = train, test
    rows = {}
    start = time.perf_counter()
    alone = DataHolder.from_arrays(test_expr, test_pos, gene_mask=gene_mask)
    generator = torch.Generator().manual_seed(0)
    expr, _ = module.predictor.sample(
        alone, "pos_to_expr", expression_estimate="mean", generator=generator
    )
    rows["model: conditional mean from positions alone"] = (
        expr[0].numpy(),
        time.perf_counter() - start,
    )
    if module.neighbor_readout is not None:
        start = time.perf_counter()
        both = DataHolder.from_arrays(
            np.concatenate([train_expr, test_expr]),
            np.concatenate([train_pos, test_pos]),
            gene_mask=gene_mask,
        )
        known = torch.zeros(1, len(train_pos) + len(test_pos), dtype=torch.bool)
        known[0, : len(train_pos)] = True
        expr, _ = module.predictor.sample(
            both, "pos_to_expr", known=known, expression_estimate="mean"
        )
        rows["model: neighbour read-out among the training cells"] = (
            expr[0, len(train_pos) :].numpy(),
            time.perf_counter() - start,
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data_dir", required=True, help="processed store (e.g. the bench's data/)"
    )
    parser.add_argument("--checkpoint", help="also score this checkpoint's point estimates")
    args = parser.parse_args(argv)
    store = ProcessedStore(args.data_dir)
    train, test = _concat(store, "train"), _concat(store, "test")
    (train_pos, train_expr, _), (test_pos, test_expr, gene_mask) = train, test
    print(f"{len(train_pos)} training cells, {len(test_pos)} test cells\n")
    print("| imputer | gene PCC mean | gene PCC median | seconds |\n| --- | --- | --- | --- |")
    predictions: dict[str, tuple[np.ndarray, float]] = {}
    for name, impute in IMPUTERS.items():
        start = time.perf_counter()
        pred = impute(train_pos, train_expr, test_pos)
        predictions[name] = (pred, time.perf_counter() - start)
    if args.checkpoint:
        predictions.update(_model_rows(args.checkpoint, train, test))
    for name, (pred, seconds) in predictions.items():
        scores = expression_metrics(test_expr, pred, gene_mask=gene_mask)
        print(
            f"| {name} | {scores['pcc_gene_mean']:.3f} | {scores['pcc_gene_median']:.3f} "
            f"| {seconds:.1f} |"
        )


if __name__ == "__main__":
    main()

"""How far the held-out cells' own data can take each metric: oracle references, not methods.

Each reference below uses what no method is given (the held-out slice's true positions or true
expression of the *other* held-out cells), so it bounds what a per-cell read-out of the same
information can score, and shows how demanding a target is:

- **cell types shuffled**: every cell takes the true position of a random cell of its own type
  (a perfect cell-type classifier with no finer information);
- **jitter σ**: the true layout plus Gaussian noise of standard deviation σ in store units (about
  1 = the slice's RMS radius; the median nearest-neighbour distance is printed);
- **same-slice expression kNN**: each cell placed at the mean true position of its 10 nearest
  cells in expression (PCA 30) *within its own slice* (a kNN regression whose reference is the
  held-out slice itself, so it does not suffer the shift between animals);
- **same-slice spatial kNN average** (``pos_to_expr``): each cell's expression predicted as the
  mean true expression of its 10 nearest other cells in the slice.

A second table shows how well layouts transfer between slices: the kNN regression baseline of
``bench/real_data.py`` (:class:`~alphastomics.evaluation.baselines.KNNPositions`, k = 10, PCA 50)
fitted on one slice alone (each training entry, and each other test entry: another plane of the
held-out animal, whose true positions no method is given) places every test entry.

Usage (a store written by ``alphastomics preprocess``, e.g. ``runs/bench_seqfish/data``)::

    python bench/placement_ceilings.py --data_dir runs/final/seqfish_s0/data

Prints two markdown tables: the oracle references (one column per test entry plus the
cell-weighted mean), then the transfer between slices. Seconds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from alphastomics.data.store import ProcessedStore
from alphastomics.evaluation.baselines import KNNPositions
from alphastomics.evaluation.evaluate import score_slice
from alphastomics.evaluation.metrics import position_metrics

JITTERS = (0.05, 0.1, 0.2)
K = 10


def placement(true: np.ndarray, layout: np.ndarray) -> tuple[float, float]:
    """(distance Spearman, kNN preservation) of ``layout`` (N, D) against ``true`` (N, D)."""
    m = position_metrics(true, layout)
    return m["distance_spearman_median"], m["knn_preservation"]


def references(
    expression: np.ndarray,
    positions: np.ndarray,
    cell_type: np.ndarray | None,
    gene_mask: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, tuple[float, ...]]:
    """(distance Spearman, kNN preservation) per placement reference, (gene PCC,) for the
    expression one, for one slice: ``expression`` (N, G), ``positions`` (N, D)."""
    out: dict[str, tuple[float, ...]] = {}

    def placed(name: str, layout: np.ndarray) -> None:
        out[name] = placement(positions, layout)

    if cell_type is not None:
        shuffled = positions.copy()
        for t in np.unique(cell_type):
            rows = np.flatnonzero(cell_type == t)
            shuffled[rows] = positions[rng.permutation(rows)]
        placed("cell types shuffled", shuffled)
    for sigma in JITTERS:
        placed(f"jitter σ={sigma}", positions + rng.normal(scale=sigma, size=positions.shape))
    features = PCA(min(30, *expression.shape), random_state=0).fit_transform(expression)
    _, near = NearestNeighbors(n_neighbors=K + 1).fit(features).kneighbors(features)
    placed("same-slice expression kNN", positions[near[:, 1:]].mean(axis=1))
    _, near = NearestNeighbors(n_neighbors=K + 1).fit(positions).kneighbors(positions)
    predicted = expression[near[:, 1:]].mean(axis=1)
    score = score_slice(expression, positions, gene_mask, predicted_expression=predicted)[
        "pos_to_expr"
    ]
    out["same-slice spatial kNN average"] = (score["pcc_gene_mean"],)
    return out


def transfer(
    store: ProcessedStore, sources: Sequence[int], targets: Sequence[int]
) -> dict[str, list[tuple[float, float] | None]]:
    """(distance Spearman, kNN preservation) of each ``targets`` entry placed by a kNN
    regression fitted on one ``sources`` entry alone; None where the two are the same."""
    loaded = {i: store.load_slice(i) for i in {*sources, *targets}}
    out: dict[str, list[tuple[float, float] | None]] = {}
    for r in sources:
        model = KNNPositions().fit(loaded[r].expression, loaded[r].positions)
        row: list[tuple[float, float] | None] = []
        for i in targets:
            if i == r:
                row.append(None)
                continue
            row.append(placement(loaded[i].positions, model.predict(loaded[i].expression)))
        out[store.metadata["slices"][r]["name"]] = row
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="a preprocessed store with test entries")
    parser.add_argument("--split", default="test", help="entries to score")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    store = ProcessedStore(args.data_dir)
    indices = store.slice_indices(args.split)
    if not indices:
        print(f"error: {args.data_dir} has no {args.split!r} entries", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    rows, weights, names = [], [], []
    for i in indices:
        arrays = store.load_slice(i)
        positions = np.asarray(arrays.positions, dtype=np.float64)
        cell_type = arrays.cell_type
        if cell_type is not None:
            cell_type = np.asarray(cell_type)
        expression = np.asarray(arrays.expression, dtype=np.float64)
        gene_mask = np.asarray(arrays.gene_mask, dtype=bool)
        distance, _ = NearestNeighbors(n_neighbors=2).fit(positions).kneighbors(positions)
        print(
            f"{store.metadata['slices'][i]['name']}: {len(positions)} cells, median nearest-"
            f"neighbour distance {np.median(distance[:, 1]):.3f} store units"
        )
        rows.append(references(expression, positions, cell_type, gene_mask, rng))
        weights.append(len(positions))
        names.append(store.metadata["slices"][i]["name"])
    print()
    print("| reference | " + " | ".join(names) + " | cell-weighted mean |")
    print("|---|" + "---|" * (len(names) + 1))
    w = np.asarray(weights, dtype=float) / sum(weights)
    for ref in rows[0]:
        values = np.array([r[ref] for r in rows])  # (slices, metrics)
        cells = [" / ".join(f"{v:.3f}" for v in row) for row in values]
        mean = " / ".join(f"{v:.3f}" for v in (w[:, None] * values).sum(axis=0))
        print(f"| {ref} | " + " | ".join(cells) + f" | {mean} |")
    print()
    print(
        "Placement rows: distance Spearman (median) / kNN(10) preservation; expression row: mean gene PCC."
    )
    print()
    print("| kNN regression fitted on one slice | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    sources = [*store.slice_indices("train"), *indices]
    for source, row in transfer(store, sources, indices).items():
        cells = ["–" if v is None else f"{v[0]:.3f} / {v[1]:.3f}" for v in row]
        print(f"| {source} | " + " | ".join(cells) + " |")
    print()
    print("Distance Spearman (median) / kNN(10) preservation of each test entry.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

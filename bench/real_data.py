"""Real-data benchmark: preprocess an .h5ad, train within a time budget, score the held-out
cells, and put the model beside simple baselines in one table.

Usage (from the repository root, virtual environment active)::

    # seqFISH mouse embryo: train on embryo1 + embryo2, score embryo3 (two z-planes)
    python bench/real_data.py --h5ad ../shared/data/seqfish_embryo/seqfish_embryo.h5ad \\
        --position_key spatial --cell_type_key cell_type \\
        --test_slices embryo3_z2 embryo3_z5 --val_slices embryo2_z5 \\
        --budget_minutes 20 --output_dir runs/bench_seqfish

    # BDTNP Drosophila embryo (one 3D slice): hold out a central slab of 20% of the cells
    # along the anterior-posterior axis x; 10% of the other cells validate
    python bench/real_data.py --h5ad ../shared/data/bdtnp_drosophila/bdtnp_drosophila.h5ad \\
        --position_key spatial --holdout_cells 0.2 --split_axis x \\
        --budget_minutes 10 --output_dir runs/bench_bdtnp

    # baselines only (seconds), an existing checkpoint, several sampling seeds, tiny model
    python bench/real_data.py ... --baselines_only
    python bench/real_data.py ... --checkpoint runs/x/checkpoints/best.ckpt --num_seeds 3
    python bench/real_data.py ... model.hidden_dim=16 model.n_layers=1 training.lr=0.002

Config overrides are ``KEY=VALUE`` words anywhere on the command line (any word with ``=``
that does not start with ``-``). The bench sets ``training.max_time_minutes`` from
``--budget_minutes`` and nothing else (with the default ``training.max_epochs: null`` the budget
is what stops training).

Held-out cells of a single slice (``--holdout_cells FRACTION``): the slice is preprocessed
whole, then its cells are split into ``<slice>/train``, ``<slice>/val`` and ``<slice>/test``
store entries that keep the slice's centre and scale, so held-out cells sit in the same
coordinate frame as the training cells ("placed among the rest"). ``--split_axis random``
holds out random cells; ``x``/``y``/``z`` hold out the contiguous slab of cells whose
coordinate on that axis is ranked around the ``--slab_center`` quantile (default: the middle
of the slice, so the slab has training cells on both sides). Validation cells are drawn at
random from the remaining cells (``--val_fraction``). Gene means and standard deviations are
recomputed on the training cells. On BDTNP, random cells and y/z slabs are nearly solved by
kNN regression (distance Spearman 0.99 to 1.00); the central x slab (anterior-posterior) is the
split where placing cells in unseen tissue matters (kNN regression about 0.83).

The model and every baseline are scored on the same arrays: the test entries of the store,
loaded by ``ProcessedStore.load_slice``; only held-out cells enter a metric. The model is
scored by ``alphastomics.workflows.test.run_evaluation`` (it samples each test entry
from its expression alone for ``expr_to_pos`` and from its positions for ``pos_to_expr``:
alone for a model of several slices, through the stored training cells around them for a model
of one slice, ``sampling.reference_cells``); the baselines by :func:`alphastomics.evaluation.baselines.evaluate_baselines`, fitted on
the training entries. When a single slice was split by cells, a second model row generates the
test cells among the training cells of their slice (``known`` = training cells): it places
them from their expression (inpainting) and imputes their expression at their positions (with
``sampling.expression_estimate: mean``, the model's learned neighbour read-out), with the
information the two kNN baselines use too. Position metrics are invariant to rotation, reflection, translation
and scale.

Outputs in ``--output_dir``: ``data/`` (the store), ``run/`` (training), ``model_eval/seed_<s>/``
(metrics.json + figures per sampling seed), ``baselines.json`` (written as soon as the
baselines are done), ``results.json`` and ``results.md`` (the table, also printed).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bench_common
import numpy as np
import torch
from bench_common import (
    add_output_arguments,
    add_sampling_arguments,
    input_parser,
    split_overrides,
    write_results,
)

from alphastomics.data.batch import DataHolder
from alphastomics.data.preprocess import GENE_STD_FLOOR, SpatialDataPreprocessor
from alphastomics.data.store import (
    ENTRY_ARRAYS,
    ProcessedStore,
    building_store,
    write_entry,
    write_metadata,
)
from alphastomics.data.units import to_user_units
from alphastomics.errors import UserInputError
from alphastomics.evaluation.baselines import BaselineResult, evaluate_baselines
from alphastomics.evaluation.evaluate import score_slice
from alphastomics.evaluation.metrics import summarize
from alphastomics.utils.io import atomic_write_json, check_output_dir

log = logging.getLogger("bench.real_data")

AXES = {"x": 0, "y": 1, "z": 2}
SPLIT_AXES = ("random", *AXES)
SEED_STRIDE = 1000  # sampling seed s uses seed + SEED_STRIDE * s (run_evaluation adds k per slice)

# Table columns: (metric key, header); positions, then expression
POSITION_COLUMNS = [
    ("distance_spearman_median", "dist. Spearman (median) ↑"),
    ("knn_preservation", "kNN pres. ↑"),
    ("procrustes_disparity", "Procrustes disp. ↓"),
]
EXPRESSION_COLUMNS = [
    ("pcc_gene_mean", "gene PCC mean ↑"),
    ("pcc_gene_median", "gene PCC median ↑"),
    ("morans_i_pearson", "Moran's I r ↑"),
    ("mse", "expr. MSE ↓"),
]


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``KEY=VALUE`` overrides are split off before it runs)."""
    parser, data = input_parser(
        "bench/real_data.py",
        "Preprocess an .h5ad, train AlphaSTomics within a time budget, score the held-out "
        "cells and compare with baselines (random / expression-PCA / kNN-regression "
        "positions; gene-mean / kNN expression). KEY=VALUE words are config overrides.",
    )
    data.add_argument("--layer", default=None, help="read adata.layers[LAYER] instead of X")
    data.add_argument(
        "--normalize", default="auto", choices=("auto", "log1p", "none"), help="as in preprocess"
    )
    data.add_argument("--test_slices", nargs="+", default=None, help="held-out slices")
    data.add_argument(
        "--val_slices", nargs="+", default=None, help="validation slices (default: none)"
    )
    data.add_argument(
        "--holdout_cells",
        type=float,
        default=None,
        metavar="FRACTION",
        help="data with one slice: hold out this share of its cells as the test set",
    )
    data.add_argument(
        "--split_axis",
        default="random",
        choices=SPLIT_AXES,
        help="with --holdout_cells: random cells, or a contiguous slab along this axis",
    )
    data.add_argument(
        "--slab_center",
        type=float,
        default=0.5,
        metavar="QUANTILE",
        help="with --split_axis x|y|z: quantile of the axis at the slab's centre",
    )
    data.add_argument(
        "--val_fraction",
        type=float,
        default=0.1,
        help="with --holdout_cells: share of the cells drawn at random for validation",
    )
    data.add_argument("--seed", type=int, default=0, help="split, baseline and sampling seed")

    run = parser.add_argument_group("model")
    run.add_argument(
        "--budget_minutes", type=float, default=10.0, help="training wall-clock budget"
    )
    run.add_argument("--config", type=Path, default=None, help="YAML config (then overrides)")
    add_sampling_arguments(run, held_out="cells", seeds_help="sampling seeds for the model")
    run.add_argument(
        "--baselines_only", action="store_true", help="skip the model: preprocess + baselines"
    )
    add_output_arguments(parser, "runs/bench_<stem>")
    return parser


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.holdout_cells is None and not args.test_slices:
        parser.error("pass --test_slices NAME ... (several slices) or --holdout_cells FRACTION")
    if args.holdout_cells is not None:
        if args.test_slices or args.val_slices:
            parser.error(
                "--holdout_cells splits one slice's cells; drop --test_slices/--val_slices"
            )
        if not 0.0 < args.holdout_cells < 1.0:
            parser.error(f"--holdout_cells must be in (0, 1); got {args.holdout_cells}")
        if not 0.0 <= args.val_fraction < 1.0 - args.holdout_cells:
            parser.error("--val_fraction must be >= 0 and leave training cells")
        if not 0.0 <= args.slab_center <= 1.0:
            parser.error(f"--slab_center must be in [0, 1]; got {args.slab_center}")
    if args.num_seeds < 1:
        parser.error("--num_seeds must be >= 1")
    if args.budget_minutes <= 0:
        parser.error("--budget_minutes must be > 0")


# --------------------------------------------------------------------------------------------
# Held-out cells of a single slice


def holdout_rows(
    positions: np.ndarray,
    fraction: float,
    *,
    axis: str = "random",
    slab_center: float = 0.5,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Split the cells of one slice into train / val / test rows (each sorted, int64).

    Parameters
    ----------
    positions
        (N, 3) coordinates of the slice's cells (any frame; only ranks along ``axis`` matter).
    fraction
        Share of cells held out for testing (``round(fraction * N)``, at least 2).
    axis
        ``"random"``: random cells. ``"x"``, ``"y"``, ``"z"``: the ``n_test`` cells ranked
        consecutively along that axis around the ``slab_center`` quantile (a slab).
    slab_center
        Quantile in [0, 1] of the slab's centre; the slab is shifted to stay inside the slice.
    val_fraction
        Share of all cells drawn at random from the non-test cells for validation.
    seed
        Seed of the random draws.
    """
    n = len(positions)
    n_test = max(2, round(fraction * n))
    n_val = max(2, round(val_fraction * n)) if val_fraction > 0 else 0
    if n - n_test - n_val < 2:
        raise UserInputError(
            f"{n} cells are too few to hold out {n_test} test and {n_val} validation cells"
        )
    rng = np.random.default_rng(seed)
    if axis == "random":
        test = rng.permutation(n)[:n_test]
    else:
        column = np.asarray(positions)[:, AXES[axis]]
        if np.ptp(column) == 0:
            raise UserInputError(
                f"all cells have the same {axis} coordinate; choose another --split_axis"
            )
        order = np.argsort(column, kind="stable")
        start = min(max(round(slab_center * n - n_test / 2), 0), n - n_test)
        test = order[start : start + n_test]
    rest = np.setdiff1d(np.arange(n), test)
    val = rng.choice(rest, size=n_val, replace=False)
    train = np.setdiff1d(rest, val)
    return {
        "train": np.sort(train).astype(np.int64),
        "val": np.sort(val).astype(np.int64),
        "test": np.sort(test).astype(np.int64),
    }


def split_single_slice_store(
    source: Path,
    target: Path,
    fraction: float,
    *,
    axis: str = "random",
    slab_center: float = 0.5,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``target``: the one-entry store ``source`` split by cells (:func:`holdout_rows`).

    Every part keeps the slice's centre and scale (positions are copied, not re-normalised),
    and ``gene_mean``/``gene_std`` are recomputed on the training cells. The store is built in
    a temporary sibling folder and renamed into place. Returns the new metadata.
    """
    store = ProcessedStore(source)
    metadata = store.metadata
    if len(metadata["slices"]) != 1:
        names = [s["slice"] for s in metadata["slices"]]
        raise UserInputError(
            f"--holdout_cells splits the cells of a single slice, but the data has "
            f"{len(names)} slices ({', '.join(sorted(set(names))[:5])}, ...); pass "
            "--test_slices instead"
        )
    entry = metadata["slices"][0]
    whole = store.load_slice(0, mmap=False)  # shapes checked against metadata.json
    arrays = {name: getattr(whole, name) for name in ENTRY_ARRAYS}
    positions = whole.positions
    parts = holdout_rows(
        positions,
        fraction,
        axis=axis,
        slab_center=slab_center,
        val_fraction=val_fraction,
        seed=seed,
    )
    slice_name = entry["slice"]

    new = copy.deepcopy(metadata)
    new["slices"] = []
    with building_store(target) as tmp:
        for split in ("train", "val", "test"):
            rows = parts[split]
            if not len(rows):
                continue
            k = len(new["slices"])
            path = write_entry(tmp, k, {name: values[rows] for name, values in arrays.items()})
            info = copy.deepcopy(entry)
            info.update(name=f"{slice_name}/{split}", split=split, n_cells=len(rows), path=path)
            new["slices"].append(info)
        mask = np.asarray(entry["gene_mask"], dtype=bool)
        train_expr = arrays["expression"][parts["train"]].astype(np.float64)
        mean = np.zeros(mask.shape)
        std = np.ones(mask.shape)
        mean[mask] = train_expr[:, mask].mean(axis=0)
        std[mask] = np.maximum(train_expr[:, mask].std(axis=0), GENE_STD_FLOOR)
        new["gene_mean"] = [float(v) for v in mean]
        new["gene_std"] = [float(v) for v in std]
        holdout: dict[str, Any] = {"fraction": fraction, "axis": axis, "val_fraction": val_fraction}
        if axis != "random":
            column = positions[parts["test"], AXES[axis]]
            ends = np.array([[column.min()], [column.max()]])  # (2, 1) scaled
            user = to_user_units(ends, [entry["center"][AXES[axis]]], float(entry["scale"]))
            holdout.update(
                slab_center=slab_center,
                slab_range_scaled=[float(column.min()), float(column.max())],
                slab_range_input_units=[float(v) for v in user[:, 0]],
            )
        new["split"] = {
            "by": "cells",
            "seed": seed,
            "method": "bench/real_data.py holdout_rows",
            "holdout": holdout,
            **{
                s: [e["name"] for e in new["slices"] if e["split"] == s]
                for s in ("train", "val", "test")
            },
        }
        write_metadata(tmp, new)
    return new


def preprocess(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    """Write the processed store of the benchmark split to ``data_dir`` (atomically)."""
    common = {
        "position_key": args.position_key,
        "slice_key": args.slice_key,
        "cell_type_key": args.cell_type_key,
        "layer": args.layer,
        "normalize": args.normalize,
        "seed": args.seed,
        "progress": False,
    }
    if args.holdout_cells is None:
        pre = SpatialDataPreprocessor(
            **common,
            test_slices=args.test_slices,
            val_slices=args.val_slices,
            val_fraction=0.0,  # validation only where asked for by name
            test_fraction=0.0,
        )
        return pre.preprocess_and_save([args.h5ad], data_dir, overwrite=True)
    whole = data_dir.parent / f".{data_dir.name}.whole-{uuid.uuid4().hex[:8]}"
    try:
        pre = SpatialDataPreprocessor(**common, val_fraction=0.0, test_fraction=0.0)
        pre.preprocess_and_save([args.h5ad], whole)
        return split_single_slice_store(
            whole,
            data_dir,
            args.holdout_cells,
            axis=args.split_axis,
            slab_center=args.slab_center,
            val_fraction=args.val_fraction,
            seed=args.seed,
        )
    finally:
        shutil.rmtree(whole, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Model


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def train_model(
    args: argparse.Namespace, overrides: list[str], data_dir: Path, run_dir: Path
) -> tuple[Path, float]:
    """Train within the budget; returns (checkpoint to score, training wall seconds)."""
    from alphastomics.config import load_config
    from alphastomics.workflows.train import run_training

    cfg = load_config(
        args.config,
        [f"training.max_time_minutes={args.budget_minutes}", *overrides],
    )
    start = time.perf_counter()
    run_training(cfg, data_dir, run_dir, overwrite=True, enable_progress_bar=False)
    seconds = time.perf_counter() - start
    # the final weights: the learning rate decays to the end of the time budget, and one
    # validation slice is too small to choose an earlier checkpoint reliably
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    return checkpoint, seconds


def evaluate_model(
    args: argparse.Namespace, module: Any, checkpoint: Path, data_dir: Path, eval_dir: Path
) -> dict[str, Any]:
    """Score ``module`` (loaded from ``checkpoint``) on the test entries with
    ``run_evaluation``, once per seed."""
    from alphastomics.workflows.test import run_evaluation

    runs = []
    for s in range(args.num_seeds):
        seed = args.seed + SEED_STRIDE * s
        runs.append(
            run_evaluation(
                module,
                data_dir,
                eval_dir / f"seed_{s}",
                split="test",
                sampler=args.sampler,
                steps=args.steps,
                seed=seed,
                checkpoint=str(checkpoint),
            )
        )
    modes = [m for m in ("expr_to_pos", "pos_to_expr") if m in runs[0]["overall"]]
    summary: dict[str, Any] = {}
    for mode in modes:
        names = [k for k, v in runs[0]["overall"][mode].items() if isinstance(v, int | float)]
        summary[mode] = {
            key: _mean_std([float(r["overall"][mode][key]) for r in runs]) for key in names
        }
    sampling_seconds = [
        sum(m.get(mode, {}).get("seconds", 0.0) for m in r["slices"].values() for mode in modes)
        for r in runs
    ]
    return {
        "checkpoint": str(checkpoint),
        "training_mode": module.cfg.training_mode,
        "sampler": runs[0]["sampler"],
        "steps": runs[0]["steps"],
        "seeds": [r["seed"] for r in runs],
        "overall": summary,
        "per_seed_overall": [r["overall"] for r in runs],
        "sampling_seconds": float(np.mean(sampling_seconds)),
        "eval_dirs": [str(eval_dir / f"seed_{s}") for s in range(args.num_seeds)],
    }


def one_step_mean_scores(module: Any, store: ProcessedStore, index: int, seed: int) -> dict:
    """``score_slice``'s ``expr_to_pos`` scores of store entry ``index`` placed by the model's
    one-step conditional mean (:meth:`Predictor.predict_mean`, prior draws seeded ``seed``)."""
    arrays = store.load_slice(index)
    positions = np.asarray(arrays.positions)
    holder = DataHolder.from_arrays(
        np.asarray(arrays.expression), positions, gene_mask=np.asarray(arrays.gene_mask)
    )
    generator = torch.Generator(device=module.device).manual_seed(seed)
    _, placed = module.predictor.predict_mean(holder, "expr_to_pos", generator=generator)
    predicted = placed[0].cpu().numpy()
    return score_slice(arrays.expression, positions, predicted_positions=predicted)["expr_to_pos"]


def evaluate_one_step_mean(
    args: argparse.Namespace, module: Any, checkpoint: Path, data_dir: Path
) -> dict[str, Any] | None:
    """Score the model's one-step conditional mean layout (``expr_to_pos``) on the test entries.

    The yardstick of the sampler: a per-cell point estimate from one network evaluation
    (:meth:`AlphaSTomicsModule.predict_mean`), scored like the sampled row. None for models
    that do not place cells.
    """
    if module.cfg.training_mode == "pos_to_expr":
        return None
    store = ProcessedStore(data_dir)
    start = time.perf_counter()
    indices = store.slice_indices("test")
    scores = [one_step_mean_scores(module, store, i, args.seed + i) for i in indices]
    summary = summarize(scores, weights=[store.n_cells(i) for i in indices])
    return {
        "checkpoint": str(checkpoint),
        "training_mode": module.cfg.training_mode,
        "sampler": "one-step mean",
        "steps": 1,
        "seeds": [args.seed],
        "overall": {
            "expr_to_pos": {
                k: {"mean": v, "std": 0.0} for k, v in summary.items() if isinstance(v, int | float)
            }
        },
        "sampling_seconds": time.perf_counter() - start,
    }


def evaluate_placement(
    args: argparse.Namespace, module: Any, checkpoint: Path, data_dir: Path
) -> dict[str, Any] | None:
    """Score each test entry's cells in the context of the training cells of its slice.

    Only for stores whose single slice was split by cells. The training cells are ``known``
    (both modalities clean) and the test cells are generated among them: ``expr_to_pos`` places
    them from their expression, ``pos_to_expr`` imputes their expression at their positions
    (the two kNN baselines use the training cells in the same way). Scored on the test cells
    only, with the same metrics as every other row. ``None`` for slice-level splits.
    """
    store = ProcessedStore(data_dir)
    meta = store.metadata
    if meta["split"]["by"] != "cells":
        return None
    scores: dict[str, list[dict[str, Any]]] = {"expr_to_pos": [], "pos_to_expr": []}
    weights: list[int] = []
    seconds = 0.0
    for s in range(args.num_seeds):
        for i in store.slice_indices("test"):
            source = meta["slices"][i].get("slice")
            refs = [
                j for j in store.slice_indices("train") if meta["slices"][j].get("slice") == source
            ]
            parts = [store.load_slice(j) for j in refs] + [store.load_slice(i)]
            n_ref = sum(len(p.positions) for p in parts[:-1])
            positions = np.concatenate([np.asarray(p.positions) for p in parts])
            expression = np.concatenate([np.asarray(p.expression) for p in parts])
            gene_mask = np.asarray(parts[-1].gene_mask)
            holder = DataHolder.from_arrays(expression, positions, gene_mask=gene_mask)
            known = torch.zeros(1, len(positions), dtype=torch.bool)
            known[0, :n_ref] = True
            generator = torch.Generator().manual_seed(args.seed + SEED_STRIDE * s + i)
            start = time.perf_counter()
            generated = {
                mode: module.predictor.sample(
                    holder,
                    mode,
                    sampler=args.sampler,
                    steps=args.steps,
                    generator=generator,
                    known=known,
                    expression_estimate=module.cfg.sampling.expression_estimate,
                )
                for mode in ("expr_to_pos", "pos_to_expr")
            }
            placed, imputed = generated["expr_to_pos"][1], generated["pos_to_expr"][0]
            seconds += time.perf_counter() - start
            scored = score_slice(
                expression,
                positions,
                gene_mask,
                predicted_positions=placed[0].cpu().numpy(),
                predicted_expression=imputed[0].cpu().numpy(),
                known=known[0].numpy(),
            )
            for mode, values in scored.items():
                scores[mode].append(values)
            weights.append(len(positions) - n_ref)
    overall = {}
    for mode, mode_scores in scores.items():
        summary = summarize(mode_scores, weights=weights)
        overall[mode] = {
            k: {"mean": v, "std": 0.0} for k, v in summary.items() if isinstance(v, int | float)
        }
    return {
        "checkpoint": str(checkpoint),
        "training_mode": module.cfg.training_mode,
        "sampler": args.sampler or module.cfg.sampling.sampler,
        "steps": args.steps or module.cfg.sampling.steps,
        "seeds": list(range(args.num_seeds)),
        "overall": overall,
        "sampling_seconds": seconds / args.num_seeds,
        "expression_readout": _placement_readout(module),
    }


def _placement_readout(module: Any) -> str:
    """How ``pos_to_expr`` among known cells is read out, for the table."""
    if module.predictor.imputes_from_neighbors:
        return f"pos_to_expr: neighbour read-out, k={module.cfg.neighbor_readout.n_neighbors}"
    return "pos_to_expr: inpainted draw"


def _mean_std(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite))}


# --------------------------------------------------------------------------------------------
# Table


def _cell(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("mean")
    if value is None or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _model_row(model: dict[str, Any], training_seconds: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "method": f"AlphaSTomics ({Path(model['checkpoint']).name})",
        "task": "+".join(model["overall"]) or "-",
        "params": f"{model['sampler']} {model['steps']} steps, {len(model['seeds'])} seed(s)"
        + (f"; {model['expression_readout']}" if model.get("expression_readout") else ""),
        "fit_seconds": training_seconds,
        "predict_seconds": model["sampling_seconds"],
        "std": {},
    }
    for mode, columns in (("expr_to_pos", POSITION_COLUMNS), ("pos_to_expr", EXPRESSION_COLUMNS)):
        scores = model["overall"].get(mode, {})
        for key, _ in columns:
            row[key] = _cell(scores.get(key))
            if key in scores and len(model["seeds"]) > 1:
                row["std"][key] = scores[key]["std"]
    return row


def _baseline_row(result: BaselineResult) -> dict[str, Any]:
    row: dict[str, Any] = {
        "method": result.name,
        "task": result.task,
        "params": ", ".join(f"{k}={v}" for k, v in result.params.items()),
        "fit_seconds": result.fit_seconds,
        "predict_seconds": result.predict_seconds,
        "std": {},
    }
    own = {
        key for key, _ in (POSITION_COLUMNS if result.task == "expr_to_pos" else EXPRESSION_COLUMNS)
    }
    for key, _ in POSITION_COLUMNS + EXPRESSION_COLUMNS:
        row[key] = _cell(result.overall.get(key)) if key in own else None
    return row


def _fmt(value: float | None, std: float | None = None, digits: int = 3) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if std is not None else text


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One markdown table: every row against every position and expression metric."""
    columns = POSITION_COLUMNS + EXPRESSION_COLUMNS
    header = ["method", "task", "settings", *(h for _, h in columns), "fit s", "predict s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], row["task"], row["params"] or "–"]
        cells += [_fmt(row[key], row["std"].get(key)) for key, _ in columns]
        cells += [_seconds(row["fit_seconds"]), _seconds(row["predict_seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_split(metadata: dict[str, Any]) -> str:
    """One line naming the train / val / test entries and their cell counts."""
    parts = []
    for split in ("train", "val", "test"):
        entries = [s for s in metadata["slices"] if s["split"] == split]
        names = ", ".join(f"{s['name']} ({s['n_cells']})" for s in entries) or "none"
        parts.append(f"{split}: {names}")
    holdout = metadata["split"].get("holdout")
    if holdout:
        kind = (
            "random cells"
            if holdout["axis"] == "random"
            else f"slab along {holdout['axis']} around quantile {holdout['slab_center']}"
            f" ({holdout['slab_range_input_units'][0]:.1f} to "
            f"{holdout['slab_range_input_units'][1]:.1f} input units)"
        )
        parts.append(f"held out: {holdout['fraction']:.0%} of the cells, {kind}")
    return "; ".join(parts)


def report_markdown(result: dict[str, Any]) -> str:
    """``results.md``: context lines, the table and notes."""
    lines = [
        f"# Real-data benchmark: `{result['h5ad']}`",
        "",
        f"- split: {result['split']}",
        f"- scored cells: {result['n_test_cells']} in {len(result['test_entries'])} test "
        "entries; model and baselines are scored on the same cells and coordinates "
        "(the store's per-slice normalised frame); metrics are cell-weighted over entries",
        f"- baselines fitted on {result['n_train_cells']} training cells",
    ]
    if result.get("model"):
        model = result["model"]
        lines.append(
            f"- model: {model['checkpoint']} ({model['training_mode']}), trained "
            f"{_seconds(result['training_seconds'])} s; sampling {model['sampler']}, "
            f"{model['steps']} steps, seeds {model['seeds']}"
        )
    lines += [
        "",
        markdown_table(result["rows"]),
        "",
        "Positions (expr_to_pos): median over cells of the Spearman correlation of true and "
        "predicted distance rows, share of the 10 nearest true neighbours kept, Procrustes "
        "disparity after similarity alignment. Expression (pos_to_expr): Pearson correlation "
        "across cells per gene (mean, median over genes), Pearson correlation across genes of "
        "true and predicted Moran's I, MSE. – : not applicable, or undefined (a constant "
        "prediction such as the gene training mean has no correlation). fit s: training / "
        "fitting wall time; predict s: sampling / prediction over the test entries.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what ``results.json`` holds."""
    parser = build_parser()
    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    _check_args(args, parser)
    if args.baselines_only and (args.checkpoint or overrides):
        parser.error("--baselines_only runs no model: drop --checkpoint and KEY=VALUE overrides")
    if args.checkpoint and (overrides or args.config):
        parser.error(
            "--checkpoint skips training, so --config and KEY=VALUE overrides would be ignored; "
            "drop them (choose sampling with --steps/--sampler)"
        )
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UserInputError(f"--checkpoint {args.checkpoint} does not exist")
    if not args.baselines_only and args.checkpoint is None:
        from alphastomics.config import load_config

        load_config(args.config, overrides)  # fail early on a bad config
    output_dir = args.output_dir or Path("runs") / f"bench_{args.h5ad.stem}"
    check_output_dir(output_dir, overwrite=args.overwrite)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, overrides, output_dir, list(sys.argv[1:] if argv is None else argv))
    except BaseException:
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()  # nothing was written: leave nothing behind
        raise


def _run(
    args: argparse.Namespace, overrides: list[str], output_dir: Path, argv: list[str]
) -> dict[str, Any]:
    for stale in ("model_eval", "baselines.json", "results.json", "results.md"):
        path = output_dir / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    data_dir = output_dir / "data"

    start = time.perf_counter()
    metadata = preprocess(args, data_dir)
    preprocess_seconds = time.perf_counter() - start
    split = describe_split(metadata)
    log.info("store %s; %s", data_dir, split)

    start = time.perf_counter()
    baselines = evaluate_baselines(data_dir, seed=args.seed)
    log.info("baselines scored in %.1f s", time.perf_counter() - start)
    store = ProcessedStore(data_dir)
    test_entries = store.slice_names("test")
    result: dict[str, Any] = {
        "h5ad": str(args.h5ad),
        "command": ["bench/real_data.py", *argv],
        "split": split,
        "store": str(data_dir),
        "test_entries": test_entries,
        "n_test_cells": sum(store.n_cells(i) for i in store.slice_indices("test")),
        "n_train_cells": sum(store.n_cells(i) for i in store.slice_indices("train")),
        "preprocess_seconds": preprocess_seconds,
        "baselines": [b.to_dict() for b in baselines],
    }
    atomic_write_json(output_dir / "baselines.json", result)

    model = None
    training_seconds = None
    if not args.baselines_only:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint, training_seconds = train_model(
                args, overrides, data_dir, output_dir / "run"
            )
        from alphastomics.training.checkpoint import load_module

        module = load_module(checkpoint, map_location=_device(args.device))
        model = evaluate_model(args, module, checkpoint, data_dir, output_dir / "model_eval")
        placement = evaluate_placement(args, module, checkpoint, data_dir)
        result["placement"] = placement
        result["one_step_mean"] = evaluate_one_step_mean(args, module, checkpoint, data_dir)
    rows = [_baseline_row(b) for b in baselines]
    if model is not None:
        rows.insert(0, _model_row(model, training_seconds))
        if result.get("placement"):
            row = _model_row(result["placement"], training_seconds)
            row["method"] += ", among the training cells"
            rows.insert(1, row)
        if result.get("one_step_mean"):
            row = _model_row(result["one_step_mean"], training_seconds)
            row["method"] += ", one-step mean (no sampling)"
            row["params"] = "predict_mean: E[positions given expression], 4 prior draws"
            rows.insert(2 if result.get("placement") else 1, row)
    result.update(
        model=model, training_seconds=training_seconds, budget_minutes=args.budget_minutes
    )
    result["rows"] = rows
    write_results(output_dir, result, report_markdown(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: a problem with the input is one line on stderr and exit status 2."""
    return bench_common.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())

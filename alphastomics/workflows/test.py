"""`test`: sample the held-out slices of a processed store and score them against the truth."""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alphastomics.data.store import ProcessedStore, StoreSlice
from alphastomics.data.units import to_model_units, to_user_units
from alphastomics.diffusion_model.diffusion_utils import sample_centered_gaussian
from alphastomics.errors import UserInputError
from alphastomics.evaluation.evaluate import score_positions, score_slice
from alphastomics.evaluation.figures import MODE_TITLES, plot_genes, plot_layouts
from alphastomics.evaluation.metrics import (
    expression_metrics,
    summarize,
)
from alphastomics.training.module import AlphaSTomicsModule
from alphastomics.utils.io import json_text, staged_outputs

log = logging.getLogger(__name__)


def _cell_type_names(codes: np.ndarray, names: list[str]) -> np.ndarray | None:
    if not names or (codes < 0).all():
        return None
    return np.array([names[c] if c >= 0 else "unknown" for c in codes], dtype=object)


def evaluate_slice(
    module: AlphaSTomicsModule,
    arrays: StoreSlice,
    *,
    sampler: str | None,
    steps: int | None,
    generator: torch.Generator,
    cell_type_names: list[str],
    in_training_frame: bool = False,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Sample one slice in every conditional mode the model was trained for and score it.

    ``in_training_frame``: the slice's positions are in the frame of the model's reference
    cells (``pos_to_expr`` may read them). Returns the metrics and the predictions
    (``positions`` (N, 3), ``expression`` (N, G)).
    """
    expr_true = np.asarray(arrays.expression, dtype=np.float32)
    pos_true = np.asarray(arrays.positions, dtype=np.float32)
    gene_mask = np.asarray(arrays.gene_mask, dtype=bool)
    holder = arrays.batch()
    mode = module.cfg.training_mode
    metrics: dict[str, Any] = {"n_cells": int(expr_true.shape[0])}
    predictions: dict[str, np.ndarray] = {}
    labels = arrays.cell_type
    if mode in ("joint", "expr_to_pos"):
        start = time.perf_counter()
        _, pos = module.predictor.sample(
            holder, "expr_to_pos", sampler=sampler, steps=steps, generator=generator
        )
        pos_pred = pos[0].cpu().numpy()
        predictions["positions"] = pos_pred
        metrics |= score_slice(expr_true, pos_true, gene_mask, predicted_positions=pos_pred)
        metrics["expr_to_pos"]["seconds"] = time.perf_counter() - start
        random_pos = sample_centered_gaussian(
            holder.positions.shape, holder.node_mask, generator=generator
        )
        metrics["baseline_random_positions"] = score_positions(pos_true, random_pos[0].numpy())
    if mode in ("joint", "pos_to_expr"):
        start = time.perf_counter()
        estimate = module.cfg.sampling.expression_estimate
        expr, _ = module.predictor.sample(
            holder,
            "pos_to_expr",
            sampler=sampler,
            steps=steps,
            generator=generator,
            expression_estimate=estimate,
            in_training_frame=in_training_frame,
        )
        expr_pred = expr[0].cpu().numpy()
        predictions["expression"] = expr_pred
        scores = score_slice(
            expr_true, pos_true, gene_mask, predicted_expression=expr_pred, cell_types=labels
        )["pos_to_expr"]
        scores["seconds"] = time.perf_counter() - start
        scores["estimate"] = estimate
        scores["expression_from"] = module.predictor.expression_source(in_training_frame)
        metrics["pos_to_expr"] = scores
        mean_expr = np.broadcast_to(module.scaler.mean.cpu().numpy(), expr_true.shape)
        metrics["baseline_mean_expression"] = expression_metrics(
            expr_true, mean_expr, gene_mask=gene_mask
        )
    return metrics, predictions


def _read_in_training_frame(
    module: AlphaSTomicsModule, entry: dict[str, Any], arrays: StoreSlice
) -> StoreSlice | None:
    """A store entry re-read in the training frame of a model of one slice or volume, when its
    coordinates lie within it (as ``sample --frame auto`` reads a file); None otherwise.

    A cell-split part of the training slice is in that frame already; a slice preprocessed
    beside it (a held-out block given as a file of its own) was centred and scaled on its own.
    """
    frame = module.data_info.training_frame
    if frame is None:
        return None
    user = to_user_units(np.asarray(arrays.positions), entry["center"], entry["scale"])
    if not frame.holds(user):
        return None
    return dataclasses.replace(arrays, positions=to_model_units(user, frame.center, frame.scale))


def run_evaluation(
    module: AlphaSTomicsModule,
    data_dir: str | Path,
    output_dir: str | Path,
    *,
    split: str = "test",
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Sample every slice of ``split``, write ``metrics.json`` and PNG figures to ``output_dir``."""
    store = ProcessedStore(data_dir)
    indices = store.slice_indices(split)
    if not indices:
        raise UserInputError(
            f"{data_dir} has no {split!r} slices; preprocess with --test_slices/--test_fraction or "
            "pass --split val/train"
        )
    check_store_genes(module, store.metadata["genes"], data_dir)
    output_dir = Path(output_dir)
    names = store.metadata.get("cell_types", [])
    genes = store.metadata["genes"]
    per_slice: dict[str, Any] = {}
    with staged_outputs() as stage:  # every figure and metrics.json, or nothing
        for k, index in enumerate(indices):
            arrays = store.load_slice(index)
            reframed = _read_in_training_frame(module, store.metadata["slices"][index], arrays)
            arrays = arrays if reframed is None else reframed
            name = store.metadata["slices"][index]["name"]
            generator = torch.Generator(device=module.device).manual_seed(seed + k)
            metrics, pred = evaluate_slice(
                module,
                arrays,
                sampler=sampler,
                steps=steps,
                generator=generator,
                cell_type_names=names,
                in_training_frame=reframed is not None,
            )
            metrics["frame"] = "own" if reframed is None else "training"
            per_slice[name] = metrics
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            labels = _cell_type_names(np.asarray(arrays.cell_type), names)
            positions = np.asarray(arrays.positions)
            if "positions" in pred:  # each figure: a function of the path it is written to
                layout = partial(
                    plot_layouts,
                    positions,
                    pred["positions"],
                    cell_types=labels,
                    title=f"{name}: {MODE_TITLES['expr_to_pos']}",
                )
                stage.write(output_dir / f"layout_{safe}.png", layout)
            if "expression" in pred:
                panels = partial(
                    plot_genes,
                    positions,
                    np.asarray(arrays.expression),
                    pred["expression"],
                    genes,
                    gene_mask=np.asarray(arrays.gene_mask, dtype=bool),
                    title=f"{name}: {MODE_TITLES['pos_to_expr']}",
                )
                stage.write(output_dir / f"genes_{safe}.png", panels)
            log.info("scored %s (%d cells)", name, metrics["n_cells"])
        result = _result(per_slice, split, checkpoint, sampler, steps, seed, module)
        stage.write(output_dir / "metrics.json", lambda tmp: tmp.write_text(json_text(result)))
    return result


def _result(
    per_slice: dict[str, Any],
    split: str,
    checkpoint: str | None,
    sampler: str | None,
    steps: int | None,
    seed: int,
    module: AlphaSTomicsModule,
) -> dict[str, Any]:
    """metrics.json: per-slice metrics and their cell-weighted ``overall`` summary."""
    overall = {
        key: summarize(
            [m[key] for m in per_slice.values()], weights=[m["n_cells"] for m in per_slice.values()]
        )
        for key in next(iter(per_slice.values()))
        if isinstance(next(iter(per_slice.values()))[key], dict)
    }
    return {
        "split": split,
        "checkpoint": checkpoint,
        "sampler": sampler or module.cfg.sampling.sampler,
        "steps": steps or module.cfg.sampling.steps,
        "seed": seed,
        "sampling_overrides": list(module.sampling_overrides),
        "units": "positions in the store's scaled units; expression log-normalised",
        "slices": per_slice,
        "overall": overall,
    }


# (mode, metric, its name, baseline block, the baseline's name, higher is better)
_HEADLINES = (
    (
        "expr_to_pos",
        "distance_spearman_median",
        "median distance Spearman",
        "baseline_random_positions",
        "random positions",
        True,
    ),
    (
        "expr_to_pos",
        "knn_preservation",
        "kNN preservation",
        "baseline_random_positions",
        "random positions",
        True,
    ),
    ("pos_to_expr", "pcc_gene_mean", "mean gene Pearson r", None, "a constant", True),
    (
        "pos_to_expr",
        "mse",
        "expression MSE",
        "baseline_mean_expression",
        "training mean per gene",
        False,
    ),
)


def summary_lines(overall: dict[str, Any]) -> list[str]:
    """One line per headline metric of ``overall``, each beside its baseline."""
    lines = []
    for mode, key, label, block, baseline_name, higher in _HEADLINES:
        value = overall.get(mode, {}).get(key)
        if value is None:
            continue
        baseline = 0.0 if block is None else overall.get(block, {}).get(key)
        text = f"{mode}: {label} {value:.3f} ({baseline_name}: "
        if baseline is None or not np.isfinite(baseline):
            lines.append(text + "n/a)")
            continue
        worse = value < baseline if higher else value > baseline
        lines.append(text + f"{baseline:.3f}{'; the model is worse' if worse else ''})")
    return lines


def check_store_genes(module: AlphaSTomicsModule, genes: list[str], source: str | Path) -> None:
    """A store must have exactly the checkpoint's gene list (its arrays are in that order)."""
    model_genes = module.hparams.get("gene_names")
    if model_genes is not None and list(model_genes) != list(genes):
        shared = len(set(model_genes) & set(genes))
        order = " (same genes, another order)" if shared == len(genes) == len(model_genes) else ""
        raise UserInputError(
            f"{source} was preprocessed with a different gene list than the checkpoint: "
            f"{shared} of the checkpoint's {len(model_genes)} genes are among the store's "
            f"{len(genes)}{order}; preprocess with --gene_list_file listing the checkpoint's "
            "genes (missing ones are masked), or use `sample` on an .h5ad, which matches genes "
            "by name"
        )

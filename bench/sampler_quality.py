"""Held-out quality and wall time of the samplers: ancestral DDPM (all T steps) vs few-step DDIM.

For every held-out slice and every seed, each sampler configuration samples

- ``expr_to_pos`` (positions from expression), scored by the median per-cell distance Spearman
  (``position_metrics(...)["distance_spearman_median"]``, LUNA's headline metric) and by
  kNN(10) preservation (``knn_preservation``, local structure), and
- ``pos_to_expr`` (expression from positions) as a *draw* from the reverse process
  (``expression_estimate="sample"``; the shipped default ``mean`` is the sampler-independent
  one-step conditional mean and is reported as a separate reference row), scored by the mean
  per-gene Pearson correlation (``expression_metrics(...)["pcc_gene_mean"]``).

Settings: DDPM over all T steps, then DDIM for every ``--grid_powers`` spacing (``sampling.grid_power``), ``--etas`` value (0 = deterministic,
1 = ancestral-like noise), ``--warm_starts`` value (``sampling.warm_start``), ``--consensus``
share and ``--consensus_neighbors`` count (``sampling.consensus*``, ``expr_to_pos`` only; by
default the checkpoint's) and ``--ddim_steps`` count. Several seeds separate sampler differences from sampling noise: the table
gives, per setting, the mean over seeds (each seed's value is the cell-weighted mean over
slices), the standard deviation across seeds, the gap to DDPM in percent, and the wall time per
slice. On a shared machine use ``--threads 1`` (see docs/benchmarks.md).

Data and model: by default the demo tissue (``synthetic_tissue``, preprocessed with one test and
one validation slice) and a short training run of the default model (``--minutes``); or
``--data_dir`` (any processed store) with ``--checkpoint`` to reuse a trained model.

Usage::

    python bench/sampler_quality.py --threads 1 --seeds 0 1 2 3       # demo tissue, 6 min train
    python bench/sampler_quality.py --data_dir runs/seqfish_data \\
        --checkpoint runs/seqfish/checkpoints/best.ckpt --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alphastomics.config import load_config
from alphastomics.data.batch import DataHolder
from alphastomics.data.preprocess import SpatialDataPreprocessor
from alphastomics.data.store import ProcessedStore
from alphastomics.data.synthetic import synthetic_tissue
from alphastomics.evaluation.metrics import expression_metrics, position_metrics
from alphastomics.training.checkpoint import load_module
from alphastomics.training.module import AlphaSTomicsModule
from alphastomics.workflows.train import run_training

METRICS = {
    "expr_to_pos": ("distance_spearman_median", "knn_preservation"),
    "pos_to_expr": ("pcc_gene_mean",),
}


def make_demo_store(out: Path, *, n_cells: int, n_genes: int, n_slices: int, seed: int) -> Path:
    """Generate the demo tissue and preprocess it (last slice test, second-to-last validation)."""
    adata = synthetic_tissue(n_cells=n_cells, n_genes=n_genes, n_slices=n_slices, seed=seed)
    tissue = out / "tissue.h5ad"
    adata.write_h5ad(tissue)
    names = sorted(adata.obs["slice"].unique())
    store = out / "store"
    SpatialDataPreprocessor(
        position_key="ccf",
        slice_key="slice",
        cell_type_key="cell_type",
        test_slices=[names[-1]],
        val_slices=[names[-2]],
        seed=seed,
    ).preprocess_and_save([tissue], store, overwrite=True)
    return store


def train_model(store: Path, run_dir: Path, overrides: list[str]) -> AlphaSTomicsModule:
    """Train on ``store`` with the default config plus ``overrides``; returns the last weights."""
    cfg = load_config(overrides=overrides)
    module = run_training(cfg, store, run_dir, overwrite=True, enable_progress_bar=False)
    return module.eval()


@dataclasses.dataclass(frozen=True)
class Setting:
    """One sampler configuration: ``sampler`` in {ddpm, ddim, mean}, steps, eta, warm start."""

    sampler: str
    steps: int
    eta: float = 0.0
    warm_start: float = 0.0
    grid_power: float = 4.0
    consensus: float | None = None  # sampling.consensus; None = the checkpoint's
    consensus_neighbors: int | None = None  # sampling.consensus_neighbors; None = the checkpoint's

    @property
    def evaluations(self) -> int:
        """Network evaluations per sample (a warm start adds one for the mean estimate)."""
        if self.sampler == "mean":
            return self.steps
        if self.warm_start > 0:
            top = max(1, round(self.warm_start * self.steps_total))
            return (top if self.sampler == "ddpm" else min(self.steps, top)) + 1
        return self.steps

    steps_total: int = 1000  # T, for the warm-start count

    @property
    def label(self) -> str:
        """Short name for the table."""
        if self.sampler == "mean":
            return "mean (1 step)"
        if self.sampler == "ddpm":
            return "ddpm"
        name = f"{self.sampler} eta={self.eta:g} p={self.grid_power:g}"
        if self.consensus is not None:
            name += f" c={self.consensus:g}"
        if self.consensus_neighbors is not None:
            name += f" k={self.consensus_neighbors}"
        return name + (f" ws={self.warm_start:g}" if self.warm_start > 0 else "")


def configurations(
    ddim_steps: list[int],
    etas: list[float],
    warm_starts: list[float],
    with_ddpm: bool,
    T: int,
    grid_powers: tuple[float, ...] = (4.0,),
    consensus: tuple[float | None, ...] = (None,),
    consensus_neighbors: tuple[int | None, ...] = (None,),
) -> list[Setting]:
    """Settings to compare: DDPM over all T steps, then DDIM per warm start, grid spacing, eta,
    consensus share, consensus neighbours and step count (None: the checkpoint's value)."""
    configs = [Setting("ddpm", T, steps_total=T)] if with_ddpm else []
    for warm, power, eta, share, k in itertools.product(
        warm_starts, grid_powers, etas, consensus, consensus_neighbors
    ):
        configs += [
            Setting("ddim", s, eta, warm, power, share, k, steps_total=T)
            for s in ddim_steps
            if 1 <= s <= T
        ]
    return configs


def score_slice(
    module: AlphaSTomicsModule, holder: DataHolder, mode: str, setting: Setting, seed: int
) -> tuple[dict[str, float], float]:
    """Sample one slice in ``mode`` with ``setting``; returns ({metric: value}, seconds)."""
    generator = torch.Generator().manual_seed(seed)
    sampling = dataclasses.replace(
        module.cfg.sampling, eta=setting.eta, grid_power=setting.grid_power
    )
    if setting.consensus is not None:
        sampling = dataclasses.replace(sampling, consensus=setting.consensus)
    if setting.consensus_neighbors is not None:
        sampling = dataclasses.replace(sampling, consensus_neighbors=setting.consensus_neighbors)
    module.cfg = dataclasses.replace(
        module.cfg, sampling=sampling
    )  # module.predictor.sample reads these
    start = time.perf_counter()
    expr, pos = module.predictor.sample(
        holder,
        mode,  # type: ignore[arg-type]
        sampler="ddim" if setting.sampler == "mean" else setting.sampler,  # type: ignore[arg-type]
        steps=setting.steps,
        generator=generator,
        expression_estimate="mean" if setting.sampler == "mean" else "sample",
        warm_start=setting.warm_start,
    )
    seconds = time.perf_counter() - start
    if mode == "expr_to_pos":
        truth = holder.positions[0].numpy()
        scores = position_metrics(truth, pos[0].cpu().numpy())
    else:
        truth = holder.expression[0].numpy()
        scores = expression_metrics(
            truth, expr[0].cpu().numpy(), gene_mask=holder.gene_mask[0].numpy()
        )
    return {name: float(scores[name]) for name in METRICS[mode]}, seconds


def run_benchmark(
    module: AlphaSTomicsModule,
    store_dir: Path,
    *,
    split: str,
    seeds: list[int],
    ddim_steps: list[int],
    etas: list[float],
    warm_starts: list[float],
    with_ddpm: bool,
    modes: list[str],
    grid_powers: tuple[float, ...] = (4.0,),
    consensus: tuple[float | None, ...] = (None,),
    consensus_neighbors: tuple[int | None, ...] = (None,),
) -> list[dict[str, Any]]:
    """Score every configuration on every slice of ``split`` for every seed."""
    store = ProcessedStore(store_dir)
    holders, weights = [], []
    for index in store.slice_indices(split):
        data = store.load_slice(index, mmap=False)
        holders.append(
            DataHolder.from_arrays(
                np.asarray(data.expression), np.asarray(data.positions), gene_mask=data.gene_mask
            )
        )
        weights.append(holders[-1].expression.shape[1])
    if not holders:
        raise SystemExit(f"{store_dir} has no {split!r} slices")
    T = module.noise_model.T
    rows: list[dict[str, Any]] = []
    for mode in modes:
        runs = configurations(
            ddim_steps,
            etas,
            warm_starts,
            with_ddpm,
            T,
            tuple(grid_powers),
            tuple(consensus) if mode == "expr_to_pos" else (None,),
            tuple(consensus_neighbors) if mode == "expr_to_pos" else (None,),
        )
        if mode == "pos_to_expr":
            runs.append(Setting("mean", 4, steps_total=T))  # one-step mean, 4 prior draws
        for setting in runs:
            per_seed: dict[str, list[float]] = {name: [] for name in METRICS[mode]}
            seconds = []
            for seed in seeds:
                values: dict[str, list[float]] = {name: [] for name in METRICS[mode]}
                for k, holder in enumerate(holders):
                    scores, secs = score_slice(module, holder, mode, setting, 1000 * seed + k)
                    for name, value in scores.items():
                        values[name].append(value)
                    seconds.append(secs)
                for name in METRICS[mode]:
                    per_seed[name].append(float(np.average(values[name], weights=weights)))
            for name in METRICS[mode]:
                row = {
                    "mode": mode,
                    "metric": name,
                    "sampler": setting.sampler,
                    "label": setting.label,
                    "steps": setting.steps,
                    "eta": setting.eta,
                    "warm_start": setting.warm_start,
                    "grid_power": setting.grid_power,
                    "consensus": setting.consensus,
                    "consensus_neighbors": setting.consensus_neighbors,
                    "evaluations": setting.evaluations,
                    "mean": statistics.fmean(per_seed[name]),
                    "sd": statistics.stdev(per_seed[name]) if len(seeds) > 1 else math.nan,
                    "per_seed": per_seed[name],
                    "seconds_per_slice": statistics.fmean(seconds),
                }
                rows.append(row)
                print(_format_row(row, rows), flush=True)
    return rows


def _reference(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in rows
            if r["mode"] == row["mode"] and r["metric"] == row["metric"] and r["sampler"] == "ddpm"
        ),
        None,
    )


def _gap_percent(row: dict[str, Any], rows: list[dict[str, Any]]) -> float:
    ref = _reference(row, rows)
    if ref is None or ref["mean"] == 0:
        return math.nan
    return 100.0 * (row["mean"] - ref["mean"]) / abs(ref["mean"])


def _format_row(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    return (
        f"{row['mode']:<12} {row['metric']:<25} {row['label']:<20} {row['evaluations']:>6} "
        f"{row['mean']:>8.4f} "
        f"{row['sd']:>8.4f} {_gap_percent(row, rows):>+9.2f} {row['seconds_per_slice']:>9.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    """Build or load data and model, run every sampler configuration, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, default=None, help="processed store to use")
    parser.add_argument("--checkpoint", type=Path, default=None, help="trained model to use")
    parser.add_argument("--split", default="test")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--ddim_steps", type=int, nargs="+", default=[10, 20, 50, 100], help="few-step counts"
    )
    parser.add_argument(
        "--etas", type=float, nargs="+", default=[0.0, 1.0], help="DDIM eta values to compare"
    )
    parser.add_argument(
        "--warm_starts",
        type=float,
        nargs="+",
        default=[0.0],
        help="DDIM warm starts to compare (sampling.warm_start; 0 = from noise)",
    )
    parser.add_argument(
        "--grid_powers",
        type=float,
        nargs="+",
        default=[4.0],
        help="step spacings to compare (sampling.grid_power; 2 = quadratic, 1 = even)",
    )
    parser.add_argument(
        "--consensus",
        type=float,
        nargs="+",
        default=[None],
        help="expr_to_pos: sampling.consensus shares to compare (default: the checkpoint's)",
    )
    parser.add_argument(
        "--consensus_neighbors",
        type=int,
        nargs="+",
        default=[None],
        help="expr_to_pos: sampling.consensus_neighbors to compare (default: the checkpoint's)",
    )
    parser.add_argument("--no_ddpm", action="store_true", help="skip the T-step DDPM reference")
    parser.add_argument("--modes", nargs="+", choices=sorted(METRICS), default=sorted(METRICS))
    parser.add_argument("--n_cells", type=int, default=6000, help="demo tissue: cells in all")
    parser.add_argument("--n_genes", type=int, default=60, help="demo tissue: genes")
    parser.add_argument("--n_slices", type=int, default=6, help="demo tissue: slices")
    parser.add_argument("--minutes", type=float, default=6.0, help="demo training time budget")
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for the demo training run (default model otherwise)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data and training seed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--workdir", type=Path, default=None, help="keep store and run here")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if (args.data_dir is None) != (args.checkpoint is None):
        parser.error("--data_dir and --checkpoint go together (or neither: demo tissue)")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="alphastomics_sampler_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if args.checkpoint is not None:
            store_dir = args.data_dir
            module = load_module(args.checkpoint)
            source = f"{args.data_dir} with {args.checkpoint}"
        else:
            store_dir = make_demo_store(
                work,
                n_cells=args.n_cells,
                n_genes=args.n_genes,
                n_slices=args.n_slices,
                seed=args.seed,
            )
            overrides = [
                f"training.max_time_minutes={args.minutes}",
                "training.val_every_n_epochs=25",
                "training.val_max_slices=1",
                f"training.seed={args.seed}",
                *args.override,
            ]
            module = train_model(store_dir, work / "run", overrides)
            source = (
                f"demo tissue ({args.n_cells} cells, {args.n_genes} genes, {args.n_slices} "
                f"slices), trained {args.minutes} min with {' '.join(overrides)}"
            )
        prepared = time.perf_counter() - start
        module = module.eval()
        print(
            f"# {source}; T = {module.noise_model.T}, eta = {module.cfg.sampling.eta}, "
            f"seeds {args.seeds}, split {args.split!r}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; prepared in {prepared:.0f} s"
        )
        print(
            f"{'mode':<12} {'metric':<25} {'sampler':<20} {'evals':>6} {'mean':>8} {'sd':>8} "
            f"{'vs DDPM %':>9} {'s/slice':>9}"
        )
        rows = run_benchmark(
            module,
            Path(store_dir),
            split=args.split,
            seeds=args.seeds,
            ddim_steps=args.ddim_steps,
            etas=args.etas,
            warm_starts=args.warm_starts,
            with_ddpm=not args.no_ddpm,
            modes=args.modes,
            grid_powers=tuple(args.grid_powers),
            consensus=tuple(args.consensus),
            consensus_neighbors=tuple(args.consensus_neighbors),
        )
    for row in rows:
        row["vs_ddpm_percent"] = _gap_percent(row, rows)
    if args.json is not None:
        payload = {"source": source, "args": {k: str(v) for k, v in vars(args).items()}}
        payload |= {"T": module.noise_model.T, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

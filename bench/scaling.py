"""Scaling of one training step and one sampling step with the number of cells N in a slice.

For each N the default model (``alphastomics.config.load_config()``, G genes) is timed in a
fresh subprocess per measurement, so every peak-memory number is that of one kind of step alone:

- ``train``: noise -> forward -> loss -> backward -> gradient clipping -> AdamW step, with the
  default loss (``module.diffusion_loss(batch)``: the O(N) coordinate loss, Kabsch-aligned as
  for several training slices);
- ``train_exact``: the same with the pairwise-distance loss, exact for all N cells
  (``loss.use_distance_matrix=true loss.exact_distance_max_cells=N``, O(N^2)), only for
  N <= ``--exact_max``;
- ``sample``: one DDIM step in ``joint`` mode (one network evaluation + update of both
  modalities; ``module.predictor.sample(batch, "joint", sampler="ddim", steps=1)``);
- ``place``: a whole ``expr_to_pos`` sample with the default sampler (``sampling.steps`` DDIM
  steps, ``module.predictor.sample(batch, "expr_to_pos")``): with local attention over
  expression its search runs once per sample, at the first step (``Denoiser.constant_expression``);
- ``neighbors``: the k-nearest-neighbour graph of the slice's cells
  (``attn_model.neighbors.knn_graph``, k-d tree, the search the local attention runs at every
  network evaluation; k = ``model.local_neighbors``, or 16 while that is 0);
- ``expression_neighbors``: the same graph found in expression, as ``model.local_graph``
  ``expression``/``cleaner`` searches it (``neighbors.expression_coordinates`` on the top 16
  principal axes, then ``knn_graph(..., search=...)``: exact up to ``_EXACT_SEARCH_CELLS``
  cells, approximate above); the synthetic expression is isotropic noise, a k-d tree's worst
  case;
- ``observe``: the measured values a ``joint`` sample writes to ``X``
  (:meth:`alphastomics.diffusion_model.observation.ObservationModel.draw` of the N cells'
  expression states, from the largest bank of training cells ``train`` stores: ``MAX_CELLS``,
  here synthetic slab cells; the warm-up step also fits its PCA and neighbour index).

The batch is one whole slice with its ``slice_index``, as the ``slice`` data mode yields it, so
the module's neighbour cache of the sampled distance loss works as in training (the warm-up step
fills it). Like ``AlphaSTomicsModule.on_fit_start``, each worker first calls
``alphastomics.utils.memory.tune_malloc()`` (``--no_malloc_tuning`` skips it).

Wall time is the median over ``--repeats`` steps after one warm-up step (the minimum and the
process CPU time are recorded too: on a shared machine they vary less). Peak memory is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end minus its value after imports, model
construction and data generation (so the batch itself, N x G float32, is not counted), on Linux.
Page faults are the minor faults per timed step, in GB of 4 KiB pages. The log-log slope of time
and memory versus N (``np.polyfit`` on log N) summarises the growth: 1 is linear.

With ``--device cuda`` the model and batch live on the GPU and the peak column is
``torch.cuda.max_memory_allocated`` growth instead of the resident set. ``--override
training.precision=bf16-mixed`` autocasts the step to bfloat16 as Lightning's precision plugin
does (on CPU too).

Usage::

    python bench/scaling.py                                  # N = 1k, 10k, 50k, 100k; G = 300
    python bench/scaling.py --sizes 1000 10000 --repeats 5 --json scaling.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

KINDS = (
    "train",
    "train_exact",
    "sample",
    "place",
    "neighbors",
    "expression_neighbors",
    "observe",
)
# k of the neighbour search while model.local_neighbors is 0 (the neighbour read-out reads 32)
NEIGHBORS_K = 16


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def _current_rss_mb() -> float:
    """Current resident set size in MiB (from /proc on Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except OSError:
        return math.nan
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def slab_batch(n_cells: int, n_genes: int, seed: int) -> Any:
    """One whole-slice ``DataHolder``: a 3D slab like a registered section, scaled to unit RMS
    radius, with standardised expression (N x G) and its ``slice_index``."""
    import torch

    from alphastomics.data.batch import DataHolder

    gen = torch.Generator().manual_seed(seed)
    positions = torch.rand(1, n_cells, 3, generator=gen) * torch.tensor([4.0, 3.0, 0.4])
    positions = positions - positions.mean(dim=1, keepdim=True)
    positions = positions / positions.square().sum(-1).mean().sqrt()
    return DataHolder(
        expression=torch.randn(1, n_cells, n_genes, generator=gen),
        positions=positions,
        node_mask=torch.ones(1, n_cells, dtype=torch.bool),
        cell_index=torch.arange(n_cells).unsqueeze(0),
        slice_index=torch.zeros(1, dtype=torch.long),
    )


def _worker(
    kind: str,
    n_cells: int,
    n_genes: int,
    repeats: int,
    seed: int,
    tune: bool,
    device: str,
    overrides: list[str],
) -> dict[str, Any]:
    """Run one measurement in this (fresh) process; returns the numbers as a dict."""
    import numpy as np
    import torch

    tuned = False
    if tune:
        try:
            from alphastomics.utils.memory import tune_malloc
        except ImportError:  # an older checkout without it
            pass
        else:
            tuned = tune_malloc()

    from alphastomics.config import load_config
    from alphastomics.training.module import AlphaSTomicsModule

    torch.manual_seed(seed)
    overrides = list(overrides)
    if kind == "train_exact":
        overrides += ["loss.use_distance_matrix=true", f"loss.exact_distance_max_cells={n_cells}"]
    cfg = load_config(overrides=overrides)
    module = AlphaSTomicsModule(cfg, n_genes).to(device)

    batch = slab_batch(n_cells, n_genes, seed).to(device)
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    gen_device = torch.Generator(device=device).manual_seed(seed)
    # training.precision as Lightning applies it: bf16-mixed / 16-mixed autocast the forward
    # (and loss) to that type; 32-true runs in float32
    precision = cfg.training.precision
    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if half is None and precision != "32-true":
        raise SystemExit(f"training.precision={precision}: this bench measures 32-true and *-mixed")

    def autocast() -> Any:
        return torch.autocast(
            device_type="cuda" if cuda else "cpu",
            dtype=half or torch.float32,
            enabled=half is not None,
        )

    if kind == "neighbors":
        from alphastomics.attn_model.neighbors import knn_graph

        k = cfg.model.local_neighbors or NEIGHBORS_K

        def step() -> None:
            knn_graph(batch.positions, batch.node_mask, k)

    elif kind == "expression_neighbors":
        from alphastomics.attn_model.neighbors import (
            EXPRESSION_AXES,
            expression_coordinates,
            knn_graph,
        )

        k = cfg.model.local_neighbors or NEIGHBORS_K

        def step() -> None:
            axes = expression_coordinates(batch.expression, batch.node_mask, EXPRESSION_AXES)
            knn_graph(batch.positions, batch.node_mask, k, search=axes)

    elif kind == "observe":
        from alphastomics.diffusion_model import observation

        n_bank = min(observation.MAX_CELLS, observation.MAX_VALUES // n_genes)
        bank = slab_batch(n_bank, n_genes, seed + 1).expression[0].numpy()
        measured = observation.ObservationModel(bank, np.ones(bank.shape, bool))
        states = batch.expression[0].cpu().numpy()

        def step() -> None:
            measured.draw(states, seed=seed)

    elif kind == "sample":
        module.eval()

        def step() -> None:
            with autocast():
                module.predictor.sample(
                    batch, "joint", sampler="ddim", steps=1, generator=gen_device
                )

    elif kind == "place":
        module.eval()

        def step() -> None:
            with autocast():
                module.predictor.sample(batch, "expr_to_pos", generator=gen_device)

    else:
        module.train()
        optimizer = torch.optim.AdamW(
            module.model.parameters(), lr=cfg.training.lr, weight_decay=cfg.training.weight_decay
        )
        clip = cfg.training.gradient_clip_val

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = module.diffusion_loss(batch).total
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(module.model.parameters(), clip)
            optimizer.step()

    baseline = _peak_rss_mb()
    baseline_now = _current_rss_mb()
    if cuda:
        sync()
        gpu_baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu, faults = [], [], []
    for i in range(repeats + 1):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        step()
        sync()
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        if i > 0:  # the first step is a warm-up
            times.append(elapsed)
            cpu.append(after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime)
            faults.append((after.ru_minflt - usage.ru_minflt) * 4096 / 1e9)
    order = sorted(range(len(times)), key=times.__getitem__)
    mid = order[len(order) // 2]
    return {
        "kind": kind,
        "n_cells": n_cells,
        "n_genes": n_genes,
        "seconds": times[mid],
        "seconds_min": times[order[0]],
        "seconds_all": times,
        "cpu_seconds": cpu[mid],
        "fault_gb": faults[mid],
        "peak_mb": max(_peak_rss_mb() - baseline, 0.0),
        "overrides": overrides,
        "precision": precision,
        "baseline_mb": baseline_now,
        "threads": torch.get_num_threads(),
        "malloc_tuned": tuned,
        "device": device,
        "gpu_peak_mb": (torch.cuda.max_memory_allocated(device) - gpu_baseline) / 2**20
        if cuda
        else None,
    }


def _run_child(
    kind: str,
    n_cells: int,
    n_genes: int,
    repeats: int,
    seed: int,
    tune: bool,
    device: str,
    timeout: float,
    overrides: list[str],
) -> dict[str, Any]:
    """Run :func:`_worker` in a fresh interpreter and parse its JSON line."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--sizes",
        str(n_cells),
        "--genes",
        str(n_genes),
        "--repeats",
        str(repeats),
        "--seed",
        str(seed),
        "--device",
        device,
        *([] if tune else ["--no_malloc_tuning"]),
        *(["--override", *overrides] if overrides else []),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"kind": kind, "n_cells": n_cells, "error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"kind": kind, "n_cells": n_cells, "error": " | ".join(tail)}
    return json.loads(lines[-1])


def _slope(rows: list[dict[str, Any]], key: str) -> float:
    """Slope of log(value) against log(N) by least squares; NaN with fewer than 2 sizes."""
    import numpy as np

    points = [(r["n_cells"], r[key]) for r in rows if "error" not in r and r[key] > 0]
    if len(points) < 2:
        return math.nan
    n, v = np.log(np.array(points, dtype=float)).T
    return float(np.polyfit(n, v, 1)[0])


def machine_info() -> dict[str, Any]:
    """Cores, memory, torch version and threads of this machine, for the report."""
    import torch

    try:
        with open("/proc/meminfo") as fh:
            mem_kb = int(fh.readline().split()[1])
        mem_gib = round(mem_kb / 2**20, 1)
    except OSError:
        mem_gib = math.nan
    return {
        "cpu_cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every measurement in its own subprocess, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000, 100000])
    parser.add_argument("--genes", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument(
        "--exact_max",
        type=int,
        default=10000,
        help="largest N measured with the exact O(N^2) distance loss (0 = none)",
    )
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cpu", help="torch device (cuda: the peak column is GPU memory)"
    )
    parser.add_argument(
        "--no_malloc_tuning",
        action="store_true",
        help="leave glibc malloc as it is (for before/after comparisons)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every measurement (default config otherwise)",
    )
    parser.add_argument("--worker", choices=KINDS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        result = _worker(
            args.worker,
            args.sizes[0],
            args.genes,
            args.repeats,
            args.seed,
            not args.no_malloc_tuning,
            args.device,
            args.override,
        )
        print(json.dumps(result))
        return 0

    info = machine_info()
    print(
        f"# {info['cpu_cores']} cores, {info['memory_gib']} GiB, torch {info['torch']} "
        f"({info['torch_threads']} threads), load {info['load_average_1min']:.2f}; "
        f"G = {args.genes}, median of {args.repeats} steps after 1 warm-up; malloc tuning "
        f"{'off' if args.no_malloc_tuning else 'on'}; overrides: {' '.join(args.override) or 'none'}"
    )
    results: list[dict[str, Any]] = []
    header = (
        f"{'step':<12} {'N':>8} {'seconds':>9} {'min s':>8} {'CPU s':>8} {'peak MiB':>10} "
        f"{'faults GB':>10}"
    )
    print(header)
    print("-" * len(header))
    for kind in args.kinds:
        for n in args.sizes:
            if kind == "train_exact" and n > args.exact_max:
                continue
            row = _run_child(
                kind,
                n,
                args.genes,
                args.repeats,
                args.seed,
                not args.no_malloc_tuning,
                args.device,
                args.timeout,
                args.override,
            )
            if row.get("gpu_peak_mb") is not None:
                row["peak_mb"] = row["gpu_peak_mb"]
            results.append(row)
            if "error" in row:
                print(f"{kind:<12} {n:>8}  failed: {row['error']}")
            else:
                print(
                    f"{kind:<12} {n:>8} {row['seconds']:>9.3f} {row['seconds_min']:>8.3f} "
                    f"{row['cpu_seconds']:>8.3f} {row['peak_mb']:>10.0f} {row['fault_gb']:>10.2f}"
                )
            sys.stdout.flush()

    slopes: dict[str, dict[str, float]] = {}
    print()
    print("log-log slope versus N (1 = linear)")
    for kind in args.kinds:
        rows = [r for r in results if r["kind"] == kind]
        slopes[kind] = {"seconds": _slope(rows, "seconds"), "peak_mb": _slope(rows, "peak_mb")}
        print(
            f"{kind:<12} time {slopes[kind]['seconds']:.2f}   memory {slopes[kind]['peak_mb']:.2f}"
        )
    if args.json is not None:
        payload = {"machine": info, "args": vars(args) | {"json": str(args.json)}}
        payload |= {"results": results, "slopes": slopes}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

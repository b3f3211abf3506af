"""Gene imputation benchmark: Li et al. (Nature Methods 2022)'s protocol, AlphaSTomics beside a
kNN baseline, Tangram and gimVI on the same folds.

Usage (from the repository root, virtual environment active)::

    # seqFISH mouse embryo (Li et al.'s "Data 1"): query embryo3_z5, the other five slices are
    # the reference; the model is trained on the reference by the CLI for 15 minutes
    python bench/imputation.py --dataset seqfish --output_dir runs/impute_seqfish
    # BDTNP Drosophila embryo ("Data 14"): a random half of the cells is the query
    python bench/imputation.py --dataset bdtnp --output_dir runs/impute_bdtnp
    # any data: query slices by name, or a share of the cells of one slice
    python bench/imputation.py --h5ad data.h5ad --position_key spatial --query_slices s3 ...
    python bench/imputation.py --h5ad data.h5ad --position_key spatial --query_fraction 0.5 ...
    # an existing checkpoint trained on this reference (runs/.../data/reference.h5ad), some rows
    python bench/imputation.py --dataset seqfish --checkpoint CKPT --methods model knn

Tangram and gimVI come from ``pip install -e ".[peers]"`` (after torch); without them their
rows are skipped with a note. ``KEY=VALUE`` words are config overrides for training.

Protocol: the genes the query and the reference share are split by ``KFold(10)`` without
shuffling (in the query's gene order); each fold is dropped from the query and predicted from
the query's other genes (and, for the model, its positions), so every gene is predicted once.
Each method gets the same log-normalised values (``preprocess --normalize auto``: counts get
library size 10,000 + log1p, normalised data is kept). Per gene over the query cells, with
predictions clipped at 0 first (expression is non-negative) for every method: Pearson
correlation (PCC), SSIM of the gene scaled by its maximum in one global window, RMSE of the
z-scored values and Jensen-Shannon divergence of the values scaled to sum 1 (natural log);
the table reports medians over genes. Genes constant in the query have no pattern to recover and
are left out of every median (their count is reported).

Methods:

- ``model``: ``alphastomics preprocess`` of the reference (every slice trains:
  ``--test_fraction 0 --val_fraction 0``) and ``alphastomics train`` with the packaged defaults,
  ``training.max_time_minutes`` from ``--train_minutes`` (with the default
  ``training.max_epochs: null`` the time budget stops training), then the ``last.ckpt`` imputes each
  fold as ``alphastomics sample --sample_mode impute`` does
  (:func:`alphastomics.workflows.impute.impute_anndata`);
- ``knn``: PCA (30 components) of the reference's cells in the fold's measured genes, the
  query's cells projected on it, and each query cell given the mean of its 20 nearest reference
  cells (Euclidean) in the dropped genes;
- ``tangram``: ``tangram-sc`` in ``cells`` mode on the measured genes (``--tangram_epochs``,
  default 500), genes projected with ``project_genes``;
- ``gimvi``: ``scvi-tools``' GIMVI (``--gimvi_epochs``, default 200) on pseudo-counts
  ``round(expm1(x))`` of the log-normalised values, ``get_imputed_values(normalized=False)``.

Outputs in ``--output_dir``: ``data/`` (reference.h5ad, query.h5ad, the model's store),
``run/`` (training), ``results.json`` (per-gene scores of every method, medians, wall times,
commands) and ``results.md`` (the table, also printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import bench_common
import numpy as np
from scipy.special import rel_entr
from sklearn.decomposition import PCA
from sklearn.model_selection import KFold
from sklearn.neighbors import NearestNeighbors

from alphastomics import keys
from alphastomics.data.anndata import prepare_anndata, read_h5ad
from alphastomics.errors import UserInputError
from alphastomics.utils.io import atomic_write, atomic_write_json, check_output_dir

log = logging.getLogger("bench.imputation")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS: dict[str, dict[str, Any]] = {
    "seqfish": {
        "h5ad": SHARED / "seqfish_embryo" / "seqfish_embryo.h5ad",
        "position_key": "spatial",
        "query_slices": ["embryo3_z5"],
    },
    "bdtnp": {
        "h5ad": SHARED / "bdtnp_drosophila" / "bdtnp_drosophila.h5ad",
        "position_key": "spatial",
        "query_fraction": 0.5,
    },
}
METHODS = ("model", "knn", "tangram", "gimvi")
METRICS = ("pcc", "ssim", "rmse", "js")
HEADERS = {"pcc": "PCC ↑", "ssim": "SSIM ↑", "rmse": "RMSE ↓", "js": "JS ↓"}
KNN_COMPONENTS, KNN_NEIGHBORS = 30, 20
PEERS = {"tangram": "tangram", "gimvi": "scvi"}  # method -> module it needs


# --------------------------------------------------------------------------------------------
# Scores (Li et al. 2022, per gene over cells)


def _zscore(x: np.ndarray) -> np.ndarray:
    """Columns of ``x`` (N, G) minus their mean over their (population) std; 0 where constant."""
    centred = x - x.mean(axis=0)
    std = x.std(axis=0)
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


def pcc(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Pearson correlation per gene of ``truth`` and ``pred`` (N, G) -> (G,).

    NaN where the truth is constant; 0 where only the prediction is (it carries no information).
    """
    r = (_zscore(truth) * _zscore(pred)).mean(axis=0)
    return np.where(truth.std(axis=0) > 0, r, np.nan)


def ssim(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """SSIM per gene (G,) of (N, G) arrays, each gene scaled by its maximum, one global window.

    Li et al.'s formula: ``l * c * s`` with ``l = (2 mu_t mu_p + C1) / (mu_t^2 + mu_p^2 + C1)``,
    ``c = (2 s_t s_p + C2) / (s_t^2 + s_p^2 + C2)``, ``s = (cov + C3) / (s_t s_p + C3)``,
    ``C1 = 0.01^2``, ``C2 = 0.03^2``, ``C3 = C2 / 2`` (dynamic range 1), population moments.
    A gene whose maximum is not positive is scaled to 0.
    """

    def scaled(x: np.ndarray) -> np.ndarray:
        top = x.max(axis=0)
        return np.divide(x, top, out=np.zeros_like(x), where=top > 0)

    t, p = scaled(truth.astype(np.float64)), scaled(pred.astype(np.float64))
    c1, c2 = 0.01**2, 0.03**2
    c3 = c2 / 2
    mu_t, mu_p = t.mean(axis=0), p.mean(axis=0)
    s_t, s_p = t.std(axis=0), p.std(axis=0)
    cov = ((t - mu_t) * (p - mu_p)).mean(axis=0)
    luminance = (2 * mu_t * mu_p + c1) / (mu_t**2 + mu_p**2 + c1)
    contrast = (2 * s_t * s_p + c2) / (s_t**2 + s_p**2 + c2)
    structure = (cov + c3) / (s_t * s_p + c3)
    return luminance * contrast * structure


def rmse_zscore(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """RMSE per gene (G,) of the z-scored (N, G) truth and prediction (a constant one is 0)."""
    return np.sqrt(((_zscore(truth) - _zscore(pred)) ** 2).mean(axis=0))


def js_divergence(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence per gene (G,): each (N, G) column scaled to sum 1 over cells,
    natural log (0 = identical). A column without positive mass counts as uniform."""

    def distribution(x: np.ndarray) -> np.ndarray:
        x = np.clip(x.astype(np.float64), 0.0, None)
        total = x.sum(axis=0)
        return np.where(total > 0, x / np.where(total > 0, total, 1.0), 1.0 / len(x))

    p, q = distribution(truth), distribution(pred)
    m = (p + q) / 2
    return np.clip(0.5 * rel_entr(p, m).sum(axis=0) + 0.5 * rel_entr(q, m).sum(axis=0), 0.0, None)


def score_genes(truth: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Every score per gene: ``{"pcc", "ssim", "rmse", "js"}`` -> (G,), predictions clipped at 0.

    A gene constant in the truth scores NaN on every metric (it has no pattern to recover), so
    medians over genes leave it out of every column alike.
    """
    pred = np.clip(np.asarray(pred, dtype=np.float64), 0.0, None)
    truth = np.asarray(truth, dtype=np.float64)
    scores = {
        "pcc": pcc(truth, pred),
        "ssim": ssim(truth, pred),
        "rmse": rmse_zscore(truth, pred),
        "js": js_divergence(truth, pred),
    }
    constant = truth.std(axis=0) == 0
    return {name: np.where(constant, np.nan, value) for name, value in scores.items()}


def gene_folds(n_genes: int, n_folds: int = 10) -> list[np.ndarray]:
    """Indices of the genes each fold drops: ``KFold(n_folds)`` without shuffling."""
    return [test for _, test in KFold(n_splits=n_folds, shuffle=False).split(np.arange(n_genes))]


# --------------------------------------------------------------------------------------------
# Data


def log_normalised(adata: ad.AnnData, position_key: str, slice_key: str) -> np.ndarray:
    """(N, G) float32 expression of ``adata`` on its own genes, normalised as ``preprocess``
    does (``--normalize auto``), rows in ``adata``'s order."""
    genes = [str(g) for g in adata.var_names]
    slices = prepare_anndata(
        adata,
        genes=genes,
        position_key=position_key,
        slice_key=slice_key,
        normalize="auto",
        require_positions=False,
    )
    out = np.zeros((adata.n_obs, len(genes)), dtype=np.float32)
    for piece in slices:
        out[piece.obs_indices] = piece.expression
    return out


def split_reference_query(
    adata: ad.AnnData,
    *,
    slice_key: str,
    query_slices: Sequence[str] | None,
    query_fraction: float | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (N,) masks of the reference and query cells."""
    if query_slices:
        if slice_key not in adata.obs:
            raise UserInputError(f"--query_slices needs adata.obs[{slice_key!r}]")
        names = adata.obs[slice_key].astype(str).to_numpy()
        unknown = sorted(set(query_slices) - set(names))
        if unknown:
            raise UserInputError(
                f"--query_slices {' '.join(unknown)}: no such slice; slices are "
                f"{', '.join(sorted(set(names)))}"
            )
        query = np.isin(names, list(query_slices))
    else:
        assert query_fraction is not None
        rng = np.random.default_rng(seed)
        query = np.zeros(adata.n_obs, dtype=bool)
        query[rng.permutation(adata.n_obs)[: round(query_fraction * adata.n_obs)]] = True
    if query.all() or not query.any():
        raise UserInputError("the query must leave reference cells, and hold some cells")
    return ~query, query


# --------------------------------------------------------------------------------------------
# Methods: each maps (reference values (R, G), query values of the measured genes (Q, M),
# measured gene indices (M,), dropped gene indices (D,)) to predictions (Q, D)


def knn_predict(
    reference: np.ndarray, query: np.ndarray, measured: np.ndarray, dropped: np.ndarray
) -> np.ndarray:
    """Mean of the 20 nearest reference cells in a 30-component PCA of the measured genes."""
    n_components = min(KNN_COMPONENTS, len(measured), len(reference) - 1)
    pca = PCA(n_components=n_components, random_state=0).fit(reference[:, measured])
    k = min(KNN_NEIGHBORS, len(reference))
    nn = NearestNeighbors(n_neighbors=k).fit(pca.transform(reference[:, measured]))
    _, index = nn.kneighbors(pca.transform(query))
    return reference[:, dropped][index].mean(axis=1)


def tangram_predict(
    reference: np.ndarray,
    query: np.ndarray,
    measured: np.ndarray,
    dropped: np.ndarray,
    *,
    genes: list[str],
    epochs: int,
    device: str,
    seed: int,
) -> np.ndarray:
    """Tangram (cells mode) mapping of the reference cells onto the query on the measured genes."""
    import tangram as tg

    ad_sc = ad.AnnData(X=reference.copy())
    ad_sc.var_names = genes
    ad_sp = ad.AnnData(X=query.copy())
    ad_sp.var_names = [genes[i] for i in measured]
    ad_sc.obs_names = [f"r{i}" for i in range(ad_sc.n_obs)]
    ad_sp.obs_names = [f"q{i}" for i in range(ad_sp.n_obs)]
    tg.pp_adatas(ad_sc, ad_sp, genes=list(ad_sp.var_names), gene_to_lowercase=False)
    mapping = tg.map_cells_to_space(
        ad_sc,
        ad_sp,
        mode="cells",
        num_epochs=epochs,
        device=device,
        random_state=seed,
        verbose=False,
    )
    projected = tg.project_genes(mapping, ad_sc)  # its gene names are lower case
    values = projected.X
    values = np.asarray(values.toarray() if hasattr(values, "toarray") else values)
    column = {str(g).lower(): i for i, g in enumerate(projected.var_names)}
    out = np.zeros((len(query), len(dropped)), dtype=np.float64)
    for j, i in enumerate(dropped):
        # pp_adatas drops genes that are 0 in every reference cell: their projection is 0
        if genes[i].lower() in column:
            out[:, j] = values[:, column[genes[i].lower()]]
    return out


def gimvi_predict(
    reference: np.ndarray,
    query: np.ndarray,
    measured: np.ndarray,
    dropped: np.ndarray,
    *,
    genes: list[str],
    epochs: int,
    device: str,
    seed: int,
) -> np.ndarray:
    """gimVI on pseudo-counts ``round(expm1(x))`` of the log-normalised values."""
    import scvi
    from scvi.external import GIMVI

    scvi.settings.seed = seed
    seq = ad.AnnData(X=np.rint(np.expm1(reference)).astype(np.float32))
    seq.var_names = genes
    spatial = ad.AnnData(X=np.rint(np.expm1(query)).astype(np.float32))
    spatial.var_names = [genes[i] for i in measured]
    GIMVI.setup_anndata(seq)
    GIMVI.setup_anndata(spatial)
    model = GIMVI(seq, spatial)
    model.train(max_epochs=epochs, accelerator="gpu" if device == "cuda" else "cpu", devices=1)
    _, imputed = model.get_imputed_values(normalized=False)
    return np.asarray(imputed)[:, dropped]


# --------------------------------------------------------------------------------------------
# The model


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "alphastomics.main", *args]


def _run(command: list[str], commands: list[str]) -> None:
    commands.append(shlex.join(command))
    log.info("running %s", commands[-1])
    subprocess.run(command, check=True)


def train_model(
    args: argparse.Namespace,
    overrides: list[str],
    reference_path: Path,
    output_dir: Path,
    commands: list[str],
) -> tuple[Path, float]:
    """Preprocess the reference and train on it with the CLI; (last.ckpt, seconds)."""
    store, run = output_dir / "data" / "store", output_dir / "run"
    _run(
        _cli(
            [
                "preprocess",
                "--input",
                str(reference_path),
                "--output_dir",
                str(store),
                "--position_key",
                args.position_key,
                "--slice_key",
                args.slice_key,
                "--test_fraction",
                "0",
                "--val_fraction",
                "0",
                "--overwrite",
            ]
        ),
        commands,
    )
    start = time.perf_counter()
    train = ["train", "--data_dir", str(store), "--output_dir", str(run), "--overwrite"]
    train += [f"training.max_time_minutes={args.train_minutes}", *overrides]
    _run(_cli(train), commands)
    return run / "checkpoints" / "last.ckpt", time.perf_counter() - start


def model_predictor(
    checkpoint: Path, query: ad.AnnData, device: str, seed: int
) -> Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """A method (see above) that imputes each fold as ``sample --sample_mode impute`` does."""
    from alphastomics.training.checkpoint import load_module
    from alphastomics.workflows.impute import impute_anndata

    module = load_module(checkpoint, map_location=device)
    model_genes = set(map(str, module.hparams["gene_names"]))
    missing = [str(g) for g in query.var_names if str(g) not in model_genes]
    if missing:
        raise UserInputError(
            f"--checkpoint {checkpoint} lacks {len(missing)} of the {query.n_vars} genes to "
            f"impute (e.g. {', '.join(missing[:3])}); drop --checkpoint to train on this "
            "reference, or pass one trained on it"
        )

    def predict(
        reference: np.ndarray, values: np.ndarray, measured: np.ndarray, dropped: np.ndarray
    ) -> np.ndarray:
        fold = query[:, measured].copy()
        fold.X = values.astype(np.float32)
        result = impute_anndata(module, fold, normalize="none", seed=seed)
        return np.asarray(result[:, list(query.var_names[dropped])].X)

    return predict


# --------------------------------------------------------------------------------------------
# Run


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``KEY=VALUE`` overrides are split off before it runs)."""
    parser = argparse.ArgumentParser(
        prog="bench/imputation.py",
        description="Impute each tenth of the genes of a query from the rest (Li et al. 2022): "
        "AlphaSTomics, a kNN baseline, Tangram and gimVI. KEY=VALUE words are config overrides.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), help="a shared data set preset")
    parser.add_argument("--h5ad", type=Path, help="input AnnData (instead of --dataset)")
    parser.add_argument("--position_key", help="adata.obsm key of the coordinates")
    parser.add_argument(
        "--slice_key", default=keys.SLICE_KEY, help="adata.obs column naming slices"
    )
    parser.add_argument("--query_slices", nargs="+", help="query slices; the rest is reference")
    parser.add_argument("--query_fraction", type=float, help="share of cells drawn as query")
    parser.add_argument("--n_folds", type=int, default=10, help="gene folds (the protocol: 10)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--checkpoint", type=Path, help="skip training: a model of this reference")
    parser.add_argument("--train_minutes", type=float, default=15.0, help="training budget")
    parser.add_argument("--tangram_epochs", type=int, default=500)
    parser.add_argument("--gimvi_epochs", type=int, default=200)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0, help="query draw and method seeds")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true", help="reuse a non-empty --output_dir")
    return parser


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.dataset:
        for key, value in DATASETS[args.dataset].items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.h5ad is None or args.position_key is None:
        parser.error("pass --dataset, or --h5ad and --position_key")
    if bool(args.query_slices) == (args.query_fraction is not None):
        parser.error("pass one of --query_slices and --query_fraction")
    if args.query_fraction is not None and not 0 < args.query_fraction < 1:
        parser.error("--query_fraction must be in (0, 1)")
    if args.n_folds < 2:
        parser.error("--n_folds must be >= 2")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what ``results.json`` holds."""
    raw = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in raw if "=" in a and not a.startswith("-")]
    parser = build_parser()
    args = parser.parse_args([a for a in raw if a not in overrides])
    _resolve(args, parser)
    if args.checkpoint is not None and overrides:
        parser.error("--checkpoint skips training: drop the KEY=VALUE overrides")
    check_output_dir(args.output_dir, overwrite=args.overwrite)
    (args.output_dir / "data").mkdir(parents=True, exist_ok=True)

    adata = read_h5ad(args.h5ad)
    is_reference, is_query = split_reference_query(
        adata,
        slice_key=args.slice_key,
        query_slices=args.query_slices,
        query_fraction=args.query_fraction,
        seed=args.seed,
    )
    reference, query = adata[is_reference].copy(), adata[is_query].copy()
    reference_path = args.output_dir / "data" / "reference.h5ad"
    reference.write_h5ad(reference_path)
    query.write_h5ad(args.output_dir / "data" / "query.h5ad")
    reference_genes = set(map(str, reference.var_names))
    genes = [str(g) for g in query.var_names if str(g) in reference_genes]
    if len(genes) < args.n_folds:
        raise UserInputError(
            f"{args.h5ad}: the query and the reference share {len(genes)} genes, fewer than "
            f"--n_folds {args.n_folds}; check var_names, or lower --n_folds"
        )
    ref_values = log_normalised(reference[:, genes].copy(), args.position_key, args.slice_key)
    query = query[:, genes].copy()
    truth = log_normalised(query, args.position_key, args.slice_key)
    folds = gene_folds(len(genes), args.n_folds)
    log.info(
        "reference %d cells, query %d cells, %d shared genes in %d folds",
        len(ref_values),
        len(truth),
        len(genes),
        len(folds),
    )

    commands = [shlex.join(["bench/imputation.py", *raw])]
    rows: dict[str, dict[str, Any]] = {}
    methods: dict[str, Callable[..., np.ndarray]] = {}
    extra_seconds: dict[str, float] = {}
    notes: dict[str, str] = {}
    for name in args.methods:
        module = PEERS.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            notes[name] = f"skipped: {module} is not installed (pip install -e '.[peers]')"
            continue
        if name == "model":
            checkpoint, seconds = args.checkpoint, 0.0
            if checkpoint is None:
                checkpoint, seconds = train_model(
                    args, overrides, reference_path, args.output_dir, commands
                )
            extra_seconds[name] = seconds
            notes[name] = f"{checkpoint}, trained {seconds:.0f} s" if seconds else str(checkpoint)
            methods[name] = model_predictor(checkpoint, query, args.device, args.seed)
        elif name == "knn":
            methods[name] = knn_predict
            notes[name] = f"PCA-{KNN_COMPONENTS}, {KNN_NEIGHBORS} neighbours"
        else:
            epochs = args.tangram_epochs if name == "tangram" else args.gimvi_epochs
            predict = tangram_predict if name == "tangram" else gimvi_predict

            def peer(*a: np.ndarray, _p: Callable[..., np.ndarray] = predict, _e: int = epochs):
                return _p(*a, genes=genes, epochs=_e, device=args.device, seed=args.seed)

            methods[name] = peer
            notes[name] = f"{epochs} epochs, {args.device}"

    for name, predict in methods.items():
        prediction = np.zeros_like(truth)
        start = time.perf_counter()
        for k, dropped in enumerate(folds):
            measured = np.setdiff1d(np.arange(len(genes)), dropped)
            prediction[:, dropped] = predict(ref_values, truth[:, measured], measured, dropped)
            log.info("%s: fold %d/%d done", name, k + 1, len(folds))
        predict_seconds = time.perf_counter() - start
        scores = score_genes(truth, prediction)
        rows[name] = {
            "scores": {m: v.tolist() for m, v in scores.items()},
            "median": {m: _median(v) for m, v in scores.items()},
            "mean": {m: _mean(v) for m, v in scores.items()},
            "fit_seconds": extra_seconds.get(name, 0.0),
            "predict_seconds": predict_seconds,
            "note": notes[name],
        }

    varies = truth.std(axis=0) > 0
    result: dict[str, Any] = {
        "h5ad": str(args.h5ad),
        "query": args.query_slices or f"random {args.query_fraction:.0%} of the cells",
        "n_reference_cells": len(ref_values),
        "n_query_cells": len(truth),
        "genes": genes,
        "n_constant_genes_left_out": int((~varies).sum()),
        "folds": [f.tolist() for f in folds],
        "commands": commands,
        "rows": rows,
        "skipped": {k: v for k, v in notes.items() if k not in rows},
    }
    text = report_markdown(result)
    atomic_write_json(args.output_dir / "results.json", result)
    atomic_write(args.output_dir / "results.md", lambda tmp: tmp.write_text(text))
    print(text)
    return result


def _median(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if len(finite) else None


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.mean(finite)) if len(finite) else None


def report_markdown(result: dict[str, Any]) -> str:
    """``results.md``: context, the table of medians over genes, skipped rows."""
    lines = [
        f"# Gene imputation: `{result['h5ad']}`",
        "",
        f"- query: {result['query']} ({result['n_query_cells']} cells); reference: "
        f"{result['n_reference_cells']} cells; {len(result['genes'])} shared genes in "
        f"{len(result['folds'])} folds (KFold, no shuffle); "
        f"{result['n_constant_genes_left_out']} genes constant in the query left out",
        "- commands: " + "; ".join(f"`{c}`" for c in result["commands"]),
        "",
        "| method | " + " | ".join(f"median {HEADERS[m]}" for m in METRICS) + " | fit s | "
        "predict s (all folds) | settings |",
        "|---|" + "---:|" * (len(METRICS) + 2) + "---|",
    ]
    for name, row in result["rows"].items():
        cells = [_fmt(row["median"][m]) for m in METRICS]
        seconds = [f"{row['fit_seconds']:.0f}", f"{row['predict_seconds']:.1f}"]
        lines.append(f"| {name} | " + " | ".join([*cells, *seconds, row["note"]]) + " |")
    lines += [
        f"| {name} | – | – | – | – | – | – | {why} |" for name, why in result["skipped"].items()
    ]
    lines += [
        "",
        "Per gene over the query cells (predictions clipped at 0): PCC; SSIM of each gene "
        "scaled by its maximum, one global window; RMSE of z-scores; Jensen-Shannon divergence "
        "of the values scaled to sum 1. fit s: training (the model; peers fit per fold, inside "
        "predict s).",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: a problem with the input is one line on stderr and exit status 2."""
    try:
        return bench_common.main(run, argv)
    except subprocess.CalledProcessError as err:  # the CLI has printed its own error above
        print(f"error: {shlex.join(err.cmd)} exited with {err.returncode}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

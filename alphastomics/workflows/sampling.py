"""`sample` of an .h5ad: the request checks, expr_to_pos and pos_to_expr on every slice, and the
one writer of the result and its figure for every mode (impute: :mod:`.impute`, joint:
:mod:`.generate`; a .pt input: :mod:`.pt`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy.spatial import procrustes

from alphastomics.data.anndata import FrameChoice, NormalizeMode, read_h5ad
from alphastomics.data.batch import DataHolder
from alphastomics.data.units import to_user_units
from alphastomics.diffusion_model.sample import SAMPLE_MODES
from alphastomics.errors import UserInputError
from alphastomics.evaluation.figures import (
    MODE_TITLES,
    plot_genes,
    plot_layout,
    plot_layouts,
    plot_tissues,
)
from alphastomics.keys import (
    EXPRESSION,
    EXPRESSION_STD,
    POSITION_SPREAD,
    POSITIONS,
    SLICE_KEY,
    UNS,
)
from alphastomics.training.module import AlphaSTomicsModule
from alphastomics.utils.io import check_output_file, staged_outputs, write_h5ad
from alphastomics.utils.progress import progress_bar
from alphastomics.workflows.generate import NCells, generate_for_file
from alphastomics.workflows.impute import impute_figure, impute_for_file
from alphastomics.workflows.inputs import check_steps, prepare_input, sampling_record

log = logging.getLogger(__name__)


def check_sample_request(
    module: AlphaSTomicsModule, mode: str, steps: int | None, num_samples: int
) -> None:
    """Reject a mode, step count or sample count the checkpoint cannot serve."""
    if mode not in SAMPLE_MODES:
        raise UserInputError(
            f"unknown --sample_mode {mode!r}; use one of {', '.join(SAMPLE_MODES)}"
        )
    trained = module.cfg.training_mode
    serves = {trained, "impute"} if trained == "pos_to_expr" else {trained}
    if trained != "joint" and mode not in serves:
        raise UserInputError(
            f"this checkpoint was trained with training_mode={trained} and cannot sample {mode}; "
            f"use --sample_mode {trained} or a checkpoint trained with training_mode=joint"
        )
    if mode == "impute" and module.cfg.training.p_hide_genes == 0:
        log.warning(
            "this checkpoint was trained without hiding genes (training.p_hide_genes=0), so it "
            "never learned to impute genes from the others; expect poor imputations"
        )
    check_steps(module, steps)
    if num_samples < 1:
        raise UserInputError(f"--num_samples {num_samples} must be >= 1")


def _draw(
    module: AlphaSTomicsModule,
    holder: DataHolder,
    mode: str,
    *,
    sampler: str | None,
    steps: int | None,
    num_samples: int,
    seed: int,
    known: torch.Tensor | None = None,
    in_training_frame: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expression point estimate (N, G), its spread over samples (N, G), positions (K, N, D).

    For ``pos_to_expr`` with ``sampling.expression_estimate: mean`` the point estimate is the
    conditional mean, or the read-out of the model's reference cells for positions
    ``in_training_frame`` (with ``known`` (1, N) measured cells: the neighbour read-out of
    those); otherwise it is the mean of the ``num_samples`` draws.
    """
    use_mean = mode == "pos_to_expr" and module.cfg.sampling.expression_estimate == "mean"
    exprs, poss = [], []
    n_draws = num_samples if (num_samples > 1 or not use_mean) else 0
    for k in range(n_draws):
        generator = torch.Generator(device=module.device).manual_seed(seed + k)
        expr, pos = module.predictor.sample(
            holder,
            mode,
            sampler=sampler,
            steps=steps,
            generator=generator,
            known=known,
            progress=progress_bar,
        )
        exprs.append(expr[0].cpu().numpy())
        poss.append(pos[0].cpu().numpy())
    if use_mean:
        generator = torch.Generator(device=module.device).manual_seed(seed)
        point, pos = module.predictor.sample(
            holder,
            mode,
            generator=generator,
            expression_estimate="mean",
            known=known,
            in_training_frame=in_training_frame,
        )
        poss = poss or [pos[0].cpu().numpy()]
        point = point[0].cpu().numpy()
    else:
        point = np.mean(exprs, axis=0)
    spread = np.std(exprs, axis=0) if len(exprs) > 1 else np.zeros_like(point)
    return point, spread, np.stack(poss)


def measured_cells(adata: ad.AnnData, key: str, source: Path) -> np.ndarray:
    """(N,) bool ``obs[key]``: a bool column, or 0/1 values; anything else is an error."""
    if key not in adata.obs:
        columns = ", ".join(map(str, adata.obs.columns)) or "none"
        raise UserInputError(
            f"{source}: --measured_key {key!r} is not an obs column (obs columns: {columns}); "
            "add a boolean column marking the measured cells"
        )
    values = adata.obs[key].to_numpy()
    if values.dtype == bool:
        return values
    numeric = np.asarray(values, dtype=object)
    if all(isinstance(v, bool | int | float | np.bool_ | np.number) for v in numeric) and set(
        np.unique(numeric.astype(float))
    ) <= {0.0, 1.0}:
        return numeric.astype(float) == 1.0
    raise UserInputError(
        f"{source}: obs[{key!r}] must be boolean (True = measured) or 0/1; found values such as "
        f"{', '.join(map(repr, list(dict.fromkeys(values.tolist()))[:3]))}"
    )


def _aligned_spread(samples: np.ndarray) -> np.ndarray:
    """Per-cell spread (N,) of position samples (K, N, D): RMS distance of each cell's aligned
    positions to their mean, after a Procrustes fit of every sample onto the first."""
    if samples.shape[0] < 2:
        return np.zeros(samples.shape[1], dtype=np.float32)
    ref = samples[0]
    norm = np.linalg.norm(ref - ref.mean(0))
    stack = np.stack([procrustes(ref, other)[1] * norm for other in samples])
    return np.sqrt(((stack - stack.mean(0)) ** 2).sum(-1).mean(0)).astype(np.float32)


def sample_h5ad(
    module: AlphaSTomicsModule,
    input_path: Path,
    output_path: Path,
    *,
    mode: str,
    sampler: str | None,
    steps: int | None,
    num_samples: int,
    seed: int,
    keys: dict[str, str | None],
    min_gene_overlap: float,
    checkpoint: str,
    measured_key: str | None = None,
    normalize: NormalizeMode | None = None,
    n_cells: NCells = None,
    frame: FrameChoice = "auto",
) -> ad.AnnData:
    """Sample every slice of an .h5ad and write the result (see spec §3) atomically.

    ``keys`` (``position_key``, ``slice_key``, ``cell_type_key``, ``layer``) and ``normalize``
    default to the checkpoint's (see :func:`~alphastomics.workflows.inputs.prepare_input`).
    ``measured_key`` (``pos_to_expr`` only) names a boolean ``obs`` column: those cells keep
    their expression and the others of their slice are imputed from them. ``n_cells``
    (``joint`` only) sets the cell count of each generated slice (see :func:`generate_tissue`).
    ``frame``: how coordinates are centred and scaled (:func:`prepare_input`).
    """
    adata = read_h5ad(input_path)
    draw: Callable[[Path], None] | None
    if mode == "impute":
        result, piece = impute_for_file(
            module,
            adata,
            str(input_path),
            keys=keys,
            normalize=normalize,
            min_gene_overlap=min_gene_overlap,
            num_samples=num_samples,
            seed=seed,
            sampler=sampler,
            steps=steps,
            checkpoint=checkpoint,
            frame=frame,
        )
        draw = None if piece is None else partial(impute_figure, result, piece)
        if piece is None:
            log.info("no figure: the input has no positions to draw the genes at")
    elif mode == "joint":
        result, rows = generate_for_file(
            module,
            adata,
            str(input_path),
            n_cells=n_cells,
            sampler=sampler,
            steps=steps,
            num_samples=num_samples,
            seed=seed,
            keys=keys,
            normalize=normalize,
            min_gene_overlap=min_gene_overlap,
            frame=frame,
        )
        result.uns[UNS].update(checkpoint=checkpoint, input=str(input_path))
        title = MODE_TITLES["joint"]
        n_slices = result.obs[SLICE_KEY].nunique()
        if len(rows) < n_slices:
            title += f" (the first {len(rows)} of {n_slices} slices)"
        draw = partial(plot_tissues, rows, title=title)
    else:
        if n_cells is not None:
            raise UserInputError(
                f"--n_cells sets the cell count of generated slices (--sample_mode joint); "
                f"drop it for --sample_mode {mode}"
            )
        measured = None if measured_key is None else measured_cells(adata, measured_key, input_path)
        result, figure_data = sample_anndata(
            module,
            adata,
            mode=mode,
            sampler=sampler,
            steps=steps,
            num_samples=num_samples,
            seed=seed,
            keys=keys,
            min_gene_overlap=min_gene_overlap,
            checkpoint=checkpoint,
            measured=measured,
            measured_key=measured_key,
            normalize=normalize,
            source=str(input_path),
            frame=frame,
        )
        genes = list(module.hparams["gene_names"])
        draw = partial(_figure, figure_data, mode=mode, genes=genes, module=module)
    with staged_outputs() as stage:
        stage.write(output_path, lambda tmp: write_h5ad(result, tmp))
        if draw is not None:
            stage.write(output_path.with_suffix(".png"), draw)
    return result


def sample_anndata(
    module: AlphaSTomicsModule,
    adata: ad.AnnData,
    *,
    mode: str,
    sampler: str | None = None,
    steps: int | None = None,
    num_samples: int = 1,
    seed: int = 0,
    keys: dict[str, str | None] | None = None,
    min_gene_overlap: float = 0.5,
    checkpoint: str = "",
    measured: np.ndarray | None = None,
    measured_key: str | None = None,
    normalize: NormalizeMode | None = None,
    source: str = "input AnnData",
    frame: FrameChoice = "auto",
) -> tuple[ad.AnnData, list]:
    """``expr_to_pos`` or ``pos_to_expr`` on every slice of ``adata``, in memory.

    The result is the input with the outputs of spec §3 beside its own slots (see
    :func:`sample_h5ad`, which writes it); also returns what the figure draws. ``measured``
    ((N,) bool, ``pos_to_expr`` only) marks cells that keep their expression (named
    ``measured_key`` in messages); the others of their slice are imputed from them. ``frame``:
    how coordinates are centred and scaled (:func:`prepare_input`; ``auto``: in the training
    frame of a one-slice or one-volume model when they lie within it).
    """
    keys = keys or {}
    genes = list(module.hparams["gene_names"])
    prepared = prepare_input(
        module,
        adata,
        source,
        keys=keys,
        normalize=normalize,
        min_gene_overlap=min_gene_overlap,
        require_expression=mode != "pos_to_expr" or measured_key is not None,
        require_positions=mode == "pos_to_expr",
        frame_choice=frame,
    )
    slices, missing = prepared.slices, prepared.missing_genes
    share = 1 - len(missing) / len(genes)
    n, g = adata.n_obs, len(genes)
    out_expr = np.zeros((n, g), dtype=np.float32)
    out_std = np.zeros((n, g), dtype=np.float32)
    # positions go back with the input's columns and precision (2D in, 2D out)
    given = adata.obsm.get(prepared.keys["position_key"], None)
    out_dims = module.n_dims if given is None else np.shape(given)[1]
    out_dtype = np.result_type(np.float32, getattr(given, "dtype", np.float32))
    out_pos = np.zeros((n, out_dims), dtype=out_dtype)
    spread = np.zeros(n, dtype=np.float32)
    figure_data = []
    for k, piece in enumerate(slices):
        has_pos = piece.positions is not None
        positions = (
            piece.positions
            if has_pos
            else np.zeros((len(piece.obs_indices), module.n_dims), np.float32)
        )
        holder = piece.batch(module.n_dims)
        known = None
        if measured is not None:
            known = torch.from_numpy(measured[piece.obs_indices]).unsqueeze(0)
            if not bool(known.any()):
                raise UserInputError(
                    f"{source}: slice {piece.name!r} has no cell with obs[{measured_key!r}] "
                    "True; every slice needs measured cells to impute the others from"
                )
        expr_point, expr_spread, pos_k = _draw(
            module,
            holder,
            mode,
            sampler=sampler,
            steps=steps,
            num_samples=num_samples,
            seed=seed + 1000 * k,
            known=known,
            in_training_frame=piece.in_training_frame,
        )
        scale = piece.scale if has_pos else module.data_info.typical_scale
        center = piece.center if has_pos else np.zeros(module.n_dims)
        rows = piece.obs_indices
        out_expr[rows] = expr_point
        out_std[rows] = expr_spread
        out_pos[rows] = to_user_units(pos_k[0], center, scale, out_dims)
        spread[rows] = _aligned_spread(pos_k) * scale
        figure_data.append((piece, positions if has_pos else None, pos_k[0], expr_point))

    record = sampling_record(
        module,
        mode,
        sampler=sampler,
        steps=steps,
        seed=seed,
        num_samples=num_samples,
        source=source,
        checkpoint=checkpoint,
    )
    meta = record | {
        "missing_genes": missing,
        "missing_gene_share": 1 - share,
        "normalization": prepared.normalization or "not read",
        "expression_estimate": module.cfg.sampling.expression_estimate,
        "frames": {
            piece.name: "training" if piece.in_training_frame else "own"
            for piece in slices
            if piece.positions is not None
        },
    }
    if mode == "pos_to_expr" and measured is None:
        predictor = module.predictor
        meta["expression_from"] = {
            piece.name: predictor.expression_source(piece.in_training_frame) for piece in slices
        }
    if mode == "expr_to_pos":  # how far each cell followed the cells alike in expression
        meta["consensus"] = module.cfg.sampling.consensus
        meta["consensus_neighbors"] = module.cfg.sampling.consensus_neighbors
    if measured is not None:
        meta["measured_key"] = measured_key
        meta["n_measured"] = int(measured.sum())
        meta["imputed_by"] = (
            "neighbour read-out" if module.predictor.imputes_from_neighbors else "inpainting"
        )
    result = _result_anndata(adata, genes, mode, out_expr, out_std, out_pos, spread, num_samples)
    meta["expression_key"] = _expression_key(result, mode)
    result.uns[UNS] = meta
    return result, figure_data


def _expression_key(result: ad.AnnData, mode: str) -> str | None:
    if mode == "pos_to_expr":
        return f"layers/{EXPRESSION}" if EXPRESSION in result.layers else f"obsm/{EXPRESSION}"
    return None


def _result_anndata(
    adata: ad.AnnData,
    genes: list[str],
    mode: str,
    expr: np.ndarray,
    expr_std: np.ndarray,
    pos: np.ndarray,
    spread: np.ndarray,
    num_samples: int,
) -> ad.AnnData:
    """The input with our results beside its own X, obs, var, uns, obsm and layers."""
    out = adata.copy()
    if mode == "expr_to_pos":
        out.obsm[POSITIONS] = pos
        if num_samples > 1:
            out.obs[POSITION_SPREAD] = spread
        return out
    results = {EXPRESSION: expr}
    if num_samples > 1:
        results[EXPRESSION_STD] = expr_std
    same_genes = list(map(str, adata.var_names)) == genes
    for key, values in results.items():
        if same_genes:
            out.layers[key] = values
        else:  # the input's genes are not the model's: a table on the model's genes
            out.obsm[key] = pd.DataFrame(values, index=out.obs_names, columns=genes)
    return out


def _figure(
    figure_data: list, path: Path, *, mode: str, genes: list[str], module: AlphaSTomicsModule
) -> None:
    """The figure of the first slice (``expr_to_pos``, ``pos_to_expr``): truth beside the
    result where there is one."""
    piece, true_pos, pos0, expr = figure_data[0]
    names = module.data_info.cell_types
    labels = None
    if piece.cell_type is not None and names and (piece.cell_type >= 0).any():
        labels = np.array(
            [names[c] if c >= 0 else "unknown" for c in piece.cell_type], dtype=object
        )
    title = f"{piece.name}: {MODE_TITLES[mode]}"
    if mode == "pos_to_expr":
        truth = piece.expression if piece.gene_mask.any() else None
        plot_genes(true_pos, truth, expr, genes, path, gene_mask=piece.gene_mask, title=title)
        return
    if true_pos is not None:
        plot_layouts(true_pos, pos0, path, cell_types=labels, title=title)
    else:
        plot_layout(pos0, path, cell_types=labels, title=title)


def default_output(input_path: Path, mode: str) -> Path:
    """``INPUT_alphastomics_MODE.h5ad`` (or ``.pt``) beside the input."""
    return input_path.with_name(f"{input_path.stem}_alphastomics_{mode}{input_path.suffix}")


def validate_output(path: Path, input_path: Path, overwrite: bool) -> Path:
    """Output must not replace the input, must have the input's suffix, and its folder must exist."""
    if path.resolve() == input_path.resolve():
        raise UserInputError(f"--output {path} is the input file; choose another path")
    if path.suffix != input_path.suffix:
        raise UserInputError(
            f"--output {path}: a {input_path.suffix} input gives a {input_path.suffix} output; "
            f"name it *{input_path.suffix}"
        )
    return check_output_file(path, overwrite=overwrite)

"""`sample`: conditional or joint generation from an .h5ad (AnnData out) or a .pt (tensors out)."""

from __future__ import annotations

import logging
from copy import deepcopy
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy.spatial import procrustes
from sklearn.neighbors import KNeighborsClassifier

from alphastomics import __version__
from alphastomics.data.anndata import MIN_SLICE_CELLS, NormalizeMode, PreparedSlice, read_h5ad
from alphastomics.data.batch import DataHolder
from alphastomics.data.units import to_user_units
from alphastomics.diffusion_model.sample import SAMPLE_MODES
from alphastomics.errors import UserInputError
from alphastomics.evaluation.figures import (
    MODE_TITLES,
    TissuePanel,
    plot_genes,
    plot_layout,
    plot_layouts,
    plot_tissues,
)
from alphastomics.keys import (
    EXPRESSION,
    EXPRESSION_STD,
    GENERATED_POSITIONS,
    IMPUTED,
    POSITION_SPREAD,
    POSITIONS,
    PREDICTED_CELL_TYPE,
    REFERENCE_SLICE,
    SLICE_KEY,
    UNS,
)
from alphastomics.training.module import AlphaSTomicsModule
from alphastomics.utils.io import atomic_write, check_output_file, staged_outputs, write_h5ad
from alphastomics.workflows.inputs import check_steps, prepare_input

log = logging.getLogger(__name__)

NCells = int | dict[str, int] | None  # joint: cells per generated slice, for all or by name
_N_CELLS_EXAMPLE = "e.g. --n_cells 2000, or per slice --n_cells embryo3_z2=2483,embryo3_z5=2124"
_MAX_FIGURE_ROWS = 6  # generated slices drawn in the joint figure


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expression point estimate (N, G), its spread over samples (N, G), positions (K, N, D).

    For ``pos_to_expr`` with ``sampling.expression_estimate: mean`` the point estimate is the
    conditional mean (with ``known`` (1, N) measured cells: the neighbour read-out); otherwise
    it is the mean of the ``num_samples`` draws.
    """
    use_mean = mode == "pos_to_expr" and module.cfg.sampling.expression_estimate == "mean"
    exprs, poss = [], []
    n_draws = num_samples if (num_samples > 1 or not use_mean) else 0
    for k in range(n_draws):
        generator = torch.Generator(device=module.device).manual_seed(seed + k)
        expr, pos = module.sample(
            holder,
            mode,
            sampler=sampler,
            steps=steps,
            generator=generator,
            known=known,
            show_progress=True,
        )
        exprs.append(expr[0].cpu().numpy())
        poss.append(pos[0].cpu().numpy())
    if use_mean:
        generator = torch.Generator(device=module.device).manual_seed(seed)
        point, pos = module.sample(
            holder, mode, generator=generator, expression_estimate="mean", known=known
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
) -> ad.AnnData:
    """Sample every slice of an .h5ad and write the result (see spec §3) atomically.

    ``keys`` (``position_key``, ``slice_key``, ``cell_type_key``, ``layer``) and ``normalize``
    default to the checkpoint's (see :func:`~alphastomics.workflows.inputs.prepare_input`).
    ``measured_key`` (``pos_to_expr`` only) names a boolean ``obs`` column: those cells keep
    their expression and the others of their slice are imputed from them. ``n_cells``
    (``joint`` only) sets the cell count of each generated slice (see :func:`generate_tissue`).
    """
    adata = read_h5ad(input_path)
    if mode == "impute":
        result, figure_slice = _impute(
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
        )
        with staged_outputs() as stage:
            stage.write(output_path, lambda tmp: write_h5ad(result, tmp))
            if figure_slice is not None:
                figure = output_path.with_suffix(".png")
                stage.write(figure, lambda tmp: _impute_figure(result, figure_slice, tmp))
            else:
                log.info("no figure: the input has no positions to draw the genes at")
        return result
    if mode == "joint":
        tissue, rows = _generate(
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
        )
        tissue.uns[UNS].update(checkpoint=checkpoint, input=str(input_path))
        title = MODE_TITLES["joint"]
        if len(rows) < tissue.obs[SLICE_KEY].nunique():
            title += f" (the first {len(rows)} of {tissue.obs['slice'].nunique()} slices)"
        with staged_outputs() as stage:
            stage.write(output_path, lambda tmp: write_h5ad(tissue, tmp))
            figure = output_path.with_suffix(".png")
            stage.write(figure, lambda tmp: plot_tissues(rows, tmp, title=title))
        return tissue
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
    )
    genes = list(module.hparams["gene_names"])
    with staged_outputs() as stage:
        stage.write(output_path, lambda tmp: write_h5ad(result, tmp))
        figure = output_path.with_suffix(".png")
        stage.write(figure, lambda tmp: _figure(figure_data, tmp, mode, genes, module))
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
) -> tuple[ad.AnnData, list]:
    """``expr_to_pos`` or ``pos_to_expr`` on every slice of ``adata``, in memory.

    The result is the input with the outputs of spec §3 beside its own slots (see
    :func:`sample_h5ad`, which writes it); also returns what the figure draws. ``measured``
    ((N,) bool, ``pos_to_expr`` only) marks cells that keep their expression (named
    ``measured_key`` in messages); the others of their slice are imputed from them.
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
    )
    slices, missing = prepared.slices, prepared.missing_genes
    share = 1 - len(missing) / len(genes)
    info = module.hparams.get("data_info", {})
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
        holder = DataHolder.from_arrays(piece.expression, positions, gene_mask=piece.gene_mask)
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
        )
        scale = piece.scale if has_pos else info.get("typical_scale", 1.0)
        center = piece.center if has_pos else np.zeros(module.n_dims)
        rows = piece.obs_indices
        out_expr[rows] = expr_point
        out_std[rows] = expr_spread
        out_pos[rows] = to_user_units(pos_k[0], center, scale, out_dims)
        spread[rows] = _aligned_spread(pos_k) * scale
        figure_data.append((piece, positions if has_pos else None, pos_k[0], expr_point))

    meta = {
        "mode": mode,
        "sampler": sampler or module.cfg.sampling.sampler,
        "steps": steps or module.cfg.sampling.steps,
        "seed": seed,
        "num_samples": num_samples,
        "checkpoint": checkpoint,
        "version": __version__,
        "input": source,
        "missing_genes": missing,
        "missing_gene_share": 1 - share,
        "normalization": prepared.normalization or "not read",
        "expression_estimate": module.cfg.sampling.expression_estimate,
    }
    if measured is not None:
        meta["measured_key"] = measured_key
        meta["n_measured"] = int(measured.sum())
        meta["imputed_by"] = "neighbour read-out" if module.imputes_from_neighbors else "inpainting"
    result = _result_anndata(adata, genes, mode, out_expr, out_std, out_pos, spread, num_samples)
    meta["expression_key"] = _expression_key(result, mode)
    result.uns[UNS] = meta
    return result, figure_data


def impute_anndata(
    module: AlphaSTomicsModule,
    adata: ad.AnnData,
    *,
    source: str = "input AnnData",
    keys: dict[str, str | None] | None = None,
    normalize: NormalizeMode | None = None,
    min_gene_overlap: float = 0.0,
    num_samples: int = 1,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
) -> ad.AnnData:
    """Impute every model gene ``adata`` lacks from the genes it has and its positions.

    The Python form of ``alphastomics sample --sample_mode impute`` (without files): genes are
    matched to the model's by name, expression is normalised as at training (see
    :func:`~alphastomics.workflows.inputs.prepare_input`), each slice is imputed by
    :meth:`AlphaSTomicsModule.impute`. Without coordinates under the position key (the
    checkpoint's unless ``keys["position_key"]`` names one, which must then exist), genes are
    imputed from expression alone, and ``uns["alphastomics"]["positions"]`` says so.

    Returns
    -------
    anndata.AnnData
        The input's cells (``obs``, ``obsm``, ``obsp``, ``uns`` kept) on the model's G genes:
        ``X`` and ``layers["alphastomics_expression"]`` (N, G) log-normalised, measured genes
        as given and the others imputed (the conditional mean unless
        ``sampling.expression_estimate`` is ``sample``); with ``num_samples`` K > 1 also
        ``layers["alphastomics_expression_std"]``, the spread of K draws;
        ``var["alphastomics_imputed"]``; ``uns["alphastomics"]``.
    """
    result, _ = _impute(
        module,
        adata,
        source,
        keys=keys or {},
        normalize=normalize,
        min_gene_overlap=min_gene_overlap,
        num_samples=num_samples,
        seed=seed,
        sampler=sampler,
        steps=steps,
        checkpoint=None,
    )
    return result


def _impute(
    module: AlphaSTomicsModule,
    adata: ad.AnnData,
    source: str,
    *,
    keys: dict[str, str | None],
    normalize: NormalizeMode | None,
    min_gene_overlap: float,
    num_samples: int,
    seed: int,
    sampler: str | None,
    steps: int | None,
    checkpoint: str | None,
) -> tuple[ad.AnnData, PreparedSlice | None]:
    """The imputed AnnData, and the slice to draw (None without positions)."""
    genes = list(module.hparams["gene_names"])
    prepared = prepare_input(
        module,
        adata,
        source,
        keys=keys,
        normalize=normalize,
        min_gene_overlap=min_gene_overlap,
        require_expression=True,
        require_positions=keys.get("position_key") is not None,
    )
    if not prepared.missing_genes:
        raise UserInputError(
            f"{source} has all {len(genes)} of the model's genes, so --sample_mode impute has "
            "nothing to impute; pass a file without the genes to impute, or use --sample_mode "
            "pos_to_expr (expression from positions) or expr_to_pos"
        )
    slices = prepared.slices
    has_positions = slices[0].positions is not None
    position_key = prepared.keys["position_key"]
    if not has_positions:
        log.warning(
            "%s has no coordinates in adata.obsm[%r]: imputing from expression alone (pass "
            "--position_key to use coordinates)",
            source,
            position_key,
        )
    estimate = module.cfg.sampling.expression_estimate
    n_draws = num_samples if (num_samples > 1 or estimate == "sample") else 0
    out = np.zeros((adata.n_obs, len(genes)), dtype=np.float32)
    spread = np.zeros_like(out) if num_samples > 1 else None
    for k, piece in enumerate(slices):
        positions = piece.positions
        if positions is None:
            positions = np.zeros((len(piece.obs_indices), module.n_dims), np.float32)
        holder = DataHolder.from_arrays(piece.expression, positions, gene_mask=piece.gene_mask)
        common = {"use_positions": has_positions, "sampler": sampler, "steps": steps}
        draws = []
        for d in range(n_draws):
            generator = torch.Generator(device=module.device).manual_seed(seed + 1000 * k + d)
            draw = module.impute(
                holder, expression_estimate="sample", generator=generator, **common
            )
            draws.append(draw[0].cpu().numpy())
        if estimate == "mean":
            generator = torch.Generator(device=module.device).manual_seed(seed + 1000 * k)
            point = module.impute(holder, generator=generator, **common)[0].cpu().numpy()
        else:
            point = np.mean(draws, axis=0)
        out[piece.obs_indices] = point
        if spread is not None:
            spread[piece.obs_indices] = np.std(draws, axis=0)

    missing = set(prepared.missing_genes)
    imputed = np.array([g for g in genes if g in missing], dtype=object)
    not_in_model = sorted(set(map(str, adata.var_names)) - set(genes))
    if not_in_model:
        log.info(
            "%d genes of %s are not among the model's genes; the output has the model's %d",
            len(not_in_model),
            source,
            len(genes),
        )
    var = pd.DataFrame({IMPUTED: [g in missing for g in genes]}, index=genes)
    result = ad.AnnData(X=out, obs=adata.obs.copy(), var=var, uns=deepcopy(dict(adata.uns)))
    for key, value in adata.obsm.items():
        result.obsm[key] = value
    for key, value in adata.obsp.items():
        result.obsp[key] = value
    result.layers[EXPRESSION] = out
    if spread is not None:
        result.layers[EXPRESSION_STD] = spread
    result.uns[UNS] = {
        "mode": "impute",
        "sampler": sampler or module.cfg.sampling.sampler,
        "steps": steps or module.cfg.sampling.steps,
        "seed": seed,
        "num_samples": num_samples,
        "checkpoint": checkpoint or "",
        "version": __version__,
        "input": source,
        "imputed_genes": imputed.tolist(),
        "n_measured_genes": len(genes) - len(imputed),
        "genes_not_in_model": not_in_model,
        "positions": f"adata.obsm[{position_key!r}]"
        if has_positions
        else f"none (no adata.obsm[{position_key!r}]): imputed from expression alone",
        "normalization": prepared.normalization or "not read",
        "expression_estimate": estimate,
        "expression_key": f"layers/{EXPRESSION}",
    }
    return result, slices[0] if has_positions else None


def _impute_figure(result: ad.AnnData, piece: PreparedSlice, path: Path) -> None:
    """Imputed genes of the first slice, drawn at its positions."""
    imputed = result.var[IMPUTED].to_numpy(dtype=bool)
    names = [str(g) for g in result.var_names[imputed]]
    expr = result.layers[EXPRESSION][piece.obs_indices][:, imputed]
    title = f"{piece.name}: {MODE_TITLES['impute']}"
    plot_genes(piece.positions, None, expr, names, path, title=title)


def parse_n_cells(text: str) -> int | dict[str, int]:
    """``--n_cells``: one count for every generated slice (``2000``) or counts per reference
    slice (``NAME=COUNT,NAME=COUNT``); anything else is a UserInputError."""

    def count(value: str, where: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise UserInputError(
                f"--n_cells {where}: {value.strip()!r} is not a whole number of cells; "
                f"{_N_CELLS_EXAMPLE}"
            ) from None
        if n < MIN_SLICE_CELLS:
            raise UserInputError(
                f"--n_cells {where}: {n} cells; every slice needs at least {MIN_SLICE_CELLS}"
            )
        return n

    if "=" not in text:
        return count(text, text)
    counts: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserInputError(
                f"--n_cells {text}: {item!r} is not NAME=COUNT; {_N_CELLS_EXAMPLE}"
            )
        if name in counts:
            raise UserInputError(f"--n_cells {text}: slice {name!r} is listed twice")
        counts[name] = count(value, item)
    return counts


def _slice_counts(n_cells: NCells, slices: list[PreparedSlice], source: str) -> list[int]:
    """Cells to generate per reference slice: the reference's count unless ``n_cells`` says."""
    if n_cells is None:
        return [piece.n_cells for piece in slices]
    if isinstance(n_cells, int):
        if n_cells < MIN_SLICE_CELLS:
            raise UserInputError(
                f"--n_cells {n_cells}: every slice needs at least {MIN_SLICE_CELLS} cells"
            )
        return [n_cells] * len(slices)
    names = [piece.name for piece in slices]
    unknown = [name for name in n_cells if name not in names]
    if unknown:
        raise UserInputError(
            f"--n_cells names slice {unknown[0]!r}, which is not in {source} (its slices: "
            f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''}); name the "
            "reference's slices, or give one count for all"
        )
    too_few = {name: n for name, n in n_cells.items() if n < MIN_SLICE_CELLS}
    if too_few:
        name, n = next(iter(too_few.items()))
        raise UserInputError(
            f"--n_cells {name}={n}: every slice needs at least {MIN_SLICE_CELLS} cells"
        )
    return [n_cells.get(piece.name, piece.n_cells) for piece in slices]


def predict_cell_types(
    piece: PreparedSlice, generated: np.ndarray, names: list[str], k: int = 15
) -> np.ndarray:
    """(N,) object: cell type of each generated cell, by majority among its ``k`` nearest
    labelled reference cells in measured-gene expression (None without labels)."""
    labelled = piece.cell_type >= 0
    if not names or not labelled.any() or not piece.gene_mask.any():
        return np.full(len(generated), None, dtype=object)
    genes = piece.gene_mask
    classifier = KNeighborsClassifier(n_neighbors=min(k, int(labelled.sum())))
    classifier.fit(piece.expression[labelled][:, genes], piece.cell_type[labelled])
    codes = classifier.predict(generated[:, genes])
    return np.array([names[c] for c in codes], dtype=object)


def generate_tissue(
    module: AlphaSTomicsModule,
    reference: ad.AnnData,
    *,
    n_cells: NCells = None,
    sampler: str | None = None,
    steps: int | None = None,
    num_samples: int = 1,
    seed: int = 0,
    keys: dict[str, str | None] | None = None,
    normalize: NormalizeMode | None = None,
    min_gene_overlap: float = 0.5,
    source: str = "the reference AnnData",
) -> ad.AnnData:
    """Generate a virtual tissue (``joint``: expression and positions from noise) for each
    slice of ``reference``, all in one new AnnData.

    A reference slice gives only the cell count (unless ``n_cells`` says otherwise) and the
    extent: positions come back at the slice's centre and scale (its size; more or fewer
    cells fill it more or less densely; a reference without positions gets the training
    slices' median scale). Its expression labels the generated cells with a predicted cell
    type (:func:`predict_cell_types`) and is never read by the generation itself, which
    generates every model gene.

    Parameters
    ----------
    module
        A trained model (``training_mode: joint``).
    reference
        AnnData with one or more slices (``slice_key``), prepared as ``sample`` prepares its
        input (:func:`~alphastomics.workflows.inputs.prepare_input`, with ``keys``,
        ``normalize`` and ``min_gene_overlap``).
    n_cells
        Cells per generated slice: one count for every slice, or ``{slice name: count}``
        (slices not named keep the reference's count). At least 3.
    sampler, steps
        As for :meth:`AlphaSTomicsModule.sample` (default: the checkpoint's).
    num_samples
        Tissues generated per reference slice; with K > 1 each is its own slice
        ``NAME_sample<k>``.
    seed
        Slice ``i`` (in the reference's order), draw ``k`` uses seed ``seed + 1000 i + k``.
    source
        Name of the reference in messages.

    Returns
    -------
    AnnData
        Generated cells: ``X`` log-normalised expression on the model's genes,
        ``obsm["spatial"]`` positions in the reference's units and columns,
        ``obs["slice"]`` the generated slice, ``obs["alphastomics_reference_slice"]`` the
        reference slice it was made for, ``obs["alphastomics_predicted_cell_type"]`` (with
        labelled reference cells), ``uns["alphastomics"]`` what was done, per slice too; the
        reference's ``uns`` and gene annotations are kept.
    """
    tissue, _ = _generate(
        module,
        reference,
        source,
        n_cells=n_cells,
        sampler=sampler,
        steps=steps,
        num_samples=num_samples,
        seed=seed,
        keys=keys,
        normalize=normalize,
        min_gene_overlap=min_gene_overlap,
    )
    return tissue


def _generate(
    module: AlphaSTomicsModule,
    reference: ad.AnnData,
    source: str,
    *,
    n_cells: NCells,
    sampler: str | None,
    steps: int | None,
    num_samples: int,
    seed: int,
    keys: dict[str, str | None] | None,
    normalize: NormalizeMode | None,
    min_gene_overlap: float,
) -> tuple[ad.AnnData, list[list[TissuePanel]]]:
    """:func:`generate_tissue`, and the rows of its figure (reference beside generated)."""
    if num_samples < 1:
        raise UserInputError(f"--num_samples {num_samples} must be >= 1")
    prepared = prepare_input(
        module,
        reference,
        source,
        keys=keys,
        normalize=normalize,
        min_gene_overlap=min_gene_overlap,
        require_expression=True,
        require_positions=False,
    )
    counts = _slice_counts(n_cells, prepared.slices, source)
    genes = list(module.hparams["gene_names"])
    info = module.hparams.get("data_info", {})
    type_names = list(info.get("cell_types") or [])
    given = reference.obsm.get(prepared.keys["position_key"], None)
    out_dims = module.n_dims if given is None else np.shape(given)[1]
    out_dtype = np.result_type(np.float32, getattr(given, "dtype", np.float32))
    exprs, poss, slice_of, reference_of, predicted = [], [], [], [], []
    per_slice: dict[str, dict[str, Any]] = {}
    rows: list[list[TissuePanel]] = []
    for i, (piece, n) in enumerate(zip(prepared.slices, counts, strict=True)):
        has_pos = piece.positions is not None
        scale = piece.scale if has_pos else info.get("typical_scale", 1.0)
        center = piece.center if has_pos else np.zeros(module.n_dims)
        # only the shapes are read: joint generation starts from noise, on every gene
        holder = DataHolder.from_arrays(
            np.zeros((n, len(genes)), np.float32), np.zeros((n, module.n_dims), np.float32)
        )
        for k in range(num_samples):
            generator = torch.Generator(device=module.device).manual_seed(seed + 1000 * i + k)
            expr, pos = module.sample(
                holder,
                "joint",
                sampler=sampler,
                steps=steps,
                generator=generator,
                show_progress=True,
            )
            expr = expr[0].cpu().numpy()
            pos = to_user_units(pos[0].cpu().numpy(), center, scale, out_dims)
            name = piece.name if num_samples == 1 else f"{piece.name}_sample{k}"
            types = predict_cell_types(piece, expr, type_names)
            exprs.append(expr)
            poss.append(pos.astype(out_dtype))
            slice_of += [name] * n
            reference_of += [piece.name] * n
            predicted.append(types)
            per_slice[name] = {
                "reference_slice": piece.name,
                "n_cells": n,
                "reference_n_cells": piece.n_cells,
                "scale": float(scale),
                "seed": seed + 1000 * i + k,
            }
            if len(rows) < _MAX_FIGURE_ROWS:
                rows.append(_figure_row(piece, given, type_names, name, pos, types))
    obs = pd.DataFrame(
        {
            SLICE_KEY: pd.Categorical(slice_of, categories=list(per_slice)),
            REFERENCE_SLICE: pd.Categorical(
                reference_of, categories=[p.name for p in prepared.slices]
            ),
        },
        index=[f"generated_{i}" for i in range(len(slice_of))],
    )
    types = np.concatenate(predicted)
    if any(t is not None for t in types):
        obs[PREDICTED_CELL_TYPE] = pd.Categorical(types)
    known = set(map(str, reference.var_names))
    var = reference.var.reindex(genes) if known >= set(genes) else pd.DataFrame(index=genes)
    tissue = ad.AnnData(
        X=np.concatenate(exprs), obs=obs, var=var, uns=deepcopy(dict(reference.uns))
    )
    tissue.obsm[GENERATED_POSITIONS] = np.concatenate(poss)
    tissue.uns[UNS] = {
        "mode": "joint",
        "sampler": sampler or module.cfg.sampling.sampler,
        "steps": steps or module.cfg.sampling.steps,
        "seed": seed,
        "num_samples": num_samples,
        "version": __version__,
        "input": source,
        "missing_genes": prepared.missing_genes,
        "missing_gene_share": len(prepared.missing_genes) / len(genes),
        "normalization": prepared.normalization or "not read",
        "expression_key": "X",
        "slices": per_slice,
    }
    return tissue, rows


def _figure_row(
    piece: PreparedSlice,
    given: Any,
    type_names: list[str],
    name: str,
    generated_pos: np.ndarray,
    generated_types: np.ndarray,
) -> list[TissuePanel]:
    """Panels of one generated slice: its reference (when it has positions) and itself, each
    coloured by cell type where types are known (the reference's own, the predicted ones)."""
    panel = TissuePanel(
        f"{name}: generated",
        generated_pos,
        generated_types if any(t is not None for t in generated_types) else None,
    )
    if piece.positions is None or given is None:
        return [panel]
    labels = None
    if type_names and (piece.cell_type >= 0).any():
        labels = np.array(
            [type_names[c] if c >= 0 else "unknown" for c in piece.cell_type], dtype=object
        )
    ref_pos = np.asarray(given)[piece.obs_indices]
    return [TissuePanel(f"{piece.name}: reference", ref_pos, labels), panel]


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
    figure_data: list, path: Path, mode: str, genes: list[str], module: AlphaSTomicsModule
) -> None:
    """The figure of the first slice (``expr_to_pos``, ``pos_to_expr``): truth beside the
    result where there is one."""
    piece, true_pos, pos0, expr = figure_data[0]
    names = module.hparams.get("data_info", {}).get("cell_types") or []
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


def read_pt(input_path: Path, module: AlphaSTomicsModule) -> tuple[DataHolder, int]:
    """A checked batch from a ``.pt`` input, and the input's number of coordinate columns.

    The same checks as for an ``.h5ad``: shapes, the checkpoint's gene count, finite values in
    every real cell, at least ``MIN_SLICE_CELLS`` real cells per item. 2-column positions get
    z = 0.
    """
    try:
        data = torch.load(input_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserInputError(
            f"{input_path} is not a readable .pt file ({type(err).__name__})"
        ) from err
    required = ("expression", "positions", "node_mask")
    if not isinstance(data, dict) or any(k not in data for k in required):
        raise UserInputError(f"{input_path} must hold a dict with keys {', '.join(required)}")
    try:
        expr, pos, mask = (torch.as_tensor(data[k]) for k in required)
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserInputError(
            f"{input_path}: expression, positions and node_mask must be tensors or arrays"
        ) from err
    if expr.dim() == 2 and pos.dim() == 2 and mask.dim() == 1:
        expr, pos, mask = expr[None], pos[None], mask[None]
    n_genes, n_dims = int(module.hparams["num_genes"]), int(module.hparams.get("n_dims", 3))
    if expr.dim() != 3 or pos.dim() != 3 or mask.dim() != 2:
        raise UserInputError(
            f"{input_path}: expected expression (B, N, G), positions (B, N, D), node_mask (B, N) "
            f"(or without B); got {tuple(expr.shape)}, {tuple(pos.shape)}, {tuple(mask.shape)}"
        )
    if pos.shape[:2] != expr.shape[:2] or mask.shape != expr.shape[:2]:
        raise UserInputError(
            f"{input_path}: expression {tuple(expr.shape)}, positions {tuple(pos.shape)} and "
            f"node_mask {tuple(mask.shape)} must agree on (B, N)"
        )
    input_dims = pos.shape[-1]
    if input_dims not in (2, n_dims) or input_dims > n_dims:
        raise UserInputError(
            f"{input_path}: positions have {input_dims} columns; expected 2 or {n_dims} (x, y[, z])"
        )
    if expr.shape[-1] != n_genes:
        raise UserInputError(
            f"{input_path}: expression has {expr.shape[-1]} genes, the checkpoint {n_genes}; "
            "reorder it on the checkpoint's gene list"
        )
    for name, value in (("expression", expr), ("positions", pos), ("node_mask", mask)):
        if value.is_complex():
            raise UserInputError(f"{input_path}: {name} is complex; expected real numbers")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise UserInputError(f"{input_path}: node_mask must be boolean (or 0/1)")
        mask = mask == 1
    expr, pos = expr.double(), pos.double()
    for name, value in (("expression", expr), ("positions", pos)):
        bad = (~torch.isfinite(value)).any(-1) & mask  # (B, N) real cells with NaN or inf
        if bool(bad.any()):
            item = int(bad.any(-1).nonzero()[0])
            n_bad = int(bad.sum())
            raise UserInputError(
                f"{input_path}: {n_bad} real {'cell has' if n_bad == 1 else 'cells have'} NaN "
                f"or infinite values in {name!r} (first in item {item}); drop those cells "
                "(node_mask False) or fix them"
            )
    too_small = (mask.sum(-1) < MIN_SLICE_CELLS).nonzero().flatten().tolist()
    if too_small:
        raise UserInputError(
            f"{input_path}: item {too_small[0]} has {int(mask[too_small[0]].sum())} real cells "
            f"(node_mask True); every item needs at least {MIN_SLICE_CELLS}"
        )
    if input_dims < n_dims:
        pos = torch.cat([pos, pos.new_zeros(*pos.shape[:2], n_dims - input_dims)], dim=-1)
    # padded cells are never read; zero them so NaN there cannot reach the network
    expr = torch.where(mask[..., None], expr, 0.0)
    pos = torch.where(mask[..., None], pos, 0.0)
    holder = DataHolder(expression=expr.float(), positions=pos.float(), node_mask=mask)
    return holder, input_dims


def sample_pt(
    module: AlphaSTomicsModule,
    input_path: Path,
    output_path: Path,
    *,
    mode: str,
    sampler: str | None,
    steps: int | None,
    num_samples: int,
    seed: int,
) -> dict[str, Any]:
    """Sample a ``.pt`` dict of tensors in model units (log-normalised, scaled) to a ``.pt``.

    Positions with 2 columns are read with z = 0 and written back with 2 columns.
    """
    holder, input_dims = read_pt(input_path, module)
    exprs, poss = [], []
    for k in range(num_samples):
        generator = torch.Generator(device=module.device).manual_seed(seed + k)
        e, p = module.sample(holder, mode, sampler=sampler, steps=steps, generator=generator)
        exprs.append(e.cpu())
        poss.append(p.cpu())
    poss = [p[..., :input_dims] for p in poss]
    out = {
        "expression": exprs[0] if num_samples == 1 else torch.stack(exprs),
        "positions": poss[0] if num_samples == 1 else torch.stack(poss),
        "node_mask": holder.node_mask,
        "mode": mode,
        "version": __version__,
    }
    atomic_write(output_path, lambda tmp: torch.save(out, tmp))
    return out


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

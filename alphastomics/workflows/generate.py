"""`sample --sample_mode joint`: virtual tissue, one generated slice per reference slice."""

from __future__ import annotations

import logging
from copy import deepcopy
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from sklearn.neighbors import KNeighborsClassifier

from alphastomics.data.anndata import MIN_SLICE_CELLS, FrameChoice, NormalizeMode, PreparedSlice
from alphastomics.data.batch import DataHolder
from alphastomics.data.units import to_user_units
from alphastomics.diffusion_model.observation import N_NEIGHBORS
from alphastomics.errors import UserInputError
from alphastomics.evaluation.figures import TissuePanel
from alphastomics.keys import (
    DENOISED_EXPRESSION,
    GENERATED_POSITIONS,
    PREDICTED_CELL_TYPE,
    REFERENCE_SLICE,
    SLICE_KEY,
    UNS,
)
from alphastomics.training.module import AlphaSTomicsModule
from alphastomics.utils.progress import progress_bar
from alphastomics.workflows.inputs import prepare_input, sampling_record

log = logging.getLogger(__name__)

NCells = int | dict[str, int] | None  # joint: cells per generated slice, for all or by name
_N_CELLS_EXAMPLE = "e.g. --n_cells 2000, or per slice --n_cells embryo3_z2=2483,embryo3_z5=2124"
_MAX_FIGURE_ROWS = 6  # generated slices drawn in the joint figure


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
    expression_start: float | None = None,
) -> ad.AnnData:
    """Generate a virtual tissue (``joint``: expression and positions together) for each
    slice of ``reference``, all in one new AnnData.

    Positions start from noise. Expression starts from training cells stored in the
    checkpoint, drawn at random and noised to step ``expression_start * T``, so the mix of
    cell types is the training data's while each cell's state is generated anew (0: from
    noise, as do checkpoints without stored cells). A reference slice gives only the cell
    count (unless ``n_cells`` says otherwise) and the extent: positions come back at the
    slice's centre and scale (its size; more or fewer cells fill it more or less densely; a
    reference without positions gets the training slices' median scale). Its expression
    labels the generated cells with a predicted cell type (:func:`predict_cell_types`) and is
    never read by the generation itself, which generates every model gene.

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
        As for :meth:`~alphastomics.diffusion_model.predict.Predictor.sample` (default: the checkpoint's).
    num_samples
        Tissues generated per reference slice; with K > 1 each is its own slice
        ``NAME_sample<k>``.
    seed
        Slice ``i`` (in the reference's order), draw ``k`` uses seed ``seed + 1000 i + k``.
    source
        Name of the reference in messages.
    expression_start
        In [0, 1); default the checkpoint's ``sampling.expression_start``.

    Returns
    -------
    AnnData
        Generated cells: ``X`` log-normalised expression on the model's genes, measurement-like
        (each gene drawn from training cells near the cell's state:
        :class:`~alphastomics.diffusion_model.observation.ObservationModel`),
        ``layers["alphastomics_denoised"]`` the denoised expression states,
        ``obsm["spatial"]`` positions in the reference's units and columns,
        ``obs["slice"]`` the generated slice, ``obs["alphastomics_reference_slice"]`` the
        reference slice it was made for, ``obs["alphastomics_predicted_cell_type"]`` (with
        labelled reference cells), ``uns["alphastomics"]`` what was done, per slice too; the
        reference's ``uns`` and gene annotations are kept.
    """
    tissue, _ = generate_for_file(
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
        expression_start=expression_start,
    )
    return tissue


def generate_for_file(
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
    expression_start: float | None = None,
    frame: FrameChoice = "auto",
) -> tuple[ad.AnnData, list[list[TissuePanel]]]:
    """:func:`generate_tissue`, and the rows of its figure (reference beside generated);
    ``frame``: how the reference's coordinates are read (:func:`prepare_input`)."""
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
        frame_choice=frame,
    )
    counts = _slice_counts(n_cells, prepared.slices, source)
    genes = list(module.hparams["gene_names"])
    type_names = module.data_info.cell_types
    given = reference.obsm.get(prepared.keys["position_key"], None)
    out_dims = module.n_dims if given is None else np.shape(given)[1]
    out_dtype = np.result_type(np.float32, getattr(given, "dtype", np.float32))
    if expression_start is None:
        expression_start = module.cfg.sampling.expression_start
    if not 0 <= expression_start < 1:
        raise UserInputError(
            f"expression_start {expression_start} must be in [0, 1) (0 = expression from noise)"
        )
    observation = module.observation_model
    if observation is None:
        log.info(
            "the checkpoint stores no training cells (written before joint samples drew "
            "measured values): expression starts from noise and X holds the denoised "
            "expression states; train again for measurement-like expression"
        )
        expression_start = 0.0
    exprs, states, poss, slice_of, reference_of, predicted = [], [], [], [], [], []
    per_slice: dict[str, dict[str, Any]] = {}
    rows: list[list[TissuePanel]] = []
    for i, (piece, n) in enumerate(zip(prepared.slices, counts, strict=True)):
        has_pos = piece.positions is not None
        scale = piece.scale if has_pos else module.data_info.typical_scale
        center = piece.center if has_pos else np.zeros(module.n_dims)
        for k in range(num_samples):
            draw_seed = seed + 1000 * i + k
            # positions start from noise; expression from noise, or from training cells
            # noised part of the way (sampling.expression_start)
            start = (
                np.zeros((n, len(genes)), np.float32)
                if expression_start == 0
                else observation.starting_states(n, draw_seed)
            )
            holder = DataHolder.from_arrays(start, np.zeros((n, module.n_dims), np.float32))
            generator = torch.Generator(device=module.device).manual_seed(draw_seed)
            expr, pos = module.predictor.sample(
                holder,
                "joint",
                sampler=sampler,
                steps=steps,
                generator=generator,
                progress=progress_bar,
                expression_start=expression_start,
            )
            state = expr[0].cpu().numpy()
            pos = to_user_units(pos[0].cpu().numpy(), center, scale, out_dims)
            name = piece.name if num_samples == 1 else f"{piece.name}_sample{k}"
            types = predict_cell_types(piece, state, type_names)
            states.append(state)
            exprs.append(state if observation is None else observation.draw(state, draw_seed))
            poss.append(pos.astype(out_dtype))
            slice_of += [name] * n
            reference_of += [piece.name] * n
            predicted.append(types)
            per_slice[name] = {
                "reference_slice": piece.name,
                "n_cells": n,
                "reference_n_cells": piece.n_cells,
                "scale": float(scale),
                "seed": draw_seed,
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
    tissue.layers[DENOISED_EXPRESSION] = np.concatenate(states)
    record = sampling_record(
        module,
        "joint",
        sampler=sampler,
        steps=steps,
        seed=seed,
        num_samples=num_samples,
        source=source,
    )
    tissue.uns[UNS] = record | {
        "missing_genes": prepared.missing_genes,
        "missing_gene_share": len(prepared.missing_genes) / len(genes),
        "normalization": prepared.normalization or "not read",
        "expression_key": "X",
        "expression_start": expression_start,
        "expression": (
            f"X: measured values drawn per gene from the {N_NEIGHBORS} of "
            f"{observation.n_cells} stored training cells nearest to each cell's state; "
            f"layers['{DENOISED_EXPRESSION}']: the states"
            if observation is not None
            else f"X and layers['{DENOISED_EXPRESSION}']: the denoised expression states"
        ),
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

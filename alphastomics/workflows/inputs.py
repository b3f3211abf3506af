"""New AnnData for a trained model: one set of rules for `sample` and `extract`, and the run
record every sampled AnnData carries.

Keys, layer and normalisation default to those used at preprocess time (stored in the
checkpoint); genes are matched to the checkpoint's by name, and too small an overlap is refused;
an input whose expression is of another kind than the training data's (raw counts vs. already
normalised) is refused unless ``--normalize`` says what to do. Coordinates are read in the
frame of a model trained on one slice or volume when they lie within it (``--frame``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import anndata as ad

from alphastomics import __version__
from alphastomics.data.anndata import (
    TARGET_SUM,
    FrameChoice,
    NormalizeMode,
    PreparedSlice,
    prepare_anndata,
)
from alphastomics.errors import UserInputError
from alphastomics.keys import POSITION_KEY, SLICE_KEY
from alphastomics.training.module import AlphaSTomicsModule

log = logging.getLogger(__name__)

_KIND = {"log1p": "raw counts", "none": "already-normalised expression"}


@dataclass(frozen=True)
class PreparedInput:
    """The slices of an input AnnData prepared for a model, and what was matched."""

    slices: list[PreparedSlice]
    keys: dict[str, str | None]
    missing_genes: list[str]
    normalization: str | None  # applied to the input ("log1p" | "none"), None: not read


def trained_normalization(module: AlphaSTomicsModule) -> dict[str, Any]:
    """What preprocess did to the training data: ``requested`` and the set ``applied``."""
    saved = module.data_info.normalization
    applied = saved.get("applied") or {}
    return {
        "requested": saved.get("requested", "auto"),
        "applied": sorted(set(applied.values())) if isinstance(applied, dict) else [],
    }


def check_gene_overlap(
    module: AlphaSTomicsModule, adata: ad.AnnData, source: str, min_gene_overlap: float
) -> list[str]:
    """The checkpoint's genes missing from ``adata``; refused below ``min_gene_overlap``."""
    genes = list(module.hparams["gene_names"])
    present = set(map(str, adata.var_names))
    missing = [g for g in genes if g not in present]
    share = 1 - len(missing) / len(genes)
    if share < min_gene_overlap:
        raise UserInputError(
            f"{source} has only {len(genes) - len(missing)} of the checkpoint's {len(genes)} "
            f"genes ({share:.0%} < --min_gene_overlap {min_gene_overlap:g}); check that var_names "
            "are gene symbols of the same panel, or lower --min_gene_overlap"
        )
    return missing


def prepare_input(
    module: AlphaSTomicsModule,
    adata: ad.AnnData,
    source: str,
    *,
    keys: dict[str, str | None] | None = None,
    normalize: NormalizeMode | None = None,
    min_gene_overlap: float = 0.5,
    require_expression: bool = True,
    require_positions: bool = True,
    frame_choice: FrameChoice = "auto",
) -> PreparedInput:
    """Prepare ``adata`` for ``module`` (see the module docstring).

    Parameters
    ----------
    keys
        ``position_key``, ``slice_key``, ``cell_type_key``, ``layer``; a missing or None
        value is the one used at preprocess time.
    normalize
        None: as at preprocess time, and an input of another kind than the training data is
        refused. ``auto``/``log1p``/``none``: as for preprocess, no refusal.
    min_gene_overlap
        Smallest share of the checkpoint's genes the input must have (expression inputs only).
    require_expression
        False when expression is not an input (``pos_to_expr``): its problems are logged, not
        errors, and no gene overlap is needed.
    require_positions
        True: the position key must exist.
    frame_choice
        How coordinates are centred and scaled (:func:`~alphastomics.data.anndata.prepare_anndata`):
        ``auto`` (in the training frame of a one-slice or one-volume model when they lie
        within it), ``training`` or ``own``.
    """
    info = module.data_info
    frame = info.training_frame
    if frame_choice == "training" and frame is None:
        trained_on = info.n_training_frames
        raise UserInputError(
            f"--frame training needs a model trained on one slice or volume; this one was "
            f"trained on {trained_on if trained_on is not None else 'several'} slices, each "
            "centred and scaled on its own (or before frames were recorded); use --frame auto"
        )
    saved = info.keys
    wanted = keys or {}
    resolved = {
        name: wanted.get(name) or saved.get(name)
        for name in ("position_key", "slice_key", "cell_type_key", "layer")
    }
    resolved["position_key"] = resolved["position_key"] or POSITION_KEY
    resolved["slice_key"] = resolved["slice_key"] or SLICE_KEY
    missing = list(module.hparams["gene_names"])
    if adata.n_vars:
        missing = check_gene_overlap(
            module, adata, source, min_gene_overlap if require_expression else 0.0
        )
    trained = trained_normalization(module)
    slices = prepare_anndata(
        adata,
        genes=list(module.hparams["gene_names"]),
        position_key=resolved["position_key"],
        slice_key=resolved["slice_key"],
        cell_type_key=resolved["cell_type_key"],
        layer=resolved["layer"],
        normalize=normalize or trained["requested"],
        require_positions=require_positions,
        cell_types=info.cell_types or None,
        source=source,
        require_expression=require_expression,
        n_dims=module.n_dims,
        frame=frame,
        frame_choice=frame_choice,
    )
    read = any(piece.gene_mask.any() for piece in slices)
    applied = slices[0].normalization if read else None
    if normalize is None and applied is not None and applied not in trained["applied"]:
        _refuse_other_kind(source, applied, trained["applied"])
    return PreparedInput(slices=slices, keys=resolved, missing_genes=missing, normalization=applied)


def _refuse_other_kind(source: str, applied: str, trained: list[str]) -> None:
    if not trained:  # a checkpoint that does not say
        return
    if applied == "log1p":
        fix = (
            f"normalise {source} as the training data were, or pass --normalize log1p to "
            f"normalise it here (library size {TARGET_SUM:g} + log1p) or --normalize none to "
            "use it as is"
        )
    else:
        fix = (
            f"pass the raw counts (e.g. --layer counts), or --normalize none to use {source} "
            "as is if it was normalised as preprocess does (library size "
            f"{TARGET_SUM:g} + log1p)"
        )
    raise UserInputError(
        f"{source} holds {_KIND[applied]}, but the model was trained on {_KIND[trained[0]]}; {fix}"
    )


def sampling_record(
    module: AlphaSTomicsModule,
    mode: str,
    *,
    sampler: str | None,
    steps: int | None,
    seed: int,
    num_samples: int,
    source: str,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """What every sampled AnnData records in ``uns["alphastomics"]`` of the run that made it
    (``checkpoint`` left out when None, ``sampling_overrides`` when there were none); each mode
    adds its own entries."""
    record: dict[str, Any] = {
        "mode": mode,
        "sampler": sampler or module.cfg.sampling.sampler,
        "steps": steps or module.cfg.sampling.steps,
        "seed": seed,
        "num_samples": num_samples,
    }
    if checkpoint is not None:
        record["checkpoint"] = checkpoint
    if module.sampling_overrides:
        record["sampling_overrides"] = list(module.sampling_overrides)
    return record | {"version": __version__, "input": source}


def check_steps(module: AlphaSTomicsModule, steps: int | None) -> None:
    """``--steps``: None (the config's) or a sampler step count the checkpoint can run."""
    T = module.noise_model.T
    if steps is not None and not 1 <= steps <= T:
        raise UserInputError(
            f"--steps {steps} must be between 1 and the model's diffusion_steps ({T})"
        )

"""`sample --sample_mode impute`: the model genes a file lacks, from the genes it has."""

from __future__ import annotations

import logging
from copy import deepcopy
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from alphastomics.data.anndata import FrameChoice, NormalizeMode, PreparedSlice
from alphastomics.errors import UserInputError
from alphastomics.evaluation.figures import MODE_TITLES, plot_genes
from alphastomics.keys import EXPRESSION, EXPRESSION_STD, IMPUTED, UNS
from alphastomics.training.module import AlphaSTomicsModule
from alphastomics.workflows.inputs import prepare_input, sampling_record

log = logging.getLogger(__name__)


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
    :meth:`~alphastomics.diffusion_model.predict.Predictor.impute`. Without coordinates under the position key (the
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
    result, _ = impute_for_file(
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


def impute_for_file(
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
    frame: FrameChoice = "auto",
) -> tuple[ad.AnnData, PreparedSlice | None]:
    """:func:`impute_anndata` of a file (``checkpoint`` recorded in ``uns``), and the slice
    its figure draws (None without positions); ``frame``: how coordinates are read
    (:func:`prepare_input`)."""
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
        frame_choice=frame,
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
        holder = piece.batch(module.n_dims)
        common = {"use_positions": has_positions, "sampler": sampler, "steps": steps}
        draws = []
        for d in range(n_draws):
            generator = torch.Generator(device=module.device).manual_seed(seed + 1000 * k + d)
            draw = module.predictor.impute(
                holder, expression_estimate="sample", generator=generator, **common
            )
            draws.append(draw[0].cpu().numpy())
        if estimate == "mean":
            generator = torch.Generator(device=module.device).manual_seed(seed + 1000 * k)
            point = module.predictor.impute(holder, generator=generator, **common)[0].cpu().numpy()
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
    record = sampling_record(
        module,
        "impute",
        sampler=sampler,
        steps=steps,
        seed=seed,
        num_samples=num_samples,
        source=source,
        checkpoint=checkpoint or "",
    )
    result.uns[UNS] = record | {
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


def impute_figure(result: ad.AnnData, piece: PreparedSlice, path: Path) -> None:
    """Imputed genes of the first slice, drawn at its positions."""
    imputed = result.var[IMPUTED].to_numpy(dtype=bool)
    names = [str(g) for g in result.var_names[imputed]]
    expr = result.layers[EXPRESSION][piece.obs_indices][:, imputed]
    title = f"{piece.name}: {MODE_TITLES['impute']}"
    plot_genes(piece.positions, None, expr, names, path, title=title)

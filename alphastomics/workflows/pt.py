"""`sample` on a ``.pt`` input: a dict of tensors in model units in, the same out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from alphastomics import __version__
from alphastomics.data.anndata import MIN_SLICE_CELLS
from alphastomics.data.batch import DataHolder
from alphastomics.errors import UserInputError
from alphastomics.training.module import AlphaSTomicsModule
from alphastomics.utils.io import atomic_write


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
        e, p = module.predictor.sample(
            holder, mode, sampler=sampler, steps=steps, generator=generator
        )
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

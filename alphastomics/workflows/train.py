"""`train`: build data, model and Trainer from a config and fit, with resume and safe run folders."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from alphastomics.config import Config, config_to_yaml
from alphastomics.diffusion_model.train import AlphaSTomicsModule
from alphastomics.diffusion_model.trainer import build_trainer
from alphastomics.errors import UserInputError
from alphastomics.utils.dataloader import create_dataloaders

log = logging.getLogger(__name__)


def data_info_from_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must remember about the data it was trained on."""
    scales = [float(s["scale"]) for s in metadata["slices"]]
    return {
        "keys": metadata.get("keys", {}),
        "normalization": metadata.get("normalization", {}),
        "cell_types": metadata.get("cell_types", []),
        "n_dims": metadata.get("n_dims", 3),
        "typical_scale": float(sorted(scales)[len(scales) // 2]) if scales else 1.0,
        "typical_n_cells": int(sorted(s["n_cells"] for s in metadata["slices"])[len(scales) // 2]),
    }


def _check_run_dir(output_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Return the checkpoint to resume from, refusing to silently reuse a run folder."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if resume:
        if not last.is_file():
            raise UserInputError(
                f"--resume: {last} does not exist; train without --resume first, or point "
                "--output_dir at the run folder that holds checkpoints/last.ckpt"
            )
        return last
    existing = list((output_dir / "checkpoints").glob("*.ckpt"))
    if existing and not overwrite:
        raise UserInputError(
            f"{output_dir} already holds checkpoints ({', '.join(p.name for p in existing)}); "
            "pass --resume to continue that run, --overwrite to start afresh, or another --output_dir"
        )
    if existing:
        for path in existing:
            path.unlink()
    return None


@rank_zero_only
def _write_config(cfg: Config, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(config_to_yaml(cfg))


def run_training(
    cfg: Config,
    data_dir: str | Path,
    output_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    enable_progress_bar: bool = True,
) -> AlphaSTomicsModule:
    """Train on the store in ``data_dir``; checkpoints go to ``output_dir/checkpoints``.

    Returns the trained module (its weights are those of the last step; ``best.ckpt`` holds the
    best validation loss).
    """
    output_dir = Path(output_dir)
    resume_from = _check_run_dir(output_dir, resume, overwrite)
    pl.seed_everything(cfg.training.seed, workers=True, verbose=False)
    loading = cfg.data.loading
    train_loader, val_loader, _, meta = create_dataloaders(
        data_dir,
        mode=loading.mode,
        batch_size=loading.batch_size,
        max_cells=loading.max_cells,
        neighborhood_fraction=loading.neighborhood_fraction,
        num_workers=loading.num_workers,
        seed=cfg.training.seed,
    )
    has_val = val_loader is not None and len(val_loader) > 0
    module = AlphaSTomicsModule(
        cfg,
        meta["n_genes"],
        gene_names=meta["gene_names"],
        gene_mean=meta["gene_mean"],
        gene_std=meta["gene_std"],
        data_info=data_info_from_metadata(meta),
        n_dims=meta.get("n_dims", 3),
    )
    _write_config(cfg, output_dir)
    trainer = build_trainer(
        cfg, output_dir, has_validation=has_val, enable_progress_bar=enable_progress_bar
    )
    trainer.fit(
        module,
        train_dataloaders=train_loader,
        val_dataloaders=val_loader if has_val else None,
        ckpt_path=str(resume_from) if resume_from else None,
    )
    return module

"""`train`: build data, model and Trainer from a config and fit, with resume and safe run folders."""

from __future__ import annotations

import logging
import shlex
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from alphastomics.attn_model.local_graphs import LOCAL_GRAPH_WORDS
from alphastomics.config import Config, config_to_dict, config_to_yaml, resolve_auto
from alphastomics.data.loader import create_dataloaders
from alphastomics.data.store import DataInfo, ProcessedStore, training_frames
from alphastomics.diffusion_model.observation import ObservationModel
from alphastomics.errors import TrainingStopped, UserInputError
from alphastomics.training.callbacks import GracefulInterrupt
from alphastomics.training.checkpoint import checkpoint_config, read_checkpoint
from alphastomics.training.module import AlphaSTomicsModule
from alphastomics.training.trainer import (
    build_trainer,
    quiet_lightning,
    stop_rule,
    validation_minutes,
)
from alphastomics.utils.hardware import native_bf16
from alphastomics.utils.io import atomic_write, folder_lock

log = logging.getLogger(__name__)


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
            path.unlink(missing_ok=True)  # every rank of a distributed run gets here
    return None


@rank_zero_only
def _write_config(cfg: Config, output_dir: Path) -> None:
    atomic_write(output_dir / "config.yaml", lambda tmp: tmp.write_text(config_to_yaml(cfg)))


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

    The run folder is locked (``output_dir/.alphastomics.lock``) while training, so a second
    run into it is refused. Returns the trained module (its weights are those of the last step;
    ``best.ckpt`` holds the best validation loss).

    Raises
    ------
    UserInputError
        Bad data or run folder, or training ended before its first step (nothing to save).
    TrainingStopped
        Interrupted, too many non-finite steps, or no checkpoint could be written.
    """
    output_dir = Path(output_dir)
    has_val = bool(ProcessedStore(data_dir).slice_indices("val"))
    # the Trainer knows this process's rank before torch.distributed exists (torchrun's
    # environment, or the processes Lightning launches itself): build it first
    with quiet_lightning():
        trainer = build_trainer(
            cfg, output_dir, has_validation=has_val, enable_progress_bar=enable_progress_bar
        )
    if trainer.global_rank != 0:  # rank 0 holds the run folder's lock for all ranks
        return _fit(cfg, trainer, data_dir, output_dir, resume, overwrite, has_val)
    created = not output_dir.exists()
    try:
        with folder_lock(output_dir):
            return _fit(cfg, trainer, data_dir, output_dir, resume, overwrite, has_val)
    finally:
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()


def _log_reference_cells(module: AlphaSTomicsModule) -> None:
    """Say how ``pos_to_expr`` of the model being trained will read expression."""
    stored = module.observation_model
    if stored is None or stored.positions is None or module.neighbor_readout is None:
        return
    if module.reference_cells is not None:
        log.info(
            "sampling.reference_cells=auto: pos_to_expr reads the expression of the %s stored "
            "training cells around each position with the learned neighbour read-out (one "
            "training frame); sampling.reference_cells=none predicts from positions alone",
            f"{stored.n_cells:,}",
        )
    elif module.cfg.sampling.reference_cells == "auto":
        log.info(
            "pos_to_expr predicts from positions alone: the checkpoint keeps %s of the %s "
            "training cells, not a complete reference",
            f"{stored.n_cells:,}",
            f"{stored.n_training_cells:,}",
        )


def _fit(
    cfg: Config,
    trainer: pl.Trainer,
    data_dir: str | Path,
    output_dir: Path,
    resume: bool,
    overwrite: bool,
    has_val: bool,
) -> AlphaSTomicsModule:
    resume_from = _check_run_dir(output_dir, resume, overwrite)
    pl.seed_everything(cfg.training.seed, workers=True, verbose=False)
    rank, world_size = trainer.global_rank, trainer.world_size
    if rank != 0:
        logging.getLogger("alphastomics").setLevel(logging.WARNING)
    _log_validation_plan(cfg, has_val)
    store = ProcessedStore(data_dir)
    cfg, decisions = resolve_auto(cfg, training_frames(store.metadata))
    for decision in decisions:
        log.info(decision)
    log.info(local_attention_note(cfg.model.local_neighbors, cfg.model.local_graph))
    bf16_note = bf16_layers_note(cfg.model.bf16_min_cells, trainer.strategy.root_device.type)
    if bf16_note:
        log.info(bf16_note)
    loading = cfg.data.loading
    train_loader, val_loader, _, meta = create_dataloaders(
        data_dir,
        mode=loading.mode,
        batch_size=loading.batch_size,
        max_cells=loading.max_cells,
        neighborhood_fraction=loading.neighborhood_fraction,
        num_workers=loading.num_workers,
        seed=cfg.training.seed,
        rank=rank,
        world_size=world_size,
    )
    data_info = DataInfo.from_metadata(meta, store.training_frame())
    module = AlphaSTomicsModule(
        cfg,
        meta["n_genes"],
        gene_names=meta["gene_names"],
        gene_mean=meta["gene_mean"],
        gene_std=meta["gene_std"],
        data_info=data_info,
        n_dims=meta.get("n_dims", 3),
    )
    if cfg.training_mode == "joint":
        parts = [store.load_slice(i) for i in store.slice_indices("train")]
        one_frame = data_info.frame is not None  # their positions are a reference atlas
        module.observation_model = ObservationModel.from_slices(
            [(part.expression, part.gene_mask) for part in parts],
            seed=cfg.training.seed,
            positions=[part.positions for part in parts] if one_frame else None,
        )
        if module.observation_model is not None:
            log.info(
                "joint samples draw measured values from %s training cells stored in the "
                "checkpoint (alphastomics.diffusion_model.observation)",
                f"{module.observation_model.n_cells:,}",
            )
            _log_reference_cells(module)
    if world_size > 1:
        # same initial weights everywhere (above), a different noise stream per rank (below)
        pl.seed_everything(cfg.training.seed + rank, workers=True, verbose=False)
    if resume_from is not None:
        _check_resume(resume_from, cfg, meta["gene_names"], data_dir)
    _write_config(cfg, output_dir)
    try:
        with quiet_lightning():
            trainer.fit(
                module,
                train_dataloaders=train_loader,
                val_dataloaders=val_loader if has_val else None,
                ckpt_path=str(resume_from) if resume_from else None,
            )
    except FloatingPointError as err:
        raise TrainingStopped(f"{err}; {_last_checkpoint(output_dir, 'is intact')}") from err
    except SystemExit as err:
        stopped = _stop_message(trainer, output_dir, data_dir)
        if stopped is None:
            raise
        raise TrainingStopped(*stopped) from err
    if rank == 0:
        _check_saved(cfg, trainer, output_dir)
    return module


def _log_validation_plan(cfg: Config, has_val: bool) -> None:
    log.info("training stops at %s", stop_rule(cfg.training))
    if not has_val:
        log.info("no validation slices: best.ckpt is the final state, like last.ckpt")
    elif cfg.training.val_every_n_epochs is not None:
        log.info("validation every %d epochs", cfg.training.val_every_n_epochs)
    else:
        why = (
            "training.val_every_minutes"
            if cfg.training.val_every_minutes is not None
            else "a tenth of training.max_time_minutes"
            if cfg.training.max_time_minutes
            else "the default without a time budget"
        )
        log.info("validation every %.1f minutes (%s)", validation_minutes(cfg), why)


def _check_saved(cfg: Config, trainer: pl.Trainer, output_dir: Path) -> None:
    """A run that ends without ``last.ckpt`` is an error, never a silent success."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if last.exists():  # a folder under DeepSpeed
        return
    if trainer.global_step == 0:
        limit = cfg.training.max_time_minutes
        reason = (
            f"training.max_time_minutes={limit} was used up before the first step; raise it"
            if limit is not None
            else "the training data gave no batch; check the store's train split"
        )
        raise UserInputError(f"training ended after 0 steps, so there is no checkpoint: {reason}")
    raise TrainingStopped(
        f"training ended at step {trainer.global_step} without writing {last}: its weights hold "
        "NaN or inf (see the warning above); lower training.lr or check the data"
    )


def _last_checkpoint(output_dir: Path, state: str = "holds it") -> str:
    """``RUN/checkpoints/last.ckpt (step N) <state>``, or that there is none, for messages."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return "no checkpoint was written yet"
    try:
        step = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001 - only for a message
        step = "?"
    return f"{last} (step {step}) {state}"


def resume_command(output_dir: Path, data_dir: str | Path) -> str:
    """The command that continues the run in ``output_dir``, ready to paste into a shell.

    The run's own ``config.yaml`` (the resolved config, overrides included) carries the options.
    """
    parts = ["alphastomics", "train", "--resume", "--data_dir", str(data_dir)]
    parts += ["--output_dir", str(output_dir), "--config", str(output_dir / "config.yaml")]
    return shlex.join(parts)


def _stop_message(
    trainer: pl.Trainer, output_dir: Path, data_dir: str | Path
) -> tuple[str, int] | None:
    """Message and exit status after ``fit`` stopped on SIGINT/SIGTERM (None: not a signal)."""
    guard = next((cb for cb in trainer.callbacks if isinstance(cb, GracefulInterrupt)), None)
    if guard is None or guard.stop_reason is None:
        return None
    resume = f"`{resume_command(output_dir, data_dir)}`"
    if guard.stop_reason == "abort":
        return (
            f"training aborted by Ctrl+C before a clean stop, nothing saved "
            f"({_last_checkpoint(output_dir, 'is the latest')}); resume with {resume}",
            130,
        )
    code = int(128 + getattr(signal, guard.stop_reason))
    if guard.saved_path is None:
        return (
            f"training stopped by {guard.stop_reason} at step {guard.saved_step} but could not "
            f"save it ({guard.save_error}); {_last_checkpoint(output_dir, 'is the latest')}; "
            f"resume with {resume}",
            code,
        )
    return (
        f"training stopped by {guard.stop_reason} at step {guard.saved_step}: saved "
        f"{guard.saved_path}; resume with {resume}",
        code,
    )


def local_attention_note(k: int, graph: str) -> str:
    """The log line that says which cells each cell attends to besides the global attention."""
    if k == 0:
        return "model.local_neighbors=0: global attention only (no local attention)"
    return (
        f"model.local_neighbors={k}, model.local_graph={graph}: every layer also attends to "
        f"{k} cells per cell, {LOCAL_GRAPH_WORDS[graph]}, found anew at every network evaluation"
    )


def bf16_layers_note(limit: int | None, device_type: str) -> str | None:
    """The log line that says what ``model.bf16_min_cells`` does on this device (None: off)."""
    if limit is None:
        return None
    key = f"model.bf16_min_cells={limit}"
    reason = native_bf16(device_type)
    if reason is None:
        return (
            f"{key}: {device_type} has no native bfloat16, so every training step runs in float32"
        )
    which = (
        "every training batch runs"
        if limit == 0
        else f"training batches of {limit:,} cells or more run"
    )
    return f"{key}: {which} the transformer layers in bfloat16 ({reason})"


_RESUMABLE_CHANGES = (
    "training.max_epochs",
    "training.max_steps",
    "training.max_time_minutes",
    "training.log_every_n_steps",
    "training.val_every_n_epochs",
    "training.val_every_minutes",
    "training.val_sample_steps",
    "training.val_max_slices",
    "training.max_consecutive_nonfinite",
    "training.logger",
    "training.accelerator",
    "model.checkpoint_min_cells",  # how a large step is computed, not what the model is
    "model.bf16_min_cells",
    "data.loading.num_workers",
    "sampling.",
    "distributed.",
)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_resume(path: Path, cfg: Config, gene_names: list[str], data_dir: str | Path) -> None:
    """``--resume`` continues the run in the checkpoint: same model, data genes and training maths."""
    ckpt = read_checkpoint(path)
    saved = _flat(config_to_dict(checkpoint_config(ckpt, path)))
    wanted = _flat(config_to_dict(cfg))
    changed = [
        f"{key} ({saved[key]!r} -> {wanted[key]!r})"
        for key in wanted
        if saved.get(key) != wanted[key]
        and not any(key == k or (k.endswith(".") and key.startswith(k)) for k in _RESUMABLE_CHANGES)
    ]
    if changed:
        raise UserInputError(
            f"--resume: the config differs from the run's checkpoint {path} in "
            f"{', '.join(changed[:5])}; resume with the run's config ({path.parent.parent / 'config.yaml'}), "
            "or start a new run with --overwrite or another --output_dir"
        )
    trained = list(ckpt["hyper_parameters"].get("gene_names") or [])
    if trained and trained != list(gene_names):
        shared = len(set(trained) & set(gene_names))
        raise UserInputError(
            f"--resume: --data_dir {data_dir} has {len(gene_names)} genes, the run was trained on "
            f"{len(trained)} ({shared} shared, or in another order); resume with the run's store"
        )

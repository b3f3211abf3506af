"""Build the Lightning `Trainer` from config: callbacks, logger, atomic checkpoints, strategy."""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger

from alphastomics.config import Config
from alphastomics.errors import UserInputError

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the target folder, then rename it into place.

    An interruption (SIGTERM, SIGKILL, power loss) can leave a stray temporary file but never a
    truncated ``last.ckpt``/``best.ckpt``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class BestCheckpointFallback(pl.Callback):
    """Guarantee ``best.ckpt`` after training, even when validation never ran.

    ``ModelCheckpoint`` writes ``best.ckpt`` only once its monitored value exists; a short run
    (fewer epochs than ``training.val_every_n_epochs``) would otherwise leave only ``last.ckpt``.
    """

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        best = Path(self.checkpoint.dirpath) / "best.ckpt"
        if not best.exists() and trainer.global_step > 0:
            log.info("no validation score yet: best.ckpt is the final state")
            trainer.save_checkpoint(str(best))


def _logger(cfg: Config, output_dir: Path) -> Logger:
    kind = cfg.training.logger
    if kind == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None:
            raise UserInputError(
                "training.logger=tensorboard needs tensorboard: `pip install tensorboard`, "
                "or use training.logger=csv"
            )
        from pytorch_lightning.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(output_dir), name="logs", version="")
    if kind == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise UserInputError(
                "training.logger=wandb needs wandb: `pip install wandb`, or use training.logger=csv"
            )
        from pytorch_lightning.loggers import WandbLogger

        return WandbLogger(save_dir=str(output_dir), project="alphastomics")
    return CSVLogger(save_dir=str(output_dir), name="logs", version="")


def build_strategy(cfg: Config, accelerator: str) -> Any:
    """Map ``distributed.strategy`` to a Lightning strategy object (or ``"auto"``)."""
    dist = cfg.distributed
    if not dist.enabled:
        return "auto"
    on_gpu = accelerator in ("gpu", "cuda")
    if dist.strategy == "ddp":
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="nccl" if on_gpu else "gloo")
    if dist.strategy == "fsdp":
        if not on_gpu:
            raise UserInputError(
                "distributed.strategy=fsdp needs CUDA GPUs; on CPU use distributed.strategy=ddp"
            )
        from pytorch_lightning.strategies import FSDPStrategy

        from alphastomics.attn_model.transformer import TransformerLayer

        return FSDPStrategy(auto_wrap_policy={TransformerLayer}, sharding_strategy="FULL_SHARD")
    if dist.strategy == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise UserInputError(
                "distributed.strategy=deepspeed needs DeepSpeed: "
                "`pip install 'alphastomics[deepspeed]'`, or use distributed.strategy=ddp"
            )
        if not on_gpu:
            raise UserInputError(
                "distributed.strategy=deepspeed needs CUDA GPUs; on CPU use distributed.strategy=ddp"
            )
        from pytorch_lightning.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=dist.deepspeed_stage)
    raise UserInputError(
        f"unknown distributed.strategy {dist.strategy!r}; use ddp, fsdp or deepspeed"
    )


def resolve_accelerator(cfg: Config) -> str:
    """``training.accelerator`` with ``auto`` resolved to gpu when CUDA is present, else cpu."""
    acc = cfg.training.accelerator
    if acc == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserInputError(
            f"training.accelerator={acc} but no CUDA GPU is visible; use training.accelerator=cpu"
        )
    return acc


def build_trainer(
    cfg: Config,
    output_dir: str | Path,
    *,
    has_validation: bool = True,
    extra_callbacks: list[pl.Callback] | None = None,
    enable_progress_bar: bool = True,
) -> pl.Trainer:
    """A Trainer writing ``output_dir/checkpoints/{best,last}.ckpt`` and ``output_dir/logs``."""
    output_dir = Path(output_dir)
    train_cfg = cfg.training
    accelerator = resolve_accelerator(cfg)
    monitor = "val/loss" if has_validation else "train/loss"
    checkpoint = ModelCheckpoint(
        dirpath=str(output_dir / "checkpoints"),
        filename="best",
        monitor=monitor,
        mode="min",
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
    )
    callbacks: list[pl.Callback] = [
        checkpoint,
        BestCheckpointFallback(checkpoint),
        *(extra_callbacks or []),
    ]
    if enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    if train_cfg.use_ema:
        callbacks.append(EMAWeightAveraging(decay=train_cfg.ema_decay))
    dist = cfg.distributed
    max_time = timedelta(minutes=train_cfg.max_time_minutes) if train_cfg.max_time_minutes else None
    return pl.Trainer(
        default_root_dir=str(output_dir),
        accelerator=accelerator,
        devices=dist.devices if dist.enabled else 1,
        num_nodes=dist.num_nodes if dist.enabled else 1,
        strategy=build_strategy(cfg, accelerator),
        precision=train_cfg.precision,
        max_epochs=train_cfg.max_epochs,
        max_steps=train_cfg.max_steps,
        max_time=max_time,
        gradient_clip_val=train_cfg.gradient_clip_val or None,
        log_every_n_steps=train_cfg.log_every_n_steps,
        check_val_every_n_epoch=train_cfg.val_every_n_epochs,
        num_sanity_val_steps=0,
        logger=_logger(cfg, output_dir),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
        deterministic=False,
        # our samplers shard items per rank themselves (see utils/dataloader.py)
        use_distributed_sampler=False,
    )

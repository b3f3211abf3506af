"""Build the Lightning `Trainer` from config: callbacks, logger, atomic checkpoints, strategy."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.plugins.precision import DeepSpeedPrecision, FSDPPrecision, Precision
from pytorch_lightning.strategies import FSDPStrategy

from alphastomics.config import Config, TrainingConfig
from alphastomics.data.batch import DataHolder
from alphastomics.errors import UserInputError
from alphastomics.training.callbacks import GracefulInterrupt, ResumeState
from alphastomics.utils.io import reserve_temporary, writing
from alphastomics.utils.progress import LOG_INTERVAL_S, Throttle, on_terminal

log = logging.getLogger(__name__)


def _nonfinite_weights(checkpoint: dict[str, Any]) -> list[str]:
    """Names of the floating-point weights with NaN or inf (``state_dict`` and, with EMA, the
    training weights in ``current_model_state``)."""
    return [
        name
        for key in ("state_dict", "current_model_state")
        for name, value in (checkpoint.get(key) or {}).items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the target folder, then rename it into place.

    An interruption (SIGTERM, SIGKILL, power loss) can leave a stray temporary file but never a
    truncated ``last.ckpt``/``best.ckpt``. Weights with NaN or inf are never written: the last
    good checkpoint stays in place (a warning names the first bad tensor).
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        path = Path(path)
        bad = _nonfinite_weights(checkpoint)
        if bad:
            log.warning(
                "not writing %s: %d weight tensors hold NaN or inf (first: %s); the previous "
                "checkpoint there is kept",
                path,
                len(bad),
                bad[0],
            )
            return
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = reserve_temporary(path)
        try:
            with writing(path):
                with open(tmp, "wb") as handle:
                    torch.save(checkpoint, handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class ThrottledLastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` at the first epoch end, then at epoch ends at most every ``min_interval_s``
    seconds, and at the end.

    A store with one or two training slices has epochs of one or two steps; writing (and
    fsync-ing) a checkpoint after each of them would cost more than the steps themselves. The
    first epoch is always saved, so a run killed early still has something to resume from.
    """

    def __init__(self, *, min_interval_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_interval_s = min_interval_s
        self._last_write = -math.inf

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if time.monotonic() - self._last_write < self.min_interval_s:
            return
        super().on_train_epoch_end(trainer, pl_module)
        self._last_write = time.monotonic()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step and trainer.global_step > 0:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class StderrProgressBar(TQDMProgressBar):
    """Lightning's progress bar on stderr (it writes to stdout), beside every other message."""

    def init_sanity_tqdm(self) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_sanity_tqdm()

    def init_train_tqdm(self) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_train_tqdm()

    def init_validation_tqdm(self) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_validation_tqdm()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Close the bars of a stopped run, so the next message starts on its own line."""
        for bar in (self._val_progress_bar, self._train_progress_bar):
            if bar is not None:
                bar.close()


class ProgressLog(pl.Callback):
    """Training progress as one log line every ``interval_s`` seconds, for a log file or pipe.

    A tqdm bar redraws itself with carriage returns: on a terminal that is one line, but in a
    file (a cluster job's log, ``2> train.log``) every redraw is kept and the log grows by
    megabytes. Where stderr is not a terminal, :func:`build_trainer` uses this instead:
    ``step 1200 (epoch 40), 4.0 min, train/loss 0.312``.
    """

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._throttle = Throttle(interval_s)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._throttle = Throttle(self.interval_s)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not trainer.is_global_zero or not self._throttle.due():
            return
        loss = trainer.callback_metrics.get("train/loss")
        shown = f", train/loss {float(loss):.4g}" if loss is not None else ""
        log.info(
            "step %d (epoch %d), %.1f min%s",
            trainer.global_step,
            trainer.current_epoch,
            self._throttle.minutes,
            shown,
        )


class _Drop(logging.Filter):
    """Drop log records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# Lightning's messages that are about Lightning, not about this run: an advertisement, a
# deprecation inside Lightning, and the logging interval, which counts global steps here
_NOT_FOR_USERS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide Lightning's tips and its warnings a user cannot act on, for the block only.

    Lightning's "Received SIGTERM" is hidden too: :class:`GracefulInterrupt` hands Ctrl+C to
    Lightning as SIGTERM and says itself which signal came.
    """
    filters = [
        (logging.getLogger("pytorch_lightning.utilities.rank_zero"), _Drop("💡 Tip")),
        (
            logging.getLogger("pytorch_lightning.trainer.connectors.signal_connector"),
            _Drop("Received SIGTERM"),
        ),
    ]
    for logger, dropped in filters:
        logger.addFilter(dropped)
    try:
        with warnings.catch_warnings():
            for message in _NOT_FOR_USERS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for logger, dropped in filters:
            logger.removeFilter(dropped)


class BestCheckpointFallback(pl.Callback):
    """Guarantee ``best.ckpt`` after training, even when validation never ran.

    ``ModelCheckpoint`` writes ``best.ckpt`` only once its monitored value exists; a short run
    (shorter than the validation cadence) would otherwise leave only ``last.ckpt``. Without
    validation data (``always``), ``best.ckpt`` is the final state of every run, so a resumed
    run replaces it too.
    """

    def __init__(self, dirpath: str | Path, *, always: bool = False) -> None:
        self.dirpath = Path(dirpath)
        self.always = always

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        best = self.dirpath / "best.ckpt"
        # rank 0 decides: saving is a collective, every rank must agree to call it
        write = trainer.strategy.broadcast(self.always or not best.exists())
        if write and trainer.global_step > 0:
            if not self.always:
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

        return TensorBoardLogger(save_dir=str(output_dir), name="logs")
    if kind == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise UserInputError(
                "training.logger=wandb needs wandb: `pip install wandb`, or use training.logger=csv"
            )
        from pytorch_lightning.loggers import WandbLogger

        return WandbLogger(save_dir=str(output_dir), project="alphastomics")
    # one version_<k> folder per run or resume, so a resume never replaces earlier logs
    return CSVLogger(save_dir=str(output_dir), name="logs")


class _HolderInput(Precision):
    """Cast a ``DataHolder`` batch tensor by tensor.

    The FSDP and DeepSpeed precision plugins' own ``convert_input`` refuses frozen dataclasses.
    """

    def convert_input(self, data: Any) -> Any:
        if not isinstance(data, DataHolder):
            return super().convert_input(data)
        changes = {}
        for field in dataclasses.fields(data):
            value = getattr(data, field.name)
            if isinstance(value, torch.Tensor):
                changes[field.name] = super().convert_input(value)
        return data.replace(**changes)


class HolderDeepSpeedPrecision(_HolderInput, DeepSpeedPrecision):
    """``DeepSpeedPrecision`` that accepts ``DataHolder`` batches."""


class HolderFSDPPrecision(_HolderInput, FSDPPrecision):
    """``FSDPPrecision`` that accepts ``DataHolder`` batches."""


class FSDPGradientClipping(pl.Callback):
    """Clip the global gradient norm under FSDP, where Lightning's own norm clipping refuses.

    Calls the root FSDP module's ``clip_grad_norm_`` (a collective: every rank runs it) just
    before each optimizer step.
    """

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        trainer.strategy.model.clip_grad_norm_(self.max_norm)


def build_strategy(cfg: Config, accelerator: str) -> Any:
    """Map ``distributed.strategy`` to a Lightning strategy object (or ``"auto"``).

    Parameters
    ----------
    cfg
        The run's config; only ``distributed`` is read.
    accelerator
        The resolved accelerator (:func:`resolve_accelerator`): ``gpu``/``cuda`` or ``cpu``.

    Returns
    -------
    Any
        ``"auto"`` when ``distributed.enabled`` is false; else ``DDPStrategy`` (NCCL on GPU,
        gloo on CPU), ``FSDPStrategy`` (full sharding, one FSDP unit per ``TransformerLayer``,
        full state dicts so checkpoints load anywhere) or ``DeepSpeedStrategy`` (ZeRO stage
        ``distributed.deepspeed_stage``).
    """
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
        from alphastomics.attn_model.transformer import TransformerLayer

        return FSDPStrategy(
            auto_wrap_policy={TransformerLayer},
            sharding_strategy="FULL_SHARD",
            state_dict_type="full",
            precision_plugin=HolderFSDPPrecision(cfg.training.precision),  # type: ignore[arg-type]
        )
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

        return DeepSpeedStrategy(
            stage=dist.deepspeed_stage,
            precision_plugin=HolderDeepSpeedPrecision(cfg.training.precision),  # type: ignore[arg-type]
        )
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


def resolve_devices(cfg: Config, accelerator: str) -> tuple[int, int]:
    """Devices per node and number of nodes for the Trainer.

    Without ``distributed.enabled`` this is ``(1, 1)``. Under ``torchrun`` the processes already
    exist: ``distributed.devices``/``num_nodes`` must match ``LOCAL_WORLD_SIZE`` and
    ``WORLD_SIZE / LOCAL_WORLD_SIZE``, and are taken from there when left at their default 1.

    Raises
    ------
    UserInputError
        The config disagrees with torchrun's environment, or asks for more GPUs than are visible.
    """
    dist = cfg.distributed
    devices, num_nodes = (dist.devices, dist.num_nodes) if dist.enabled else (1, 1)
    if torch.distributed.is_available() and torch.distributed.is_torchelastic_launched():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if not dist.enabled:
            if world > 1:
                raise UserInputError(
                    f"torchrun started {world} processes but distributed.enabled=false; "
                    f"add distributed.enabled=true"
                )
            return 1, 1
        if local < 1 or world % local:
            raise UserInputError(
                f"torchrun WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}; "
                "start every node with the same --nproc_per_node"
            )
        env_nodes = world // local
        if (devices, num_nodes) == (1, 1):
            devices, num_nodes = local, env_nodes
        elif devices != local:
            raise UserInputError(
                f"distributed.devices={devices} but torchrun started {local} processes per node "
                f"(--nproc_per_node); set distributed.devices={local}"
            )
        elif num_nodes != env_nodes:
            raise UserInputError(
                f"distributed.num_nodes={num_nodes} but torchrun started {env_nodes} nodes "
                f"(WORLD_SIZE={world} / LOCAL_WORLD_SIZE={local}); set distributed.num_nodes={env_nodes}"
            )
    if accelerator in ("gpu", "cuda") and devices > torch.cuda.device_count():
        raise UserInputError(
            f"distributed.devices={devices} but this machine has {torch.cuda.device_count()} "
            f"visible GPU(s); set distributed.devices={torch.cuda.device_count()}"
        )
    return devices, num_nodes


# Validation cadence without a time budget (with one: a tenth of it).
DEFAULT_VAL_MINUTES = 2.0


DEFAULT_MAX_EPOCHS = 200  # training.max_epochs: null, and neither a time nor a step budget


def epoch_limit(train_cfg: TrainingConfig) -> int:
    """Lightning's ``max_epochs``: ``training.max_epochs``, or for null none (-1) when
    ``max_time_minutes`` or ``max_steps`` bounds training, else :data:`DEFAULT_MAX_EPOCHS`.

    An epoch is one pass over the training items, which can be a few steps (4 slices, or the
    256-cell items of one small volume): a fixed epoch count would end a time budget early.
    """
    if train_cfg.max_epochs is not None:
        return train_cfg.max_epochs
    bounded = bool(train_cfg.max_time_minutes) or train_cfg.max_steps > 0
    return -1 if bounded else DEFAULT_MAX_EPOCHS


def stop_rule(train_cfg: TrainingConfig) -> str:
    """What ends training, for the log (e.g. ``the 15-minute budget``)."""
    rules = []
    if train_cfg.max_time_minutes:
        rules.append(f"the {train_cfg.max_time_minutes:g}-minute budget")
    if train_cfg.max_steps > 0:
        rules.append(f"{train_cfg.max_steps} optimiser steps")
    epochs = epoch_limit(train_cfg)
    if epochs > 0:
        rules.append(f"{epochs} epochs")
    return " or ".join(rules) + ", whichever comes first" if len(rules) > 1 else rules[0]


def validation_schedule(cfg: Config) -> tuple[int, timedelta | None]:
    """``(check_val_every_n_epoch, val_check_interval)`` for the Trainer.

    ``training.val_every_n_epochs`` set: every that many epochs. Otherwise by wall-clock time
    (Lightning's time-based ``val_check_interval``), every ``training.val_every_minutes``, or
    when that is null a tenth of ``training.max_time_minutes`` (``DEFAULT_VAL_MINUTES`` without
    a budget): an epoch of a store with three training slices is three steps, so a cadence in
    epochs would spend most of a short budget validating.
    """
    train_cfg = cfg.training
    if train_cfg.val_every_n_epochs is not None:
        return train_cfg.val_every_n_epochs, None
    return 1, timedelta(minutes=validation_minutes(cfg))


def validation_minutes(cfg: Config) -> float:
    """Minutes between validations when the cadence is by time (see :func:`validation_schedule`)."""
    train_cfg = cfg.training
    if train_cfg.val_every_minutes is not None:
        return train_cfg.val_every_minutes
    if train_cfg.max_time_minutes:
        return train_cfg.max_time_minutes / 10
    return DEFAULT_VAL_MINUTES


def build_trainer(
    cfg: Config,
    output_dir: str | Path,
    *,
    has_validation: bool = True,
    extra_callbacks: list[pl.Callback] | None = None,
    enable_progress_bar: bool = True,
) -> pl.Trainer:
    """A Trainer writing ``output_dir/checkpoints/{best,last}.ckpt`` and ``output_dir/logs``.

    ``enable_progress_bar`` shows progress on stderr: a bar on a terminal, otherwise a
    :class:`ProgressLog` line a minute.
    """
    output_dir = Path(output_dir)
    train_cfg = cfg.training
    accelerator = resolve_accelerator(cfg)
    # best.ckpt: the lowest validation loss; without validation data, the final state (a
    # single-step training loss is too noisy to pick a checkpoint by)
    checkpoint = ModelCheckpoint(
        dirpath=str(output_dir / "checkpoints"),
        filename="best",
        monitor="val/loss",
        mode="min",
        save_top_k=1,
        enable_version_counter=False,
    )
    # last.ckpt at the first epoch end, then every checkpoint_every_minutes at an epoch end, and
    # at the end (ModelCheckpoint(save_last=True) rewrites it only when the best score
    # improves); GracefulInterrupt also writes it when a run is stopped
    last = ThrottledLastCheckpoint(
        min_interval_s=60.0 * train_cfg.checkpoint_every_minutes,
        dirpath=str(output_dir / "checkpoints"),
        filename="last",
        monitor=None,
        save_top_k=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    callbacks: list[pl.Callback] = [
        *([checkpoint] if has_validation else []),
        last,
        BestCheckpointFallback(output_dir / "checkpoints", always=not has_validation),
        *(extra_callbacks or []),
    ]
    show_bar = enable_progress_bar and on_terminal()
    if show_bar:
        callbacks.append(StderrProgressBar(refresh_rate=10))
    elif enable_progress_bar:
        callbacks.append(ProgressLog())
    if train_cfg.use_ema:
        callbacks.append(EMAWeightAveraging(decay=train_cfg.ema_decay))
    callbacks += [ResumeState(), GracefulInterrupt()]
    devices, num_nodes = resolve_devices(cfg, accelerator)
    strategy = build_strategy(cfg, accelerator)
    clip_val = train_cfg.gradient_clip_val or None
    if clip_val and isinstance(strategy, FSDPStrategy):
        callbacks.append(FSDPGradientClipping(clip_val))
        clip_val = None
    max_time = timedelta(minutes=train_cfg.max_time_minutes) if train_cfg.max_time_minutes else None
    every_n_epochs, interval = validation_schedule(cfg)
    return pl.Trainer(
        default_root_dir=str(output_dir),
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=train_cfg.precision,
        max_epochs=epoch_limit(train_cfg),
        max_steps=train_cfg.max_steps,
        max_time=max_time,
        gradient_clip_val=clip_val,
        log_every_n_steps=train_cfg.log_every_n_steps,
        check_val_every_n_epoch=every_n_epochs,
        val_check_interval=interval,
        num_sanity_val_steps=0,
        logger=_logger(cfg, output_dir),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        deterministic=False,
        # our samplers shard items per rank themselves (see data/loader.py)
        use_distributed_sampler=False,
    )

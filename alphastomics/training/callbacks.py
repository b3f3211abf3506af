"""Callbacks that make training safe to stop and exact to resume.

- :class:`GracefulInterrupt`: SIGINT (Ctrl+C) and SIGTERM finish the current step (and a running
  validation), then ``last.ckpt`` is written for that step and training stops; the caller sees
  :attr:`GracefulInterrupt.stop_reason`. A second Ctrl+C aborts at once, without saving.
- :class:`ResumeState`: the torch (CPU and CUDA), numpy and Python RNG states go into every
  checkpoint and come back on resume (Lightning restores optimizer, scheduler, loops and callbacks
  such as EMA, not RNGs), and the training loader's place in the epoch is restored.

With the resumable training loader of :mod:`alphastomics.data.loader` (which skips the
batches of the current epoch already trained on), ``train --resume`` continues mid-epoch exactly
where the interrupted run stopped: same batches, same noise, same weights.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

_SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class GracefulInterrupt(pl.Callback):
    """Turn SIGINT/SIGTERM during ``fit`` into "save ``last.ckpt`` of this step, then stop".

    While training runs, this callback owns the SIGINT and SIGTERM handlers (main thread only).
    A signal is passed on to Lightning's own SIGTERM handling, which stops the loop after the
    current step, at a point where every hook of the step has run; during validation it is held
    back until validation ends (stopping mid-validation would save EMA weights swapped in for
    validation as the training weights). ``on_exception`` then writes ``last.ckpt`` on every rank
    (the strategy writes it once). A second Ctrl+C raises ``KeyboardInterrupt`` at once and
    nothing is saved.

    Attributes
    ----------
    stop_reason
        None, ``"SIGINT"``/``"SIGTERM"`` (stopped cleanly, ``saved_path`` holds the step) or
        ``"abort"`` (a raw ``KeyboardInterrupt``: nothing saved).
    saved_path, saved_step, save_error
        The checkpoint written on interruption (None when writing failed: ``save_error`` says
        why) and the global step it holds.
    """

    def __init__(self) -> None:
        self.stop_reason: str | None = None
        self.saved_path: Path | None = None
        self.saved_step: int | None = None
        self.save_error: str | None = None
        self._received: str | None = None
        self._forwarded = False
        self._trainer: pl.Trainer | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ signal handling
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._received, self._forwarded = None, False
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _SIGNAL_NAMES:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self._received is None:
            self._received = _SIGNAL_NAMES.get(signal.Signals(signum), str(signum))
            log.warning(
                "%s received: finishing this step, then saving last.ckpt (Ctrl+C again to stop "
                "at once without saving)",
                self._received,
            )
        trainer = self._trainer
        if trainer is None or not trainer.validating:
            self._forward(frame)

    def _forward(self, frame: FrameType | None) -> None:
        """Hand the stop request to Lightning's SIGTERM handler (it stops after the step)."""
        if self._forwarded:
            return
        self._forwarded = True
        handler = self._previous.get(signal.SIGTERM)
        if callable(handler):
            handler(signal.SIGTERM, frame)
        else:
            raise KeyboardInterrupt

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._received is not None:
            self._forward(None)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    # ------------------------------------------------------------------ stopping
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()
        if isinstance(exception, SIGTERMException):
            self.stop_reason = self._received or "SIGTERM"
            checkpoint = trainer.checkpoint_callback
            dirpath = getattr(checkpoint, "dirpath", None) or Path(trainer.default_root_dir)
            path = Path(dirpath) / "last.ckpt"
            self.saved_step = trainer.global_step
            try:
                trainer.save_checkpoint(str(path))
            except Exception as err:  # noqa: BLE001 - reported by the caller, the run stops anyway
                self.save_error = f"{type(err).__name__}: {err}"
                log.error("could not write %s: %s", path, self.save_error)
                return
            self.saved_path = path
            log.info("saved %s at step %d", path, trainer.global_step)
        elif isinstance(exception, KeyboardInterrupt):
            self.stop_reason = "abort"


def _rng_state() -> dict[str, Any]:
    """Global RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)  # noqa: NPY002 - the legacy global RNG is saved
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "numpy_has_gauss": int(np_state["has_gauss"]),
        "numpy_gauss": float(np_state["gauss"]),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(  # noqa: NPY002
        {
            "bit_generator": "MT19937",
            "state": {
                "key": state["numpy_key"].numpy().astype(np.uint32),
                "pos": state["numpy_pos"],
            },
            "has_gauss": state["numpy_has_gauss"],
            "gauss": state["numpy_gauss"],
        }
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class ResumeState(pl.Callback):
    """What Lightning does not restore on resume: global RNG states and the data position.

    - RNG: the torch (CPU and CUDA), numpy and Python states go into each checkpoint
      (``alphastomics_rng``) and come back on resume. Checkpoints are written by rank 0, so a
      single-process run continues exactly; in a multi-process run rank 0 continues exactly and
      every other rank gets a fresh stream seeded from (its rank, the global step).
    - Data: Lightning saves the state of a resumable training loader
      (:class:`~alphastomics.data.loader.ResumableDataLoader`) but does not load it back
      when ``configure_optimizers`` asked for ``estimated_stepping_batches`` (the loader was set
      up before the checkpoint was read); it is loaded here, before the first batch is drawn.
    """

    KEY = "alphastomics_rng"

    def __init__(self) -> None:
        self._loader_states: list[dict[str, Any]] = []

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[self.KEY] = _rng_state()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        self._loader_states = list((fit_loop.get("state_dict") or {}).get("combined_loader") or [])
        state = checkpoint.get(self.KEY)
        if state is None:
            log.warning("the checkpoint holds no RNG state: resumed noise differs from the run's")
        elif trainer.global_rank == 0:
            _set_rng_state(state)
        else:
            step = int(checkpoint.get("global_step", 0))
            pl.seed_everything(
                int(np.random.SeedSequence([trainer.global_rank, step]).generate_state(1)[0]),
                verbose=False,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        states, self._loader_states = self._loader_states, []
        loaders = trainer.train_dataloader
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        elif not isinstance(loaders, list | tuple):
            loaders = [loaders]
        resumable = [dl for dl in loaders if callable(getattr(dl, "load_state_dict", None))]
        if states and len(states) == len(resumable):
            for loader, state in zip(resumable, states, strict=True):
                loader.load_state_dict(state)

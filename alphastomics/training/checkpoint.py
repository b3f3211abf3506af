"""Load a trained checkpoint with checks that say exactly what is wrong."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alphastomics import __version__
from alphastomics.config import Config, config_to_dict, load_config, upgrade_saved_config
from alphastomics.errors import UserInputError

if TYPE_CHECKING:
    from alphastomics.training.module import AlphaSTomicsModule

_REQUIRED_HPARAMS = ("cfg", "num_genes", "gene_names")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file into a dict, or raise a one-line :class:`UserInputError`."""
    path = Path(path)
    if path.is_dir():
        inside = [
            p for p in (path / "checkpoints" / "best.ckpt", path / "best.ckpt") if p.is_file()
        ]
        hint = f"did you mean {inside[0]}?" if inside else "pass RUN/checkpoints/best.ckpt"
        raise UserInputError(
            f"checkpoint {path} is a folder, not a .ckpt file; {hint} (a DeepSpeed checkpoint "
            "folder must be converted first, see the README)"
        )
    if not path.is_file():
        raise UserInputError(f"checkpoint {path} does not exist; pass a .ckpt written by `train`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as err:
        raise UserInputError(
            f"{path} is not a readable checkpoint ({type(err).__name__}); pass "
            "OUTPUT_DIR/checkpoints/best.ckpt or last.ckpt written by `alphastomics train`"
        ) from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or any(k not in hparams for k in _REQUIRED_HPARAMS):
        raise UserInputError(
            f"{path} is not an AlphaSTomics checkpoint (no model hyper-parameters inside); pass "
            "a .ckpt written by `alphastomics train`"
        )
    saved = hparams.get("alphastomics_version") or ckpt.get("alphastomics_version")
    if saved is None:
        raise UserInputError(f"{path} records no alphastomics version; it was not written by train")
    saved = str(saved)
    if saved.split(".")[0] != __version__.split(".")[0]:
        raise UserInputError(
            f"{path} was written by alphastomics {saved}, this is {__version__}: major versions "
            f"differ and the format may have changed; install alphastomics=={saved} to use it"
        )
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], path: str | Path) -> Config:
    """The checked :class:`Config` stored in a checkpoint read by :func:`read_checkpoint`.

    A key this version does not know (a checkpoint from a newer version) or a bad value is a
    :class:`UserInputError` naming the checkpoint, the key and both versions.
    """
    hp = ckpt["hyper_parameters"]
    saved = hp.get("alphastomics_version") or ckpt.get("alphastomics_version")
    if not isinstance(hp["cfg"], dict):
        raise UserInputError(f"{path} holds no config dict; the file is damaged or was edited")
    try:
        return load_config(base=upgrade_saved_config(hp["cfg"]))
    except UserInputError as err:
        raise UserInputError(
            f"{path}: its config does not fit alphastomics {__version__} ({err}); it was "
            f"written by alphastomics {saved}: use that version to load it, or train again"
        ) from err


def with_sampling_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` with dotted ``sampling.KEY=VALUE`` overrides applied and checked.

    Only the ``sampling`` section may change after training; any other key is a
    :class:`UserInputError` (the trained model fixes it).
    """
    for item in overrides:
        if not item.startswith("sampling."):
            raise UserInputError(
                f"override {item!r}: only sampling.* settings can change after training (the "
                "trained model fixes the others); drop it, or train again with it"
            )
    return load_config(base=config_to_dict(cfg), overrides=list(overrides)) if overrides else cfg


def load_module(
    path: str | Path, map_location: str = "cpu", sampling_overrides: Sequence[str] = ()
) -> AlphaSTomicsModule:
    """Rebuild an :class:`AlphaSTomicsModule` (EMA weights when training used them), in eval mode.

    ``sampling_overrides``: dotted ``sampling.KEY=VALUE`` words that change how it samples
    (:func:`with_sampling_overrides`), e.g. ``sampling.consensus=0``.
    """
    from alphastomics.training.module import AlphaSTomicsModule

    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    module = AlphaSTomicsModule(
        with_sampling_overrides(checkpoint_config(ckpt, path), sampling_overrides),
        hp["num_genes"],
        gene_names=hp.get("gene_names"),
        gene_mean=hp.get("gene_mean"),
        gene_std=hp.get("gene_std"),
        data_info=hp.get("data_info"),
        n_dims=hp.get("n_dims", 3),
    )
    try:
        module.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise UserInputError(
            f"{path}: weights do not fit the model described by its own config ({err}); the file "
            "is damaged or was edited"
        ) from err
    module.on_load_checkpoint(ckpt)  # what the module keeps beside its weights
    module.sampling_overrides = list(sampling_overrides)
    module.to(map_location)
    module.eval()
    return module

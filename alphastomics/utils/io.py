"""Safe output writing: refuse to overwrite silently, write to a temporary file, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from alphastomics.errors import UserInputError


def check_output_file(path: str | Path, *, overwrite: bool, flag: str = "--output") -> Path:
    """Validate an output path before any work: its folder exists, it is not silently replaced."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserInputError(
            f"{flag} {path}: folder {path.parent} does not exist; create it first or choose "
            "another path"
        )
    if path.exists() and not overwrite:
        raise UserInputError(f"{flag} {path} already exists; pass --overwrite to replace it")
    return path


def check_output_dir(path: str | Path, *, overwrite: bool, flag: str = "--output_dir") -> Path:
    """An output folder must be new or empty unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{flag} {path} is a file, not a folder; choose another path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserInputError(
            f"{flag} {path} exists and is not empty; pass --overwrite or choose another folder"
        )
    return path


@contextmanager
def _temporary_sibling(path: Path):
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    with _temporary_sibling(path) as tmp:
        write(tmp)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (NaN written as null) atomically."""
    text = json.dumps(_nan_to_none(data), indent=2, default=_json_default, allow_nan=False)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def _nan_to_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _nan_to_none(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_nan_to_none(v) for v in data]
    if isinstance(data, float | np.floating) and not np.isfinite(data):
        return None
    return data

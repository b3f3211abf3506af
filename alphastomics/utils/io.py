"""Safe output writing: refuse to overwrite silently, write to temporary siblings, then rename.

Temporary files and folders are named ``.<target>.<kind>-<pid>-<hex>@<host>``: a later run finds
the ones a dead process of this machine left behind (SIGKILL, power loss) and removes them.
Files are created with the mode the umask gives, like any other file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np

from alphastomics.errors import OutputWriteError, UserInputError

log = logging.getLogger(__name__)

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
WRITE_ERRNOS = frozenset((*_FULL, *_DENIED))
_TAG = re.compile(r"^(?P<pid>\d+)-[0-9a-f]+@(?P<host>.+)$")


def write_failure(err: OSError) -> str | None:
    """The one-line message for a failed write (None: ``err`` is not about writing output)."""
    if not isinstance(err, OutputWriteError) and err.errno not in WRITE_ERRNOS:
        return None
    reason = _reason(err)
    if err.errno in _FULL:
        fix = "free disk space (or quota), or write to another disk"
    elif err.errno in _DENIED:
        fix = "the folder is read-only or not yours: choose a writable output location"
    else:
        fix = "check the output location"
    return f"cannot write {err.filename or 'the output'} ({reason}); {fix}"


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Re-raise an ``OSError`` met while writing ``path`` as :class:`OutputWriteError` naming
    ``path`` (the CLI prints it on one line)."""
    try:
        yield
    except OSError as err:  # an inner OutputWriteError too: the outermost path is the output
        raise OutputWriteError(err.errno, _reason(err), str(path)) from err


def _reason(err: OSError) -> str:
    """The OS's words for ``err`` (h5py's own messages span lines and list internals)."""
    if err.errno:
        return os.strerror(err.errno)
    return err.strerror or (str(err).splitlines()[0] if str(err) else type(err).__name__)


# --------------------------------------------------------------------------------------------
# Temporary siblings tagged with their owner


def _tag() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"


def temporary_sibling(path: str | Path, kind: str = "tmp") -> Path:
    """A fresh name beside ``path`` for a temporary copy of it, tagged with this process.

    The name ends in ``path``'s suffix, for writers that choose the format by it.
    """
    path = Path(path)
    return path.parent / f".{path.name}.{kind}-{_tag()}{path.suffix}"


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` runs on this machine (or may: it belongs to another user)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_is_dead(pid: int, host: str) -> bool:
    """True when ``pid`` on ``host`` is known to have ended (a process of this machine only)."""
    return host == socket.gethostname() and not pid_alive(pid)


def stale_siblings(path: str | Path, kind: str = "tmp") -> list[tuple[Path, int]]:
    """Temporary siblings of ``path`` (see :func:`temporary_sibling`) left by dead processes."""
    path = Path(path)
    prefix, suffix = f".{path.name}.{kind}-", path.suffix
    if not path.parent.is_dir():
        return []
    stale = []
    for candidate in path.parent.iterdir():
        name = candidate.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        match = _TAG.match(name[len(prefix) : len(name) - len(suffix)])
        if match and owner_is_dead(int(match["pid"]), match["host"]):
            stale.append((candidate, int(match["pid"])))
    return stale


def remove_stale_siblings(path: str | Path, kind: str = "tmp") -> None:
    """Delete the temporary siblings of ``path`` whose writing process has died."""
    for stale, pid in stale_siblings(path, kind):
        log.info("removing %s, left by process %d that no longer runs", stale, pid)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def reserve_temporary(path: Path) -> Path:
    """Create an empty temporary sibling of ``path`` (mode from the umask) and return it."""
    remove_stale_siblings(path)
    tmp = temporary_sibling(path)
    with writing(path):
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return tmp


# --------------------------------------------------------------------------------------------
# Folder locks


LOCK_NAME = ".alphastomics.lock"


@contextmanager
def folder_lock(folder: str | Path, *, flag: str = "--output_dir") -> Iterator[Path]:
    """Hold ``folder/.alphastomics.lock`` (it names this process) while the block runs.

    The lock is an ``fcntl`` lock on that file, so the kernel frees it when the holder dies; a
    lock file left by a dead process is taken over with a message. Another live holder makes
    this a :class:`UserInputError` naming its process.
    """
    import fcntl  # POSIX only: imported here so the rest of this module works everywhere

    folder = Path(folder)
    lock = folder / LOCK_NAME
    with writing(lock):
        folder.mkdir(parents=True, exist_ok=True)
    while True:
        with writing(lock):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserInputError(
                f"{flag} {folder} is in use by another run ({holder}); wait for it to end, or "
                f"choose another {flag}"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and our lock: try again
    try:
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            log.warning("taking over %s from %s, which no longer runs", lock, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Checks before any work


def check_output_file(path: str | Path, *, overwrite: bool, flag: str = "--output") -> Path:
    """Validate an output path before any work: its folder exists, it is not silently replaced."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{flag} {path} is a folder; pass a file name")
    if not path.parent.is_dir():
        raise UserInputError(
            f"{flag} {path}: folder {path.parent} does not exist; create it first or choose "
            "another path"
        )
    if path.exists() and not overwrite:
        raise UserInputError(f"{flag} {path} already exists; pass --overwrite to replace it")
    return path


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(
    path: str | Path,
    *,
    overwrite: bool,
    flag: str = "--output_dir",
    inputs: Sequence[str | Path] = (),
    foreign: Callable[[Path], list[str]] | None = None,
    writer: str = "this command",
) -> Path:
    """An output folder must be new or empty unless ``overwrite``, and never holds an input.

    Parameters
    ----------
    path
        The folder.
    overwrite
        The user passed ``--overwrite``.
    flag
        Name of the option, for messages.
    inputs
        Files read by the command; a folder that is or holds one of them is always refused.
    foreign
        For a folder that ``overwrite`` replaces as a whole: returns the entries of the folder
        that the command did not write; any such entry makes the folder refused.
    writer
        Who writes the folder, for messages (e.g. ``"preprocess"``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{flag} {path} is a file, not a folder; choose another path")
    real = path.resolve()
    for source in inputs:
        source = Path(source)
        if any(_inside(s, real) for s in (source.absolute(), source.resolve())):
            raise UserInputError(
                f"{flag} {path} holds the input {source}; writing there would replace it: "
                "choose a new folder"
            )
    if _inside(Path.cwd().resolve(), real) and foreign is not None:
        raise UserInputError(
            f"{flag} {path} is (or holds) the current folder, which {writer} would replace; "
            f"pass a new subfolder such as {flag} {Path(path) / 'store'}"
        )
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UserInputError(
                f"{flag} {path} exists and is not empty; pass --overwrite or choose another folder"
            )
        unknown = foreign(path) if foreign is not None else []
        if unknown:
            names = ", ".join(unknown[:5]) + (
                f", … {len(unknown) - 5} more" if len(unknown) > 5 else ""
            )
            raise UserInputError(
                f"{flag} {path} holds files {writer} did not write ({names}); --overwrite "
                f"replaces only what {writer} wrote: move them away, or choose a new folder"
            )
    return path


# --------------------------------------------------------------------------------------------
# Writing


class StagedOutputs:
    """Outputs written to temporary siblings and renamed into place together by :meth:`commit`.

    Call the object with a target path to get the temporary file to write it to; missing
    folders are created (and removed again by :meth:`discard` when left empty).
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self._created: list[Path] = []

    def __call__(self, path: str | Path) -> Path:
        path = Path(path)
        missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        self._created += [p for p in missing if p not in self._created]
        tmp = reserve_temporary(path)
        self._staged.append((tmp, path))
        return tmp

    def write(self, path: str | Path, write: Callable[[Path], None]) -> Path:
        """Stage ``path``: call ``write(tmp_path)``; an ``OSError`` names ``path``."""
        tmp = self(path)
        with writing(path):
            write(tmp)
        return Path(path)

    def commit(self) -> None:
        """Rename every staged file into place."""
        for tmp, path in self._staged:
            with writing(path):
                os.replace(tmp, path)
        self._staged = []

    def discard(self) -> None:
        """Remove the staged files and the folders created for them."""
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged = []
        for folder in sorted(self._created, key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


@contextmanager
def staged_outputs() -> Iterator[StagedOutputs]:
    """Stage several outputs; all of them appear on success, none of them on any error."""
    staged = StagedOutputs()
    try:
        yield staged
        staged.commit()
    except BaseException:
        staged.discard()
        raise


def write_h5ad(adata: ad.AnnData, path: str | Path) -> None:
    """Write ``adata`` as ``.h5ad`` (as :meth:`anndata.AnnData.write_h5ad` does) through a
    Python file object, so a full disk is an ``OSError`` like any other; HDF5 writing to a path
    by itself leaves a failed file that crashes the interpreter at exit."""
    adata.strings_to_categoricals()
    with open(path, "w+b") as handle, h5py.File(handle, "w") as f:
        ad.io.write_elem(f, "/", adata)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    with staged_outputs() as stage:
        stage.write(path, write)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def json_text(data: Any) -> str:
    """``data`` as indented JSON text (NaN written as null)."""
    text = json.dumps(_nan_to_none(data), indent=2, default=_json_default, allow_nan=False)
    return text + "\n"


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (NaN written as null) atomically."""
    text = json_text(data)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _nan_to_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _nan_to_none(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_nan_to_none(v) for v in data]
    if isinstance(data, float | np.floating) and not np.isfinite(data):
        return None
    return data

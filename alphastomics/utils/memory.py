"""Process memory helpers: keep freed tensor memory in the C heap for reuse (glibc on Linux).

Why: PyTorch on CPU allocates every tensor with ``malloc`` and has no caching allocator. glibc
serves a block above ``M_MMAP_THRESHOLD`` (at most 32 MiB) with a fresh ``mmap`` and hands it back
with ``munmap`` when it is freed. At 100,000 cells one (N, 128) float32 activation is 51 MB, so a
training step maps, page-faults in (the kernel zeroes every 4 KiB page) and unmaps about 16 GB,
and element-wise ops run several times slower than at 10,000 cells, where every block is reused
from the heap. :func:`tune_malloc` sets ``M_MMAP_MAX = 0`` (every block comes from the heap) and
``M_TRIM_THRESHOLD = -1`` (freed memory at the top of the heap is kept, not returned to the OS),
so the next step reuses the same, already-mapped pages.

The cost: the process keeps its high-water mark of memory until it exits (or until
:func:`release_free_memory`), and fragmentation can raise that mark somewhat above the live peak.

Opt out with the environment variable ``ALPHASTOMICS_MALLOC_TUNING=0``. Nothing is changed when
the C library is not glibc, when another allocator is preloaded (jemalloc, tcmalloc, mimalloc:
``LD_PRELOAD``), or when the user already tunes glibc's malloc (``MALLOC_MMAP_MAX_``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or
``glibc.malloc.*`` in ``GLIBC_TUNABLES``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["ENV_OPT_OUT", "release_free_memory", "tune_malloc"]

logger = logging.getLogger(__name__)

ENV_OPT_OUT = "ALPHASTOMICS_MALLOC_TUNING"

# <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_USER_MALLOC_ENV = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state: dict[str, bool | str] = {"done": False, "reason": "not tried"}


def _is_glibc() -> bool:
    """True on Linux with the GNU C library."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def _skip_reason() -> str | None:
    """Why the tuning must not run here, or None when it may."""
    if os.environ.get(ENV_OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV_OPT_OUT}={os.environ[ENV_OPT_OUT]}"
    if not _is_glibc():
        return "the C library is not glibc"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return f"another allocator is preloaded (LD_PRELOAD={preload})"
    user = [name for name in _USER_MALLOC_ENV if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        return f"malloc is already tuned by the environment ({', '.join(user)})"
    return None


def tune_malloc() -> bool:
    """Keep freed memory in glibc's heap for reuse instead of unmapping it (once per process).

    Called by :class:`~alphastomics.training.module.AlphaSTomicsModule` when training
    starts and before sampling. Idempotent and cheap after the first call.

    Returns
    -------
    bool
        True when glibc's malloc is (now) tuned; False when it was skipped (see the module
        docstring for when; the reason is logged at debug level).
    """
    if _state["done"]:
        return True
    reason = _skip_reason()
    if reason is None:
        try:
            libc = ctypes.CDLL(None)
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
        except (OSError, AttributeError) as err:  # no mallopt symbol
            ok, reason = False, f"mallopt unavailable ({err})"
        else:
            reason = None if ok else "mallopt refused the settings"
    _state["done"] = reason is None
    _state["reason"] = reason or "tuned"
    if reason is None:
        logger.debug("glibc malloc tuned: M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1")
    else:
        logger.debug("glibc malloc left as is: %s", reason)
    return reason is None


def release_free_memory() -> None:
    """Return the heap's free memory to the OS (``malloc_trim(0)``); a no-op off glibc."""
    if not _is_glibc():
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        return

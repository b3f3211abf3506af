"""What the machine's processors compute natively, for choices the log can explain."""

from __future__ import annotations

import functools

import torch

__all__ = ["native_bf16"]

# torch.cpu's private capability checks (present since torch 2.1; absent ones read as no)
_CPU_BF16_CHECKS = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))


@functools.cache
def native_bf16(device_type: str) -> str | None:
    """Why ``device_type`` ("cpu" or "cuda") multiplies bfloat16 natively, or None.

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and newer). CPU: the x86 instructions that
    multiply bfloat16 in hardware (AMX, AVX512-BF16); elsewhere (most laptops, Apple silicon)
    bfloat16 is converted in software and a matrix product in it is slower than in float32.
    """
    if device_type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "this GPU multiplies bfloat16 natively"
        return None
    if device_type != "cpu":
        return None
    for name, check in _CPU_BF16_CHECKS:
        supported = getattr(torch.cpu, check, None)
        if supported is not None and supported():
            return f"this CPU multiplies bfloat16 in hardware ({name})"
    return None

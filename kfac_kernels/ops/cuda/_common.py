"""Shared plumbing of the CUDA backend: tensors to (pointer, strides) for ``_C``, the device's
shared-memory limits, the current stream."""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ... import _cext
from .._registry import NotSupported

DTYPE_CODES = {torch.float32: 0, torch.float64: 1}
_limits: Dict[Tuple, int] = {}


def check_tensor(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise NotSupported(f"the cuda backend runs on CUDA tensors; {name} is on {t.device}")
    if t.dtype not in DTYPE_CODES:
        raise NotSupported(f"the cuda backend takes float32/float64; {name} is {t.dtype}")


def device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def as_stack(t: torch.Tensor) -> torch.Tensor:
    """[B, n, n] view with unit column stride, row stride >= n and non-overlapping matrices
    (copied to contiguous memory only when the given layout does not qualify)."""
    f = t.unsqueeze(0) if t.dim() == 2 else t
    bsz, n = f.shape[0], f.shape[-1]
    ok = (f.stride(-1) == 1 or n == 1) and (f.stride(-2) >= n or n == 1)
    ok = ok and (bsz <= 1 or f.stride(0) == 0 or f.stride(0) >= (n - 1) * f.stride(-2) + n)
    return f if ok and n > 1 else f.contiguous()


def current_stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def smem_limit(kind: str, dtype: torch.dtype, fp64_accumulate: bool, dev: int) -> int:
    """Largest n of the one-block-per-matrix kernels on device ``dev`` (cached)."""
    key = (kind, dtype, fp64_accumulate, dev)
    if key not in _limits:
        C = _cext.load()
        code = DTYPE_CODES[dtype]
        _limits[key] = (C.max_n_jacobi(code, dev) if kind == "jacobi"
                        else C.max_n_inverse_smem(code, fp64_accumulate, dev))
    return _limits[key]

"""CuPy backend: cuSOLVER's batched Jacobi eigensolver (``syevjBatched``) through CuPy.

CuPy is imported only when this backend is probed or used; the data crosses by DLPack without a
copy, on torch's current stream.
"""
from __future__ import annotations

from typing import Tuple

__all__ = ["probe"]


def probe() -> Tuple[bool, str]:
    """(usable, reason): CuPy importable with cuSOLVER's syevjBatched, and a CUDA device present
    (``torch.cuda.is_available()``: an NVML query, CUDA is not initialised)."""
    try:
        import cupy
        from cupy_backends.cuda.libs import cusolver
    except Exception as exc:
        return False, f"cupy not importable ({type(exc).__name__}: {exc})"
    if not hasattr(cusolver, "ssyevjBatched"):
        return False, f"cupy {cupy.__version__} lacks cuSOLVER syevjBatched"
    import torch

    if not torch.cuda.is_available():
        return False, f"no CUDA device (cupy {cupy.__version__} imports)"
    return True, f"cupy {cupy.__version__}, cuSOLVER syevjBatched (n <= 32)"

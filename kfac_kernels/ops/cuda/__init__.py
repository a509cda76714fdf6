"""CUDA C++ backend: the batched Cholesky-inverse and Jacobi kernels of ``kfac_kernels._C``.

Nothing heavy is imported here: the compiled module is loaded by the op functions
(:mod:`.damped_inverse`, :mod:`.symeig`) through :mod:`kfac_kernels._cext`. Pure-torch
re-implementations of the kernels' algorithms, for tests on machines without a GPU, live with the
tests (tests/_support/_cuda_twins.py).
"""
from __future__ import annotations

from typing import Tuple

__all__ = ["probe"]


def probe() -> Tuple[bool, str]:
    """(usable, reason): ``_C`` must import and a CUDA device must be present (checked through
    NVML by ``torch.cuda.is_available()``, which does not initialise CUDA)."""
    from ... import _cext

    ok, why = _cext.status()
    if not ok:
        return False, f"kfac_kernels._C {why}"
    import torch

    if not torch.cuda.is_available():
        return False, f"no CUDA device (kfac_kernels._C is {why.split(' at ')[0]})"
    return True, f"kfac_kernels._C {why}"

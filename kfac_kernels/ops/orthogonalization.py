"""``newton_schulz``: Muon's orthogonalisation (:class:`kfac_kernels.optim.Muon`).

Reference: :func:`kfac_kernels.ops.reference.newton_schulz`; Triton:
``ops/triton/newton_schulz.py`` (both Gram products on the symmetric-product kernel). The module
is not named after the op: ``kfac_kernels.ops.newton_schulz`` is the function.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import _registry, reference
from ._checks import INPUT_DTYPES, check_number, check_tensor, compiling
from ._library import NAMESPACE, fresh

_registry.register("newton_schulz", "torch", "kfac_kernels.ops.reference:newton_schulz")
_registry.register("newton_schulz", "triton",
                   "kfac_kernels.ops.triton.newton_schulz:newton_schulz")

_NS_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


@torch.library.custom_op(f"{NAMESPACE}::newton_schulz", mutates_args=())
def _newton_schulz_op(X: torch.Tensor, steps: int, a: float, b: float, c: float, eps: float,
                      dtype: torch.dtype, allow_tf32: bool, backend: str) -> torch.Tensor:
    out = _registry.call("newton_schulz", backend, X.device, X, steps, (a, b, c), eps,
                         dtype=dtype, allow_tf32=allow_tf32)
    return fresh(out)


@_newton_schulz_op.register_fake
def _(X, steps, a, b, c, eps, dtype, allow_tf32, backend):
    return X.new_empty(X.shape, dtype=dtype)


def newton_schulz(X: torch.Tensor, steps: int = 5,
                  coefficients=reference.NS_COEFFICIENTS, eps: float = 1e-7, *,
                  dtype: Optional[torch.dtype] = None, allow_tf32: bool = False,
                  backend: str = "auto") -> torch.Tensor:
    """Muon's orthogonalisation: ``steps`` Newton-Schulz iterations towards ``U V^T`` for
    ``X = U S V^T``, batched over a stack [B, m, n] (or one [m, n]); a new tensor.

    ``Y = X / max(||X||_F, eps)`` per matrix (transposed when m > n, so the Gram matrix is the
    smaller side), then ``A = Y Y^T; Y <- a Y + (b A + c A^2) Y`` with ``coefficients = (a, b,
    c)`` (default: the quintic of Jordan et al.'s Muon, as ``torch.optim.Muon``). The arithmetic
    and the result are in ``dtype``: bfloat16, float32 or float64 (default: ``X``'s dtype, which
    must then be one of them; ``torch.optim.Muon`` iterates in bfloat16). ``A = Y Y^T`` and
    ``A^2`` are symmetric products (upper triangle computed, mirrored). ``allow_tf32`` lets fp32
    products use TF32 on GPUs. ``X`` may have any strides. See
    :func:`kfac_kernels.ops.reference.newton_schulz`.
    """
    check_tensor("X", X, INPUT_DTYPES, (2, 3))
    w = X.dtype if dtype is None else dtype
    if w not in _NS_DTYPES:
        raise TypeError(f"newton_schulz iterates in bfloat16, float32 or float64, got {w}"
                        + ("; pass dtype=torch.bfloat16 (as torch.optim.Muon) or torch.float32"
                           if dtype is None else ""))
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
        raise ValueError(f"coefficients must be three numbers (a, b, c), got {coefficients!r}")
    for name, v in zip("abc", coefficients):
        check_number(f"coefficients[{'abc'.index(name)}] ({name})", v)
    check_number("eps", eps)
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it bounds the norm divided by), got {eps}")
    a, b, c = (float(v) for v in coefficients)
    if compiling():
        return _newton_schulz_op(X, int(steps), a, b, c, float(eps), w, bool(allow_tf32),
                                 backend)
    return _registry.call("newton_schulz", backend, X.device, X, int(steps), (a, b, c),
                          float(eps), dtype=w, allow_tf32=bool(allow_tf32))

"""Triton backend of the kernel ops (imported only when an op is first dispatched here).

One module per family of ops, each holding its kernels and their host launcher (the op's
module in ``kfac_kernels/ops`` registers them, e.g. ``ops/kron.py`` those of :mod:`.kron`):

* :mod:`.syrk`         -- ``syrk_update`` / ``ema_factor_update``: symmetric rank-k update, upper
  tiles only, implicit homogeneous column, split over rows for small factors;
* :mod:`.conv_factor`  -- ``conv_input_factor``: KFC input factor with implicit im2col;
* :mod:`.kron`         -- ``kron_precondition_eigen`` / ``ekfac_precondition`` /
  ``kron_precondition_inverse``: batched Kronecker preconditioning with the eigenvalue division
  and the ``sum(U * V)`` reduction fused into the GEMM epilogues; ``kron_rotate`` (SOAP's
  rotation into and out of the eigenbases);
* :mod:`.gradient_factors` -- ``gradient_factor_update``: both Kronecker factors of a stack of
  gradient matrices (Shampoo / SOAP) in one launch;
* :mod:`.newton_schulz` -- ``newton_schulz``: Muon's orthogonalisation, batched over a stack,
  both Gram products on upper-triangle tiles (three launches per iteration).

Shared pieces: :mod:`._common` (tile helpers of the symmetric products, host helpers) and
:mod:`._aot` (the ahead-of-time compile check of every kernel configuration, no GPU needed).

The backend runs on CUDA devices, and on CPU tensors when Triton's interpreter is switched on
(``TRITON_INTERPRET=1`` set before triton is first imported), which is how the tests run it on
machines without a GPU.
"""
from __future__ import annotations

import contextlib
import os

__all__ = ["probe", "interpreting", "tf32_matmul"]

_TRUE = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """True when Triton's interpreter is on (kernels then run on the CPU, on CPU tensors)."""
    try:
        import triton

        knobs = getattr(triton, "knobs", None)
        if knobs is not None:
            return bool(knobs.runtime.interpret)
    except Exception:  # pragma: no cover - probe() reports the import failure
        pass
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def probe():
    """(ok, reason): ok when triton imports and either a CUDA device or the interpreter is there."""
    try:
        import triton
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    version = getattr(triton, "__version__", "?")
    if interpreting():
        return True, f"triton {version} (interpreter: TRITON_INTERPRET=1, CPU tensors accepted)"
    import torch

    if torch.cuda.is_available():
        return True, f"triton {version} on CUDA"
    return False, (f"triton {version} is installed but there is no CUDA device "
                   "(set TRITON_INTERPRET=1 before importing triton to run its kernels on CPU)")


@contextlib.contextmanager
def tf32_matmul():
    """Let torch's fp32 matmuls use TF32 inside the block (the baseline that the Triton kernels'
    ``allow_tf32`` mode is compared with in tests and benchmarks); restores the old setting."""
    import torch

    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):          # torch >= 2.9
        old = m.fp32_precision
        m.fp32_precision = "tf32"
        try:
            yield
        finally:
            m.fp32_precision = old
    else:
        old = m.allow_tf32
        m.allow_tf32 = True
        try:
            yield
        finally:
            m.allow_tf32 = old

"""``damped_inverse`` on the CUDA kernels: batched (F + gamma I)^{-1} by Cholesky (csrc/cholesky.cuh)."""
from __future__ import annotations

import torch

from ... import _cext
from .._decomp_policy import INVERSE_SMEM_AUTO_MAX_N
from .._registry import NotSupported
from ._common import DTYPE_CODES, as_stack, check_tensor, current_stream, device_index, smem_limit

__all__ = ["damped_inverse"]

VARIANTS = ("auto", "smem", "blocked")


def damped_inverse(factors: torch.Tensor, damping, *, return_info: bool = False,
                   variant: str = "auto", fp64_accumulate: bool = True):
    """Same contract as :func:`kfac_kernels.ops.reference.damped_inverse`.

    ``variant``: ``"smem"`` (one thread block per matrix in shared memory; n up to ~240 fp32 on
    an H100, declined beyond the device's limit), ``"blocked"`` (32 x 32 tiles, any n) or
    ``"auto"`` (smem up to ``INVERSE_SMEM_AUTO_MAX_N``, a guess). ``fp64_accumulate``: fp64 dot
    products for float32 input (default; float64 input always accumulates in fp64).
    """
    check_tensor("factors", factors)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    squeeze = factors.dim() == 2
    f = as_stack(factors)
    bsz, n = f.shape[0], f.shape[-1]
    out = torch.empty((bsz, n, n), dtype=f.dtype, device=f.device)
    info = torch.zeros(bsz, dtype=torch.int32, device=f.device)
    if bsz and n:
        dev = device_index(f)
        acc = bool(fp64_accumulate) or f.dtype == torch.float64
        limit = smem_limit("inverse", f.dtype, acc, dev)
        if variant == "auto":
            variant = "smem" if n <= min(limit, INVERSE_SMEM_AUTO_MAX_N) else "blocked"
        if variant == "smem" and n > limit:
            raise NotSupported(f"n = {n} is beyond the shared-memory Cholesky kernel on this "
                               f"device (n <= {limit} for {f.dtype}); use variant='blocked'")
        blocked = variant == "blocked"
        work = torch.empty_like(out) if blocked else None
        if isinstance(damping, torch.Tensor):
            g = damping.to(device=f.device, dtype=f.dtype).reshape(-1).contiguous()
            gamma, gamma_stride, gamma_scalar = g.data_ptr(), (1 if damping.dim() else 0), 0.0
        else:
            g, gamma, gamma_stride, gamma_scalar = None, 0, 0, float(damping)
        C = _cext.load()
        C.damped_inverse(F=f.data_ptr(), f_stride_b=f.stride(0), f_stride_r=f.stride(-2),
                         out=out.data_ptr(), work=work.data_ptr() if blocked else 0,
                         info=info.data_ptr(), gamma=gamma, gamma_stride=gamma_stride,
                         gamma_scalar=gamma_scalar, batch=bsz, n=n, dtype=DTYPE_CODES[f.dtype],
                         variant=C.VARIANT_BLOCKED if blocked else C.VARIANT_SMEM,
                         fp64_accumulate=acc, device=dev, stream=current_stream(f))
        del g, work  # stream-ordered reuse by torch's allocator is safe
    if squeeze:
        out, info = out[0], info[0]
    return (out, info) if return_info else out

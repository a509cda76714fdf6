"""``symeig`` by cuSOLVER ``syevjBatched`` through CuPy: batched Jacobi for n <= 32, with the
tolerance and the sweep limit exposed. Larger n is declined (NotSupported)."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .._registry import NotSupported

__all__ = ["symeig", "MAX_N", "DEFAULT_MAX_SWEEPS"]

#: cuSOLVER's syevjBatched takes matrices up to 32 x 32
MAX_N = 32
#: cuSOLVER's own default
DEFAULT_MAX_SWEEPS = 100


def _cupy_stream(cp, torch_stream, device_index: int):
    if hasattr(torch_stream, "__cuda_stream__"):
        return cp.cuda.Stream.from_external(torch_stream)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(torch_stream.cuda_stream, device_index)


def symeig(factors: torch.Tensor, *, method: str = "auto",
           prev_eigenvectors: Optional[torch.Tensor] = None, return_info: bool = False,
           tol: Optional[float] = None, max_sweeps: Optional[int] = None,
           skip_tol: Optional[float] = None, orth: Optional[str] = None):
    """Same contract as :func:`kfac_kernels.ops.reference.symeig` for ``method`` "auto" /
    "jacobi" (others are declined). ``tol``: cuSOLVER's tolerance (default: machine accuracy),
    ``max_sweeps`` (default 100). cuSOLVER cannot start from previous eigenvectors:
    ``prev_eigenvectors`` is ignored, and so are the refresh options ``skip_tol`` / ``orth``
    (accepted so that one set of options works across backends). info: 0 converged, 1 not converged (cuSOLVER's info), 2
    non-finite input; failed matrices are NaN.
    """
    if method not in ("auto", "jacobi"):
        raise NotSupported(f"the cupy backend computes symeig by syevjBatched only (method={method!r})")
    n = factors.shape[-1]
    if n > MAX_N:
        raise NotSupported(f"cuSOLVER syevjBatched handles n <= {MAX_N}, got n = {n}")
    if factors.device.type != "cuda":
        raise NotSupported(f"the cupy backend runs on CUDA tensors; factors are on {factors.device}")
    if factors.dtype not in (torch.float32, torch.float64):
        raise NotSupported(f"the cupy backend takes float32/float64, got {factors.dtype}")
    import cupy as cp
    from cupy_backends.cuda.libs import cublas, cusolver

    squeeze = factors.dim() == 2
    f = factors.unsqueeze(0) if squeeze else factors
    bsz = f.shape[0]
    finite = torch.isfinite(f).flatten(1).all(1)
    eye = torch.eye(n, dtype=f.dtype, device=f.device)
    # cuSOLVER overwrites A with the eigenvectors (column-major: A^T in torch's row-major terms);
    # a symmetric matrix is its own column-major image. Non-finite matrices are swapped for I so
    # the solver never iterates on NaN; their outputs are set to NaN below.
    a = torch.where(finite.reshape(-1, 1, 1), f, eye).contiguous()
    w = torch.empty((bsz, n), dtype=f.dtype, device=f.device)
    info = torch.zeros(bsz, dtype=torch.int32, device=f.device)
    if bsz and n:
        dev = f.device.index if f.device.index is not None else torch.cuda.current_device()
        single = f.dtype == torch.float32
        buffer_size = cusolver.ssyevjBatched_bufferSize if single else cusolver.dsyevjBatched_bufferSize
        solve = cusolver.ssyevjBatched if single else cusolver.dsyevjBatched
        tstream = torch.cuda.current_stream(f.device)
        with cp.cuda.Device(dev), _cupy_stream(cp, tstream, dev):
            a_cp, w_cp, info_cp = cp.from_dlpack(a), cp.from_dlpack(w), cp.from_dlpack(info)
            handle = cp.cuda.device.get_cusolver_handle()
            cusolver.setStream(handle, tstream.cuda_stream)
            params = cusolver.createSyevjInfo()
            try:
                if tol is not None:
                    cusolver.xsyevjSetTolerance(params, float(tol))
                cusolver.xsyevjSetMaxSweeps(params, int(DEFAULT_MAX_SWEEPS if max_sweeps is None
                                                        else max_sweeps))
                cusolver.xsyevjSetSortEig(params, 1)
                jobz, uplo = cusolver.CUSOLVER_EIG_MODE_VECTOR, cublas.CUBLAS_FILL_MODE_LOWER
                lwork = buffer_size(handle, jobz, uplo, n, a_cp.data.ptr, n, w_cp.data.ptr,
                                    params, bsz)
                work = torch.empty(max(int(lwork), 1), dtype=f.dtype, device=f.device)
                solve(handle, jobz, uplo, n, a_cp.data.ptr, n, w_cp.data.ptr, work.data_ptr(),
                      int(lwork), info_cp.data.ptr, params, bsz)
            finally:
                cusolver.destroySyevjInfo(params)
    q = a.transpose(-1, -2)
    info = torch.where(finite, (info != 0).to(torch.int32), torch.full_like(info, 2))
    bad = info != 0
    w = torch.where(bad.reshape(-1, 1), torch.full_like(w, float("nan")), w)
    q = torch.where(bad.reshape(-1, 1, 1), torch.full_like(q, float("nan")), q)
    if squeeze:
        w, q, info = w[0], q[0], info[0]
    return (w, q, info) if return_info else (w, q)

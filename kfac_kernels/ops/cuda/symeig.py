"""``symeig`` on the CUDA kernels: batched Jacobi (csrc/jacobi.cuh), optionally warm-started, and
the warm-started refresh with the Jacobi kernel as its Rayleigh-Ritz step."""
from __future__ import annotations

from typing import Optional

import torch

from ... import _cext
from .. import reference
from .._registry import NotSupported
from ._common import DTYPE_CODES, as_stack, check_tensor, current_stream, device_index, smem_limit

__all__ = ["symeig", "jacobi_eigh", "DEFAULT_TOL", "DEFAULT_MAX_SWEEPS"]

#: rotate a pair while |a_pq| > tol * sqrt(|a_pp a_qq|) (and above the rounding floor eps ||A||_F)
DEFAULT_TOL = {torch.float32: 1e-6, torch.float64: 1e-13}
DEFAULT_MAX_SWEEPS = 15


def jacobi_eigh(factors: torch.Tensor, prev_eigenvectors: Optional[torch.Tensor] = None, *,
                tol: Optional[float] = None, max_sweeps: Optional[int] = None):
    """The Jacobi kernel on a [B, n, n] (or [n, n]) CUDA stack.

    Returns ``(eigenvalues ascending, eigenvectors (columns), info int32, sweeps int32)``; info 0
    converged, 1 not converged within ``max_sweeps``, 2 non-finite input (failed matrices NaN).
    ``prev_eigenvectors`` (orthonormal, as a previous call returned them) start the iteration from
    ``Q0^T F Q0``. Declines (NotSupported) an n beyond the device's shared memory.
    """
    check_tensor("factors", factors)
    squeeze = factors.dim() == 2
    f = as_stack(factors)
    bsz, n = f.shape[0], f.shape[-1]
    tol = DEFAULT_TOL[f.dtype] if tol is None else float(tol)
    max_sweeps = DEFAULT_MAX_SWEEPS if max_sweeps is None else int(max_sweeps)
    lam = torch.empty((bsz, n), dtype=f.dtype, device=f.device)
    vec = torch.empty((bsz, n, n), dtype=f.dtype, device=f.device)
    info = torch.zeros(bsz, dtype=torch.int32, device=f.device)
    sweeps = torch.zeros(bsz, dtype=torch.int32, device=f.device)
    if bsz and n:
        dev = device_index(f)
        limit = smem_limit("jacobi", f.dtype, True, dev)
        if n > limit:
            raise NotSupported(f"n = {n} is beyond the Jacobi kernel's shared memory on this "
                               f"device (n <= {limit} for {f.dtype})")
        q0 = None
        if prev_eigenvectors is not None:
            check_tensor("prev_eigenvectors", prev_eigenvectors)
            q0 = as_stack(prev_eigenvectors.to(f.dtype))
        C = _cext.load()
        C.jacobi_eigh(F=f.data_ptr(), f_stride_b=f.stride(0), f_stride_r=f.stride(-2),
                      Q0=q0.data_ptr() if q0 is not None else 0,
                      q_stride_b=q0.stride(0) if q0 is not None else 0,
                      q_stride_r=q0.stride(-2) if q0 is not None else 0,
                      evals=lam.data_ptr(), evecs=vec.data_ptr(), info=info.data_ptr(),
                      sweeps=sweeps.data_ptr(), batch=bsz, n=n, dtype=DTYPE_CODES[f.dtype],
                      tol=tol, max_sweeps=max_sweeps, device=dev, stream=current_stream(f))
        del q0
    if squeeze:
        lam, vec, info, sweeps = lam[0], vec[0], info[0], sweeps[0]
    return lam, vec, info, sweeps


def symeig(factors: torch.Tensor, *, method: str = "auto",
           prev_eigenvectors: Optional[torch.Tensor] = None, return_info: bool = False,
           tol: Optional[float] = None, max_sweeps: Optional[int] = None,
           skip_tol: float = 1e-4, orth: str = "qr"):
    """Same contract as :func:`kfac_kernels.ops.reference.symeig`.

    ``"auto"`` / ``"jacobi"``: the Jacobi kernel (warm-started from ``prev_eigenvectors`` when
    given). ``"refresh"``: :func:`kfac_kernels.ops.reference.refresh_eigh` with the kernel,
    warm-started from the re-orthonormalised ``F Q_prev``, as the Rayleigh-Ritz step.
    ``"eigh"`` is declined (torch's).
    """
    check_tensor("factors", factors)
    if method == "eigh":
        raise NotSupported("the cuda backend computes symeig by Jacobi; method='eigh' is torch's")
    n = factors.shape[-1]
    if n > smem_limit("jacobi", factors.dtype, True, device_index(factors)):
        raise NotSupported(f"n = {n} is beyond the Jacobi kernel's shared memory on this device")
    if method == "refresh":
        if prev_eigenvectors is None:
            raise ValueError("method='refresh' needs prev_eigenvectors")
        squeeze = factors.dim() == 2
        f = factors.unsqueeze(0) if squeeze else factors
        q0 = prev_eigenvectors.unsqueeze(0) if squeeze else prev_eigenvectors

        def rayleigh_ritz(fs, q1):
            lam_s, q_s, info_s, _ = jacobi_eigh(fs, q1, tol=tol, max_sweeps=max_sweeps)
            return lam_s, q_s, info_s

        lam, q, info, _ = reference.refresh_eigh(f, q0, skip_tol=skip_tol, orth=orth,
                                                 rayleigh_ritz=rayleigh_ritz)
        if squeeze:
            lam, q, info = lam[0], q[0], info[0]
    elif method in ("auto", "jacobi"):
        lam, q, info, _ = jacobi_eigh(factors, prev_eigenvectors, tol=tol, max_sweeps=max_sweeps)
    else:
        raise ValueError(f"unknown symeig method {method!r}")
    return (lam, q, info) if return_info else (lam, q)

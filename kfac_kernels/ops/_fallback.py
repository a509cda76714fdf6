"""Decompositions that return no NaN for a finite input, whatever the backend.

LAPACK and the GPU solvers can return NaN for a finite, symmetric, positive semidefinite matrix:
a float32 ``torch.linalg.eigh`` of a rank-deficient factor did so on one CPU code path (one
thread) and not on another (two threads). Every optimizer built on the ops (K-FAC, Shampoo, SOAP)
would then write that NaN into its weights. So the public decomposition ops check their outputs
and repair, per matrix, what failed on a finite input:

``symeig`` / ``inverse_root`` (which decomposes through ``symeig``)
    1. again in float64 (``torch.linalg.eigh`` on the lower triangle, the triangle the solvers
       read), the result cast back to the input's dtype;
    2. if that is still not finite: float64 with a shift, ``eigh(F + c I)`` with
       ``c = 1e-3 max |F_ii|`` (the same eigenvectors; ``c`` is subtracted from the eigenvalues
       again, exactly up to float64 rounding).

``damped_inverse``
    the Cholesky factorisation again in float64. No shift: a shift would change the damping the
    caller asked for, so a matrix that is not positive definite in float64 either keeps NaN and
    its nonzero ``info`` (the contract of the op).

A matrix whose input is not finite keeps its NaN output and nonzero ``info``: there is nothing to
decompose. The check is one reduction and one host read per call (the decompositions already wait
for their solver); the repair runs only for the failed matrices. :func:`counts` tells how often each
step of the repair ran in this process.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

__all__ = ["counts", "repair_symeig", "repair_damped_inverse"]

_COUNTS: Dict[str, int] = {"symeig_float64": 0, "symeig_shift": 0, "symeig_failed": 0,
                           "damped_inverse_float64": 0, "damped_inverse_failed": 0}

_SHIFT = 1e-3


def counts() -> Dict[str, int]:
    """How many matrices each repair step handled in this process (``symeig_float64``,
    ``symeig_shift``, ``symeig_failed`` (finite input, still not finite),
    ``damped_inverse_float64``, ``damped_inverse_failed``)."""
    return dict(_COUNTS)


def _finite_rows(*tensors: torch.Tensor, dims) -> torch.Tensor:
    """Per matrix: are all entries finite? As one sum per matrix in a wide dtype (a sum is finite
    iff its terms are, for bounded terms: eigenvectors are, eigenvalues and inverses of finite
    inputs are too)."""
    ok = None
    for t, d in zip(tensors, dims):
        wide = torch.float64 if t.dtype == torch.float64 else torch.float32
        s = torch.isfinite(t.sum(d, dtype=wide))
        ok = s if ok is None else ok & s
    return ok


def _lower_symmetric(f: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle is ``f``'s (what the solvers read)."""
    low = torch.tril(f)
    return low + torch.tril(f, -1).transpose(-1, -2)


def _eigh64(f: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 eigh of each matrix of [k, n, n]; NaN for a matrix whose solver raises (the
    reference's isolation of failures)."""
    from .reference import _eigh_isolated
    return _eigh_isolated(f)


def repair_symeig(factors: torch.Tensor, lam: torch.Tensor, q: torch.Tensor,
                  info: torch.Tensor):
    """``(lam, q, info)`` of a symeig call with every matrix that failed on a finite input
    decomposed again (float64, then float64 with a shift); see the module docstring."""
    squeeze = factors.dim() == 2
    f = factors.unsqueeze(0) if squeeze else factors
    lam3 = lam.unsqueeze(0) if squeeze else lam
    q3 = q.unsqueeze(0) if squeeze else q
    ok = _finite_rows(lam3, q3, dims=((-1,), (-2, -1)))
    if bool(ok.all()):                    # the one host read of a call that needed nothing
        return lam, q, info
    bad = (~ok) & torch.isfinite(f).flatten(-2).all(-1)
    idx = bad.nonzero().flatten()
    if idx.numel() == 0:
        return lam, q, info
    sub = _lower_symmetric(f.index_select(0, idx).to(torch.float64))
    l64, v64 = _eigh64(sub)
    fixed = _finite_rows(l64, v64, dims=((-1,), (-2, -1)))
    _COUNTS["symeig_float64"] += int(fixed.sum())
    if not bool(fixed.all()):
        j = (~fixed).nonzero().flatten()
        s = sub.index_select(0, j)
        c = _SHIFT * torch.diagonal(s, dim1=-2, dim2=-1).abs().amax(-1).clamp_min(
            torch.finfo(torch.float64).tiny)
        eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
        ls, vs = _eigh64(s + c[:, None, None] * eye)
        ls = ls - c[:, None]
        good = _finite_rows(ls, vs, dims=((-1,), (-2, -1)))
        _COUNTS["symeig_shift"] += int(good.sum())
        _COUNTS["symeig_failed"] += int((~good).sum())
        l64, v64 = l64.index_copy(0, j, ls), v64.index_copy(0, j, vs)
        fixed = fixed.index_copy(0, j, good)
    lam3 = lam3.index_copy(0, idx, l64.to(lam3.dtype))
    q3 = q3.index_copy(0, idx, v64.to(q3.dtype))
    info3 = info.reshape(-1).to(torch.int32)
    info3 = info3.index_copy(0, idx, torch.where(fixed, 0, torch.clamp_min(
        info3.index_select(0, idx), 1)).to(torch.int32))
    if squeeze:
        return lam3[0], q3[0], info3.reshape(info.shape)
    return lam3, q3, info3.reshape(info.shape)


def repair_damped_inverse(factors: torch.Tensor, damping, inv: torch.Tensor, info: torch.Tensor,
                          solve):
    """``(inv, info)`` of a damped_inverse call with the matrices that failed on a finite input
    factorised again in float64 by ``solve(factors64, damping64) -> (inv, info)`` (the torch
    reference)."""
    squeeze = factors.dim() == 2
    f = factors.unsqueeze(0) if squeeze else factors
    inv3 = inv.unsqueeze(0) if squeeze else inv
    info3 = info.reshape(-1).to(torch.int32)
    failed = (info3 != 0) | ~_finite_rows(inv3, dims=((-2, -1),))
    if not bool(failed.any()):
        return inv, info
    bad = failed & torch.isfinite(f).flatten(-2).all(-1)
    idx = bad.nonzero().flatten()
    if idx.numel() == 0:
        return inv, info
    d = damping
    if isinstance(d, torch.Tensor) and d.dim() > 0:
        d = d.reshape(-1).index_select(0, idx.to(d.device)).to(torch.float64)
    elif isinstance(d, torch.Tensor):
        d = d.to(torch.float64)
    sub = f.index_select(0, idx).to(torch.float64)
    i64, n64 = solve(sub, d)
    n64 = n64.reshape(-1).to(torch.int32)
    good = (n64 == 0) & _finite_rows(i64, dims=((-2, -1),))
    _COUNTS["damped_inverse_float64"] += int(good.sum())
    _COUNTS["damped_inverse_failed"] += int((~good).sum())
    keep = good[:, None, None]
    old = inv3.index_select(0, idx)
    inv3 = inv3.index_copy(0, idx, torch.where(keep, i64.to(inv3.dtype), old))
    info3 = info3.index_copy(0, idx, torch.where(good, 0, info3.index_select(0, idx)))
    if squeeze:
        return inv3[0], info3.reshape(info.shape)
    return inv3, info3.reshape(info.shape)

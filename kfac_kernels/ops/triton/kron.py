"""Kronecker-factored preconditioning in Triton, batched over stacks of same-shaped layers.

Every product is one launch of a batched GEMM kernel (grid: output tiles x matrices) that reads
its operands through strides, so transposed eigenvector matrices are never copied, and casts them
to the working precision (the factors' dtype) on load:

* eigen / EKFAC:  T1 = QG^T V;  W = (T1 QA) / D;  T2 = QG W;  U = T2 QA^T
  where the division by D = clamp(lamG, 0) clamp(lamA, 0)^T + damping (EKFAC: clamp(scalings, 0)
  + damping) is fused into the second GEMM's epilogue (D <= 0 gives 0, as the reference); with
  damping 0 the eigenvalues (scalings) below the pseudo-inverse cut-off are zeroed first, by
  ``reference.pinv_cut`` on the host side (no sync; skipped for a positive number damping);
* inverse:        T1 = G_inv V;  U = T1 A_inv.

With ``return_dot`` the last GEMM's epilogue also reduces sum(U * V) over its tile; the per-tile
partials ([B, tiles], deterministic) are summed by one small torch reduction.
Damping is a float (passed as an fp32 hi/lo pair, exact enough for fp64), a 0-d tensor or one
value per matrix, read on the device (no host synchronisation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._registry import NotSupported
from ..reference import pinv_cut
from ._common import (Launch, cdiv, check_devices, empty, fits_int32, run_all, split_f64,
                      torch_allows_tf32)

__all__ = ["kron_precondition_eigen", "ekfac_precondition", "kron_precondition_inverse",
           "kron_rotate"]

EPI_NONE, EPI_EIGEN, EPI_EKFAC, EPI_DOT = 0, 1, 2, 3


@triton.jit
def _kron_mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                    sab, sam, sak, sbb, sbk, sbn, scb, scm, scn,
                    e1_ptr, se1b, se1m, se1n, e2_ptr, se2b, se2n,
                    d_ptr, sdb, damp_hi, damp_lo,
                    v_ptr, svb, svm, svn, dot_ptr,
                    W: tl.constexpr, PRECISION: tl.constexpr, EPI: tl.constexpr,
                    DAMP_TENSOR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C[b] = A[b] @ B[b] in precision W, with the epilogue EPI. Grid (tiles, B).

    EPI 1 (eigen): C = acc / (clamp(e1[b, m], 0) * clamp(e2[b, n], 0) + damping), 0 where the
    denominator is <= 0; EPI 2 (EKFAC): C = acc / (clamp(e1[b, m, n], 0) + damping), likewise;
    EPI 3: also dot[b, tile] = sum over the tile of C * V[b].
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # grouped tile order: GROUP_M row-tiles share the B columns they read while resident in L2
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    in_group = GROUP_M * grid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mm = rm < M
    mn = rn < N
    pa = a_ptr + b * sab + rm[:, None] * sam + rk[None, :] * sak
    pb = b_ptr + b * sbb + rk[:, None] * sbk + rn[None, :] * sbn
    acc = tl.zeros((BM, BN), dtype=W)
    for k0 in range(0, K, BK):
        kk = (k0 + rk) < K
        a = tl.load(pa, mask=mm[:, None] & kk[None, :], other=0.0).to(W)
        bb = tl.load(pb, mask=kk[:, None] & mn[None, :], other=0.0).to(W)
        acc = tl.dot(a, bb, acc, input_precision=PRECISION, out_dtype=W)
        pa += BK * sak
        pb += BK * sbk
    m2 = mm[:, None] & mn[None, :]
    if EPI == 1 or EPI == 2:
        if DAMP_TENSOR:
            damp = tl.load(d_ptr + b * sdb).to(W)
        else:
            damp = tl.cast(damp_hi, tl.float32).to(W) + tl.cast(damp_lo, tl.float32).to(W)
        if EPI == 1:
            lg = tl.maximum(tl.load(e1_ptr + b * se1b + rm * se1m, mask=mm, other=0.0).to(W), 0.0)
            la = tl.maximum(tl.load(e2_ptr + b * se2b + rn * se2n, mask=mn, other=0.0).to(W), 0.0)
            den = lg[:, None] * la[None, :] + damp
        else:
            sc = tl.load(e1_ptr + b * se1b + rm[:, None] * se1m + rn[None, :] * se1n, mask=m2,
                         other=0.0).to(W)
            den = tl.maximum(sc, 0.0) + damp
        pos = den > 0
        acc = tl.where(pos, acc / tl.where(pos, den, 1.0), 0.0)
    tl.store(c_ptr + b * scb + rm[:, None] * scm + rn[None, :] * scn, acc, mask=m2)
    if EPI == 3:
        v = tl.load(v_ptr + b * svb + rm[:, None] * svm + rn[None, :] * svn, mask=m2,
                    other=0.0).to(W)
        part = tl.sum(tl.sum(tl.where(m2, acc * v, 0.0), axis=1), axis=0)
        tl.store(dot_ptr + b * (grid_m * grid_n) + pid, part)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class KronConfig:
    w: object
    precision: str
    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int


def pick_config(w_dtype: torch.dtype, allow_tf32: bool) -> KronConfig:
    """64 x 64 tiles everywhere: larger ones spill in the dot and EKFAC epilogues (which load a
    second tile), and K-FAC stacks have tiles to spare. Exact fp32 runs on the FMA units, whose
    dot holds whole K slices in registers: the shortest K step tl.dot accepts (16) there."""
    if w_dtype == torch.float64:
        return KronConfig(tl.float64, "ieee", 64, 64, 16, 4, 2)
    if allow_tf32:
        return KronConfig(tl.float32, "tf32", 64, 64, 32, 4, 3)
    return KronConfig(tl.float32, "ieee", 64, 64, 16, 4, 3)


def _mm(A, B, C, cfg, epi=EPI_NONE, *, e1=None, e2=None, damping=None, V=None, dot=None):
    """Launch for C = A @ B (all [Bt, *, *] views) with epilogue ``epi``."""
    Bt, M, K = A.shape
    N = B.shape[2]
    grid = (cdiv(M, cfg.bm) * cdiv(N, cfg.bn), Bt)
    dummy = C
    e1 = e1 if e1 is not None else dummy
    e2 = e2 if e2 is not None else dummy
    e1s = (e1.stride(0), e1.stride(1), e1.stride(2) if e1.dim() == 3 else 0)
    damp_tensor = isinstance(damping, torch.Tensor)
    if damp_tensor:
        d_ptr, sdb, dh, dl = damping, (damping.stride(0) if damping.dim() else 0), 0.0, 0.0
    else:
        dh, dl = split_f64(damping or 0.0)
        d_ptr, sdb = dummy, 0
    V = V if V is not None else dummy
    dot = dot if dot is not None else dummy
    return Launch(
        _kron_mm_kernel, grid,
        dict(a_ptr=A, b_ptr=B, c_ptr=C, M=M, N=N, K=K,
             sab=A.stride(0), sam=A.stride(1), sak=A.stride(2),
             sbb=B.stride(0), sbk=B.stride(1), sbn=B.stride(2),
             scb=C.stride(0), scm=C.stride(1), scn=C.stride(2),
             e1_ptr=e1, se1b=e1s[0], se1m=e1s[1], se1n=e1s[2],
             e2_ptr=e2, se2b=e2.stride(0), se2n=e2.stride(1),
             d_ptr=d_ptr, sdb=sdb, damp_hi=dh, damp_lo=dl,
             v_ptr=V, svb=V.stride(0), svm=V.stride(1), svn=V.stride(2), dot_ptr=dot),
        dict(W=cfg.w, PRECISION=cfg.precision, EPI=epi, DAMP_TENSOR=damp_tensor,
             BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=8),
        cfg.num_warps, cfg.num_stages)


def _prepare(V, left, right, allow_tf32):
    check_devices(V, left, right)
    squeeze = V.dim() == 2
    if squeeze:
        V, left, right = V.unsqueeze(0), left.unsqueeze(0), right.unsqueeze(0)
    for t in (V, left, right):
        if not fits_int32(t):
            raise NotSupported("a stack spanning more than 2^31 elements")
    if allow_tf32 is None:
        allow_tf32 = torch_allows_tf32()
    cfg = pick_config(left.dtype, allow_tf32)
    return V, left, right, cfg, squeeze


def _damping_arg(damping, squeeze):
    if isinstance(damping, torch.Tensor):
        return damping.reshape(()) if squeeze or damping.dim() == 0 else damping
    return float(damping)


def _cut(x, w, damping, dims):
    """The reference's pseudo-inverse cut-off (``pinv_cut``) in the working dtype ``w``, where the
    damping is 0; a positive number damping leaves ``x`` as it is (the kernel clamps at 0)."""
    if not isinstance(damping, torch.Tensor) and damping != 0:
        return x
    return pinv_cut(x.to(w), damping, dims)


def _eig_plan(V, QG, QA, cfg, denominators, damping, return_dot, U=None):
    """Launches of U = QG [(QG^T V QA) / D] QA^T; returns (launches, U, dot partials or None)."""
    Bt, m, n = V.shape
    w = QG.dtype
    T1 = empty((Bt, m, n), dtype=w, device=V.device)
    W = empty((Bt, m, n), dtype=w, device=V.device)
    T2 = empty((Bt, m, n), dtype=w, device=V.device)
    U = empty((Bt, m, n), dtype=V.dtype, device=V.device) if U is None else U
    kind, e1, e2 = denominators
    dots = (empty((Bt, cdiv(m, cfg.bm) * cdiv(n, cfg.bn)), dtype=w, device=V.device)
            if return_dot else None)
    launches = [
        _mm(QG.transpose(1, 2), V, T1, cfg),
        _mm(T1, QA, W, cfg, kind, e1=e1, e2=e2, damping=damping),
        _mm(QG, W, T2, cfg),
        _mm(T2, QA.transpose(1, 2), U, cfg, EPI_DOT if return_dot else EPI_NONE, V=V, dot=dots),
    ]
    return launches, U, dots


def _finish(U, dots, squeeze, return_dot):
    if squeeze:
        U = U[0]
    if not return_dot:
        return U
    dot = dots.sum(-1)
    return U, (dot[0] if squeeze else dot)


def kron_precondition_eigen(V, QG, lamG, QA, lamA, damping, *, return_dot: bool = False,
                            allow_tf32=None):
    """Triton ``U = QG [(QG^T V QA) / (lamG lamA^T + damping)] QA^T`` (see the module doc)."""
    squeeze = V.dim() == 2
    V, QG, QA, cfg, _ = _prepare(V, QG, QA, allow_tf32)
    if squeeze:
        lamG, lamA = lamG.unsqueeze(0), lamA.unsqueeze(0)
    damping = _damping_arg(damping, squeeze)
    lamG, lamA = _cut(lamG, QG.dtype, damping, 1), _cut(lamA, QG.dtype, damping, 1)
    launches, U, dots = _eig_plan(V, QG, QA, cfg, (EPI_EIGEN, lamG, lamA), damping, return_dot)
    run_all(launches)
    return _finish(U, dots, squeeze, return_dot)


def ekfac_precondition(V, QG, QA, scalings, damping, *, return_dot: bool = False,
                       allow_tf32=None):
    """Triton EKFAC ``U = QG [(QG^T V QA) / (scalings + damping)] QA^T``."""
    squeeze = V.dim() == 2
    V, QG, QA, cfg, _ = _prepare(V, QG, QA, allow_tf32)
    if squeeze:
        scalings = scalings.unsqueeze(0)
    damping = _damping_arg(damping, squeeze)
    scalings = _cut(scalings, QG.dtype, damping, 2)
    launches, U, dots = _eig_plan(V, QG, QA, cfg, (EPI_EKFAC, scalings, None), damping,
                                  return_dot)
    run_all(launches)
    return _finish(U, dots, squeeze, return_dot)


def _inv_plan(V, G_inv, A_inv, cfg, return_dot):
    Bt, m, n = V.shape
    T1 = empty((Bt, m, n), dtype=G_inv.dtype, device=V.device)
    U = empty((Bt, m, n), dtype=V.dtype, device=V.device)
    dots = (empty((Bt, cdiv(m, cfg.bm) * cdiv(n, cfg.bn)), dtype=G_inv.dtype,
                        device=V.device) if return_dot else None)
    launches = [_mm(G_inv, V, T1, cfg),
                _mm(T1, A_inv, U, cfg, EPI_DOT if return_dot else EPI_NONE, V=V, dot=dots)]
    return launches, U, dots


def kron_precondition_inverse(V, G_inv, A_inv, *, return_dot: bool = False, allow_tf32=None):
    """Triton ``U = G_inv V A_inv``."""
    V, G_inv, A_inv, cfg, squeeze = _prepare(V, G_inv, A_inv, allow_tf32)
    launches, U, dots = _inv_plan(V, G_inv, A_inv, cfg, return_dot)
    run_all(launches)
    return _finish(U, dots, squeeze, return_dot)


def kron_rotate(V, QL, QR, *, back: bool = False, allow_tf32=None):
    """Triton ``QL^T V QR`` (``back``: ``QL V QR^T``); a side given as None is the identity, so
    one launch instead of two. Transposes are strides; the result is in the bases' dtype."""
    ref = QL if QL is not None else QR
    squeeze = V.dim() == 2
    check_devices(V, QL, QR)
    if squeeze:
        V = V.unsqueeze(0)
        QL = None if QL is None else QL.unsqueeze(0)
        QR = None if QR is None else QR.unsqueeze(0)
    for t in (V, QL, QR):
        if t is not None and not fits_int32(t):
            raise NotSupported("a stack spanning more than 2^31 elements")
    if allow_tf32 is None:
        allow_tf32 = torch_allows_tf32()
    cfg = pick_config(ref.dtype, allow_tf32)
    Bt, m, n = V.shape
    launches, cur = [], V
    if QL is not None:
        T = empty((Bt, m, n), dtype=ref.dtype, device=V.device)
        launches.append(_mm(QL if back else QL.transpose(1, 2), cur, T, cfg))
        cur = T
    if QR is not None:
        U = empty((Bt, m, n), dtype=ref.dtype, device=V.device)
        launches.append(_mm(cur, QR.transpose(1, 2) if back else QR, U, cfg))
        cur = U
    run_all(launches)
    return cur[0] if squeeze else cur


def aot_cases():
    """Representative launches of every configuration (planned on meta tensors) for ``_aot``:
    (op, label, launch, core); ``core`` marks one launch of each epilogue per precision."""
    out = []
    B, m, n = 12, 2304, 769          # GPT-2 small attention c_attn with its bias column
    meta = dict(device="meta")
    for wname, w, tf32 in (("fp32 ieee", torch.float32, False), ("fp32 tf32", torch.float32, True),
                           ("fp64", torch.float64, False)):
        cfg = pick_config(w, tf32)
        vdtypes = (("fp64", torch.float64),) if w == torch.float64 else (
            ("bf16", torch.bfloat16), ("fp32", torch.float32))
        for vname, vd in vdtypes:
            V = torch.empty(B, m, n, dtype=vd, **meta)
            QG = torch.empty(B, m, m, dtype=w, **meta)
            QA = torch.empty(B, n, n, dtype=w, **meta)
            lamG = torch.empty(B, m, dtype=w, **meta)
            lamA = torch.empty(B, n, dtype=w, **meta)
            damp = torch.empty(B, dtype=w, **meta)
            scalings = torch.empty(B, m, n, dtype=w, **meta)
            tag = f"W {wname}, V {vname}, [{B},{m},{n}]"
            first = vname == vdtypes[0][0]
            ls, _, _ = _eig_plan(V, QG, QA, cfg, (EPI_EIGEN, lamG, lamA), 1e-3, True)
            names = ("QG^T V", "(.) QA / D, float damping", "QG (.)", "(.) QA^T + dot")
            for i, (name, launch) in enumerate(zip(names, ls)):
                if i == 2 and not first:
                    continue            # QG (.) reads no V: the same compile for every V dtype
                out.append(("kron_precondition_eigen", f"{tag}: {name}", launch,
                            first and i in (0, 1, 3)))
            ls, _, _ = _eig_plan(V, QG, QA, cfg, (EPI_EIGEN, lamG, lamA), damp, False)
            out.append(("kron_precondition_eigen", f"{tag}: (.) QA / D, damping [B]", ls[1],
                        False))
            out.append(("kron_precondition_eigen", f"{tag}: (.) QA^T", ls[3], False))
            ls, _, _ = _eig_plan(V, QG, QA, cfg, (EPI_EKFAC, scalings, None), damp, False)
            out.append(("ekfac_precondition", f"{tag}: (.) QA / (S + damping [B])", ls[1], first))
    return out

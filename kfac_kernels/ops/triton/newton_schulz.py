"""Muon's Newton-Schulz iteration in Triton, batched over stacks of same-shaped matrices.

With ``Y`` the wide orientation of the normalised input (``X^T`` when m > n, read through strides,
never copied), each of the ``steps`` iterations is three launches:

* ``A = Y Y^T`` on the symmetric-product kernel: one program per upper-triangle tile of A (and
  matrix of the stack), the tile stored together with its mirror, so A is exactly symmetric and
  only T (T + 1) / 2 of its T^2 tiles are computed;
* ``B = b A + c A A`` on the same kernel: A is symmetric, so ``A A = A A^T`` is again a symmetric
  product (half the work of a full one), with ``b A`` added in the epilogue (one rounding);
* ``Y <- a Y + B Y`` on a batched GEMM kernel whose epilogue adds ``a Y``.

So an iteration on an m x n matrix (m <= n) costs ``m^2 n / 2 + m^3 / 2 + m^2 n`` multiply-adds
against ``2 m^2 n + m^3`` for three plain matmuls: 2/3 of the work for a square matrix. A and B
are kept in the iteration dtype (as ``torch.optim.Muon`` does); products accumulate in fp32 (fp64
for fp64), bf16 on the tensor cores, fp32 exact (``input_precision="ieee"``) unless
``allow_tf32``. Fusing ``B Y`` into the A^2 kernel would need whole row panels of B per output
tile; instead every scalar combination rides in an epilogue, so there is no elementwise pass.
The normalisation by the Frobenius norm is one torch reduction and division before the loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._registry import NotSupported
from ._common import (TL_DTYPE, Launch, cdiv, check_devices, empty, fits_int32, run_all,
                      scalar_pair, sm_count, split_f64, upper_tile)

__all__ = ["newton_schulz"]


@triton.jit
def _ns_sym_kernel(z_ptr, c_ptr, o_ptr, M, K,
                   szb, szm, szk, scb, scm, scn, sob, som, son,
                   alpha_hi, alpha_lo, beta_hi, beta_lo,
                   W: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                   ADD: tl.constexpr, BLOCK: tl.constexpr, BK: tl.constexpr):
    """out[b] = alpha Z[b] Z[b]^T (+ beta C[b] if ADD), Z [M, K]: upper tile p of matrix b, stored
    with its mirror. Grid (P, B)."""
    p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ti, tj = upper_tile(p)
    ar = tl.arange(0, BLOCK)
    rk = tl.arange(0, BK)
    ri = ti * BLOCK + ar
    rj = tj * BLOCK + ar
    mi = ri < M
    mj = rj < M
    zb = z_ptr + b * szb
    pi = zb + ri[:, None] * szm + rk[None, :] * szk          # [BLOCK, BK]: rows of tile i
    pj = zb + rk[:, None] * szk + rj[None, :] * szm          # [BK, BLOCK]: rows of tile j, as Z^T
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    for k0 in range(0, K, BK):
        kk = (k0 + rk) < K
        zi = tl.load(pi, mask=mi[:, None] & kk[None, :], other=0.0).to(W)
        zj = tl.load(pj, mask=kk[:, None] & mj[None, :], other=0.0).to(W)
        acc = tl.dot(zi, zj, acc, input_precision=PRECISION, out_dtype=ACC)
        pi += BK * szk
        pj += BK * szk
    alpha, _ = scalar_pair(alpha_hi, alpha_lo, ACC)
    v = acc * alpha
    m2 = mi[:, None] & mj[None, :]
    if ADD:
        beta, _ = scalar_pair(beta_hi, beta_lo, ACC)
        cc = tl.load(c_ptr + b * scb + ri[:, None] * scm + rj[None, :] * scn, mask=m2, other=0.0)
        v = tl.fma(cc.to(ACC), beta, v)
    v = v.to(o_ptr.dtype.element_ty)
    # the tile (its upper triangle on the diagonal) and its mirror, from the same registers
    lim = ar[None, :] + tl.where(ti == tj, 0, 1 << 30)
    ob = o_ptr + b * sob
    tl.store(ob + ri[:, None] * som + rj[None, :] * son, v, mask=m2 & (ar[:, None] <= lim))
    tl.store(ob + ri[:, None] * son + rj[None, :] * som, v, mask=m2 & (ar[:, None] < lim))


@triton.jit
def _ns_update_kernel(bm_ptr, y_ptr, o_ptr, M, N,
                      sbb, sbm, sbk, syb, sym, syn, sob, som, son, a_hi, a_lo,
                      W: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """out[b] = a Y[b] + Bm[b] Y[b] (Bm [M, M], Y [M, N]). Grid (tiles, B)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # grouped tile order: GROUP_M row-tiles share the Y columns they read while resident in L2
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
    yb = y_ptr + b * syb
    pa = bm_ptr + b * sbb + rm[:, None] * sbm + rk[None, :] * sbk
    py = yb + rk[:, None] * sym + rn[None, :] * syn
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, M, BK):
        kk = (k0 + rk) < M
        x = tl.load(pa, mask=mm[:, None] & kk[None, :], other=0.0).to(W)
        y = tl.load(py, mask=kk[:, None] & mn[None, :], other=0.0).to(W)
        acc = tl.dot(x, y, acc, input_precision=PRECISION, out_dtype=ACC)
        pa += BK * sbk
        py += BK * sym
    a, _ = scalar_pair(a_hi, a_lo, ACC)
    m2 = mm[:, None] & mn[None, :]
    y0 = tl.load(yb + rm[:, None] * sym + rn[None, :] * syn, mask=m2, other=0.0)
    acc = tl.fma(y0.to(ACC), a, acc)
    tl.store(o_ptr + b * sob + rm[:, None] * som + rn[None, :] * son,
             acc.to(o_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class NSConfig:
    w: object            # tl dtype fed to tl.dot
    acc: object          # accumulator dtype
    precision: str       # "ieee" | "tf32"
    block: int           # square tile of the symmetric products
    bk: int              # reduction step of the symmetric products
    bm: int              # update GEMM tile
    bn: int
    bk_mm: int
    num_warps: int       # of the update GEMM
    num_stages: int
    sym_warps: int       # of the symmetric products (mirror stores: more registers)


def pick_config(w_dtype: torch.dtype, allow_tf32: bool, wide: bool = True) -> NSConfig:
    """bf16: 128-wide tiles on the tensor cores when there are enough of them to fill the
    device (``wide``), else 64. fp32 exact runs on the FMA units, whose dot holds whole K slices
    in registers: short K steps there (as syrk); fp64 likewise. The symmetric products of exact
    fp32 and fp64 take 8 warps: with 4, ``A = Y Y^T`` spills 4 bytes on sm_90 (triton 3.9)."""
    if w_dtype == torch.bfloat16:
        if wide:
            return NSConfig(tl.bfloat16, tl.float32, "ieee", 128, 64, 128, 128, 64, 8, 3, 8)
        return NSConfig(tl.bfloat16, tl.float32, "ieee", 64, 64, 64, 64, 64, 4, 3, 4)
    if w_dtype == torch.float64:
        return NSConfig(tl.float64, tl.float64, "ieee", 64, 16, 64, 64, 16, 4, 2, 8)
    if allow_tf32:
        return NSConfig(tl.float32, tl.float32, "tf32", 64, 32, 64, 64, 32, 4, 3, 4)
    return NSConfig(tl.float32, tl.float32, "ieee", 64, 16, 64, 64, 16, 4, 2, 8)


def _sym(Z, C, out, alpha, beta, cfg):
    """Launch for out = alpha Z Z^T (+ beta C): Z [B, M, K], C and out [B, M, M] (views)."""
    Bt, M, K = Z.shape
    t = cdiv(M, cfg.block)
    ah, al = split_f64(alpha)
    bh, bl = split_f64(beta)
    add = C is not None
    C = C if add else out
    return Launch(
        _ns_sym_kernel, (t * (t + 1) // 2, Bt),
        dict(z_ptr=Z, c_ptr=C, o_ptr=out, M=M, K=K,
             szb=Z.stride(0), szm=Z.stride(1), szk=Z.stride(2),
             scb=C.stride(0), scm=C.stride(1), scn=C.stride(2),
             sob=out.stride(0), som=out.stride(1), son=out.stride(2),
             alpha_hi=ah, alpha_lo=al, beta_hi=bh, beta_lo=bl),
        dict(W=cfg.w, ACC=cfg.acc, PRECISION=cfg.precision, ADD=add, BLOCK=cfg.block,
             BK=cfg.bk),
        cfg.sym_warps, cfg.num_stages)


def _update(Bm, Y, out, a, cfg):
    """Launch for out = a Y + Bm Y: Bm [B, M, M], Y and out [B, M, N] (views)."""
    Bt, M, N = Y.shape
    ah, al = split_f64(a)
    return Launch(
        _ns_update_kernel, (cdiv(M, cfg.bm) * cdiv(N, cfg.bn), Bt),
        dict(bm_ptr=Bm, y_ptr=Y, o_ptr=out, M=M, N=N,
             sbb=Bm.stride(0), sbm=Bm.stride(1), sbk=Bm.stride(2),
             syb=Y.stride(0), sym=Y.stride(1), syn=Y.stride(2),
             sob=out.stride(0), som=out.stride(1), son=out.stride(2), a_hi=ah, a_lo=al),
        dict(W=cfg.w, ACC=cfg.acc, PRECISION=cfg.precision, BM=cfg.bm, BN=cfg.bn,
             BK=cfg.bk_mm, GROUP_M=8),
        cfg.num_warps, cfg.num_stages)


def plan(Y0, steps, coefficients, allow_tf32, *, config=None):
    """The launches of ``steps`` iterations on the normalised stack ``Y0`` [B, m, n] (any
    orientation: the wide one is iterated). Returns (launches, result [B, m, n])."""
    a, b, c = (float(v) for v in coefficients)
    Bt, m, n = Y0.shape
    tall = m > n
    r, s = (n, m) if tall else (m, n)
    if config is None:
        t = cdiv(r, 128)
        config = pick_config(Y0.dtype, allow_tf32,
                             wide=Bt * t * (t + 1) // 2 >= sm_count(Y0.device))
    dev, w = Y0.device, Y0.dtype
    A = empty((Bt, r, r), dtype=w, device=dev)
    Bm = empty((Bt, r, r), dtype=w, device=dev)
    bufs = [empty((Bt, m, n), dtype=w, device=dev) for _ in range(min(steps, 2))]

    def wide(t):
        return t.transpose(1, 2) if tall else t

    launches, cur = [], Y0
    for i in range(steps):
        Y = wide(cur)
        nxt = bufs[i % 2]
        launches.append(_sym(Y, None, A, 1.0, 0.0, config))
        launches.append(_sym(A, A, Bm, c, b, config))
        launches.append(_update(Bm, Y, wide(nxt), a, config))
        cur = nxt
    return launches, cur


def newton_schulz(X, steps=5, coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, *, dtype=None,
                  allow_tf32: bool = False):
    """Triton Newton-Schulz iteration (see the module doc); a new tensor in the iteration dtype."""
    check_devices(X)
    w = X.dtype if dtype is None else dtype
    if w not in (torch.bfloat16, torch.float32, torch.float64):
        raise NotSupported(f"iteration dtype {w}")
    squeeze = X.dim() == 2
    X3 = X.unsqueeze(0) if squeeze else X
    if not fits_int32(X3[0] if X3.shape[0] else X3) or min(X3.shape[-2:]) ** 2 >= 2**31:
        raise NotSupported("a matrix spanning more than 2^31 elements")
    Y = X3.to(w)
    Y = Y / torch.linalg.vector_norm(Y, dim=(-2, -1), keepdim=True).clamp_min(eps)
    if Y.numel() == 0 or steps == 0:
        out = Y.contiguous()
    else:
        launches, out = plan(Y, int(steps), coefficients, bool(allow_tf32))
        run_all(launches)
    return out[0] if squeeze else out


def aot_cases():
    """Representative launches (planned on meta tensors) for ``_aot``: (op, label, launch, core).
    Every launch of every configuration; core: all of bf16's 128-wide configuration (the one
    big GPUs run) and the symmetric products of the register-heavy FMA paths (exact fp32, fp64)."""
    meta = dict(device="meta")
    out = []
    cases = (("bf16 128", torch.bfloat16, False, True), ("bf16 64", torch.bfloat16, False, False),
             ("fp32 tf32", torch.float32, True, True), ("fp32 ieee", torch.float32, False, True),
             ("fp64", torch.float64, False, True))
    B, m, n = 12, 768, 3072          # a GPT-2 small MLP weight stack
    for name, w, tf32, wide in cases:
        cfg = pick_config(w, tf32, wide)
        Y = torch.empty(B, m, n, dtype=w, **meta)
        launches, _ = plan(Y, 1, (3.4445, -4.7750, 2.0315), tf32, config=cfg)
        for label, launch, core in zip(("A = Y Y^T", "B = b A + c A A", "Y <- a Y + B Y"),
                                       launches, (True, True, False)):
            core = name == "bf16 128" or (core and name in ("fp32 ieee", "fp64"))
            out.append(("newton_schulz", f"{name} Y[{B},{m},{n}]: {label}", launch, core))
    return out

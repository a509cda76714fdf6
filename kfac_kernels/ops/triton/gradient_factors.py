"""Both Kronecker factors of a stack of gradient matrices in one Triton launch:
``L <- beta L + scale G G^T`` and ``R <- beta R + scale G^T G`` (Shampoo / SOAP).

Kernel design (the symmetric-product machinery of :mod:`.syrk`, two outputs):

* one program per (upper-triangle tile of L or of R, matrix of the stack): the first ``P_L``
  programs of axis 0 compute tiles of ``L`` (the columns of ``G^T``: reduction over G's n
  columns), the rest tiles of ``R`` (reduction over G's m rows). Both read the same ``G`` through
  its strides (the two roles swap the row and column strides), so ``G^T`` is never copied, and
  only the T (T + 1) / 2 upper tiles of each factor are computed;
* the epilogue is :func:`._common.sym_store`: each tile is written with its mirror, so both
  factors stay exactly symmetric; ``beta == 0`` stores without reading the old factor;
* fp16/bf16 gradients go to the tensor cores with fp32 accumulation, fp32 runs in exact fp32
  (``input_precision="ieee"``) unless ``allow_tf32``, fp64 factors in fp64;
* no row splits: every tile reduces over all of its rows in one program (a stack of gradient
  matrices has tiles to spare; a lone small matrix with a very long other side would be better
  served by ``syrk_update``'s split path, which is what a one-sided call could use).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._registry import NotSupported
from ._common import (TL_DTYPE, Launch, cdiv, check_devices, fits_int32, precision, run_all,
                      scalar_pair, split_f64, sym_store, upper_tile)

__all__ = ["gradient_factor_update"]


@triton.jit
def _gram_pair_kernel(g_ptr, l_ptr, r_ptr, M, N, PL,
                      sgb, sgm, sgn, slb, slr, slc, srb, srr, src,
                      alpha_hi, alpha_lo, beta_hi, beta_lo,
                      DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK: tl.constexpr,
                      BK: tl.constexpr):
    """Grid (PL + PR, B). Program p < PL: tile p of L[b] = G[b] G[b]^T (size M, reduction over
    N); otherwise tile p - PL of R[b] = G[b]^T G[b] (size N, reduction over M)."""
    p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ACC: tl.constexpr = l_ptr.dtype.element_ty
    is_left = p < PL
    # the left factor reads G^T: its "rows" (reduction) are G's columns, its "columns" G's rows
    q = tl.where(is_left, p, p - PL)
    k = tl.where(is_left, M, N)              # factor size
    red = tl.where(is_left, N, M)            # reduction length
    s_red = tl.where(is_left, sgn, sgm)
    s_col = tl.where(is_left, sgm, sgn)
    ti, tj = upper_tile(q)
    ar = tl.arange(0, BLOCK)
    rk = tl.arange(0, BK)
    ci = ti * BLOCK + ar
    cj = tj * BLOCK + ar
    ki = (ci < k)[None, :]
    kj = (cj < k)[None, :]
    gb = g_ptr + b * sgb
    pj = gb + rk[:, None] * s_red + cj[None, :] * s_col      # [BK, BLOCK]: rows x tile j
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    if ti == tj:
        for r in range(0, red, BK):
            xj = tl.load(pj, mask=((r + rk) < red)[:, None] & kj, other=0.0).to(DOT)
            acc = tl.dot(tl.trans(xj), xj, acc, input_precision=PRECISION, out_dtype=ACC)
            pj += BK * s_red
    else:
        pi = gb + rk[:, None] * s_red + ci[None, :] * s_col
        for r in range(0, red, BK):
            rm = ((r + rk) < red)[:, None]
            xi = tl.load(pi, mask=rm & ki, other=0.0).to(DOT)
            xj = tl.load(pj, mask=rm & kj, other=0.0).to(DOT)
            acc = tl.dot(tl.trans(xi), xj, acc, input_precision=PRECISION, out_dtype=ACC)
            pi += BK * s_red
            pj += BK * s_red
    alpha, _ = scalar_pair(alpha_hi, alpha_lo, ACC)
    beta, beta_zero = scalar_pair(beta_hi, beta_lo, ACC)
    v = acc * alpha
    if is_left:
        sym_store(l_ptr + b * slb, slr, slc, v, ar, ci, ci < k, ar, cj, cj < k, ti == tj, beta,
                  beta_zero)
    else:
        sym_store(r_ptr + b * srb, srr, src, v, ar, ci, ci < k, ar, cj, cj < k, ti == tj, beta,
                  beta_zero)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class PairConfig:
    dot: object          # tl dtype fed to tl.dot
    precision: str       # "ieee" | "tf32"
    block: int           # square output tile
    bk: int              # reduction rows per step
    num_warps: int
    num_stages: int


def pick_config(g_dtype: torch.dtype, f_dtype: torch.dtype, allow_tf32: bool) -> PairConfig:
    """64-wide tiles (the fused epilogue of a 128-wide tile spills, as in syrk); the K steps are
    syrk's. 16-bit inputs take 8 warps: with 4, the two-output epilogue spills 4 bytes on sm_80
    (ptxas 12.9, triton 3.9)."""
    if f_dtype == torch.float64:
        return PairConfig(tl.float64, "ieee", 64, 16, 8, 2)
    if g_dtype in (torch.float16, torch.bfloat16):
        return PairConfig(TL_DTYPE[g_dtype], "ieee", 64, 64, 8, 3)
    if allow_tf32:
        return PairConfig(tl.float32, "tf32", 64, 32, 4, 3)
    return PairConfig(tl.float32, "ieee", 64, 16, 4, 2)


def _tiles(size: int, block: int) -> int:
    t = cdiv(size, block)
    return t * (t + 1) // 2


def plan(left, right, grad, scale, beta, allow_tf32, *, config=None):
    """The launch computing both factor updates (a side given as None gets no programs)."""
    batched = grad.dim() == 3
    g3 = grad if batched else grad.unsqueeze(0)
    B, m, n = g3.shape
    some = left if left is not None else right
    cfg = config or pick_config(grad.dtype, some.dtype, allow_tf32)
    l3 = None if left is None else (left if batched else left.unsqueeze(0))
    r3 = None if right is None else (right if batched else right.unsqueeze(0))
    PL = _tiles(m, cfg.block) if l3 is not None else 0
    PR = _tiles(n, cfg.block) if r3 is not None else 0
    lt = l3 if l3 is not None else r3        # a side that is absent gets a dummy pointer
    rt = r3 if r3 is not None else l3
    ah, al = split_f64(scale)
    bh, bl = split_f64(beta)
    return Launch(
        _gram_pair_kernel, (PL + PR, B),
        dict(g_ptr=g3, l_ptr=lt, r_ptr=rt, M=m, N=n, PL=PL,
             sgb=g3.stride(0), sgm=g3.stride(1), sgn=g3.stride(2),
             slb=lt.stride(0), slr=lt.stride(1), slc=lt.stride(2),
             srb=rt.stride(0), srr=rt.stride(1), src=rt.stride(2),
             alpha_hi=ah, alpha_lo=al, beta_hi=bh, beta_lo=bl),
        dict(DOT=cfg.dot, PRECISION=precision(cfg.dot, cfg.precision == "tf32"),
             BLOCK=cfg.block, BK=cfg.bk),
        cfg.num_warps, cfg.num_stages)


def _launch(left, right, grad, scale, beta, allow_tf32, *, config=None):
    check_devices(left, right, grad)
    for t in (left, right):
        if t is not None and not fits_int32(t[0] if t.dim() == 3 else t):
            raise NotSupported("a factor spanning more than 2^31 elements")
    if max(abs(s) for s in grad.stride()[-2:]) * max(grad.shape[-2:] + (128,)) >= 2**31:
        raise NotSupported("grad strides too large for int32 in-tile offsets")
    if grad.numel() == 0:     # an empty batch, or a zero-sized side: plain torch is exact here
        for f in (left, right):
            if f is None:
                continue
            if beta == 0:
                f.zero_()
            else:
                f.mul_(beta)
        return left, right
    run_all([plan(left, right, grad, scale, beta, allow_tf32, config=config)])
    return left, right


def aot_cases():
    """Representative launches (planned on meta tensors) for ``_aot``: (op, label, launch, core);
    one per configuration, all marked core (each is the only variant of its configuration)."""
    meta = dict(device="meta")
    out = []
    B, m, n = 12, 768, 3072          # a GPT-2 small MLP weight stack (c_fc^T)
    for name, gd, fd, tf32 in (("bf16", torch.bfloat16, torch.float32, False),
                               ("fp16", torch.float16, torch.float32, False),
                               ("fp32 tf32", torch.float32, torch.float32, True),
                               ("fp32 ieee", torch.float32, torch.float32, False),
                               ("fp64", torch.float64, torch.float64, False)):
        g = torch.empty(B, m, n, dtype=gd, **meta)
        L = torch.empty(B, m, m, dtype=fd, **meta)
        R = torch.empty(B, n, n, dtype=fd, **meta)
        out.append(("gradient_factor_update", f"{name} G[{B},{m},{n}]",
                    plan(L, R, g, 0.05, 0.95, tf32), True))
    return out


def gradient_factor_update(left, right, grad, *, beta: float, scale: float,
                           allow_tf32: bool = False):
    """Triton ``L <- beta L + scale G G^T``, ``R <- beta R + scale G^T G`` in one launch."""
    return _launch(left, right, grad, float(scale), float(beta), bool(allow_tf32))

"""Symmetric rank-k factor update in Triton: ``factor <- beta * factor + alpha * xbar^T xbar``.

Kernel design (docs/triton.md has the long form):

* one program per (upper-triangle tile, row split, matrix of the stack): a stack [B, d, d] is one
  launch, and only T (T + 1) / 2 of the T^2 tiles of a d x d factor are computed;
* diagonal tiles load their block of x once and multiply it by its own transpose; off-diagonal
  tiles load two blocks; fp16/bf16 inputs go to the tensor cores with fp32 accumulation, fp32
  inputs run in exact fp32 (``input_precision="ieee"``) unless ``allow_tf32``; fp64 factors run
  in fp64;
* the homogeneous ones column is never formed: diagonal tiles also sum their columns, and the
  epilogue writes those sums as the factor's last row and column and the row count as its corner;
* the epilogue writes each tile and its mirror (or symmetrises a diagonal tile), so the result is
  exactly symmetric; ``beta == 0`` stores without reading the old factor (NaN there is ignored);
* when there are fewer tiles than streaming multiprocessors (small d, many rows) the rows are
  split: each split writes a partial tile to a workspace, and a second kernel sums the partials
  in a fixed order (deterministic, no atomics) and runs the same epilogue.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._registry import NotSupported
from ._common import (TL_DTYPE, Launch, cdiv, check_devices, empty, finalize_rows, fits_int32,
                      hom_store, precision, row_splits, run_all, scalar_pair, split_f64,
                      store_partial, sym_finalize_kernel, sym_store, upper_tile)

__all__ = ["syrk_update", "ema_factor_update"]


@triton.jit
def _syrk_kernel(x_ptr, f_ptr, wsa_ptr, wsc_ptr, n, k, P, rows_per_split,
                 sxb, sxn, sxk, sfb, sfr, sfc,
                 alpha_hi, alpha_lo, beta_hi, beta_lo,
                 DOT: tl.constexpr, PRECISION: tl.constexpr, HOMOG: tl.constexpr,
                 FUSED: tl.constexpr, BLOCK: tl.constexpr, BK: tl.constexpr):
    """Grid (P, S, B): upper tile p of matrix b over row split s. FUSED (one split only): the
    epilogue updates the factor; otherwise the partial tile goes to the workspace."""
    p = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2)
    ACC: tl.constexpr = f_ptr.dtype.element_ty
    ti, tj = upper_tile(p)
    ar = tl.arange(0, BLOCK)
    rk = tl.arange(0, BK)
    ci = ti * BLOCK + ar
    cj = tj * BLOCK + ar
    ki = (ci < k)[None, :]
    kj = (cj < k)[None, :]
    r0 = s * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, n)
    xb = x_ptr + b.to(tl.int64) * sxb + r0.to(tl.int64) * sxn
    pj = xb + rk[:, None] * sxn + cj[None, :] * sxk          # [BK, BLOCK]: rows x tile j
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    colsum = tl.zeros((BLOCK,), dtype=ACC)
    if ti == tj:
        for r in range(r0, r1, BK):
            xj = tl.load(pj, mask=((r + rk) < r1)[:, None] & kj, other=0.0).to(DOT)
            acc = tl.dot(tl.trans(xj), xj, acc, input_precision=PRECISION, out_dtype=ACC)
            if HOMOG:
                colsum += tl.sum(xj.to(ACC), axis=0)
            pj += BK * sxn
    else:
        pi = xb + rk[:, None] * sxn + ci[None, :] * sxk      # [BK, BLOCK]: rows x tile i
        for r in range(r0, r1, BK):
            rm = ((r + rk) < r1)[:, None]
            xi = tl.load(pi, mask=rm & ki, other=0.0).to(DOT)
            xj = tl.load(pj, mask=rm & kj, other=0.0).to(DOT)
            acc = tl.dot(tl.trans(xi), xj, acc, input_precision=PRECISION, out_dtype=ACC)
            pi += BK * sxn
            pj += BK * sxn
    if not FUSED:
        store_partial(wsa_ptr, wsc_ptr, acc, colsum, (b * tl.num_programs(1) + s) * P + p,
                      BLOCK, HOMOG)
    else:
        alpha, _ = scalar_pair(alpha_hi, alpha_lo, ACC)
        beta, beta_zero = scalar_pair(beta_hi, beta_lo, ACC)
        fb = f_ptr + b.to(tl.int64) * sfb
        sym_store(fb, sfr, sfc, acc * alpha, ar, ci, ci < k, ar, cj, cj < k, ti == tj, beta,
                  beta_zero)
        if HOMOG:
            if ti == tj:
                hom_store(fb, sfr, sfc, colsum, tj, cj, cj < k, k, n, alpha, beta, beta_zero, BLOCK)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SyrkConfig:
    dot: object          # tl dtype fed to tl.dot
    precision: str       # "ieee" | "tf32"
    block: int           # square output tile
    bk: int              # rows per step
    num_warps: int
    num_stages: int


def pick_config(x_dtype: torch.dtype, f_dtype: torch.dtype, k: int, allow_tf32: bool) -> SyrkConfig:
    """The launch configuration for these dtypes and width."""
    if f_dtype == torch.float64:   # 4 warps spill in the fused epilogue (fp64 accumulator)
        return SyrkConfig(tl.float64, "ieee", 64, 16, 8, 2)
    if x_dtype in (torch.float16, torch.bfloat16) or allow_tf32:
        dot = TL_DTYPE[x_dtype] if x_dtype in (torch.float16, torch.bfloat16) else tl.float32
        bk = 64 if dot != tl.float32 else 32
        if k > 512:   # enough tiles: big tiles, fewer re-reads of x
            return SyrkConfig(dot, precision(dot, True), 128, bk, 8, 3)
        return SyrkConfig(dot, precision(dot, True), 64, bk, 4, 3)
    # exact fp32 runs on the FMA units, whose dot holds whole K slices in registers: short steps
    return SyrkConfig(tl.float32, "ieee", 64, 16, 4, 2)


# ----------------------------------------------------------------------------- launcher
def plan(factor, x, alpha, beta, homogeneous, allow_tf32, *, config=None, splits=None):
    """The launches computing ``factor <- beta factor + alpha xbar^T xbar`` (k >= 1 columns)."""
    batched = factor.dim() == 3
    f3 = factor if batched else factor.unsqueeze(0)
    x3 = x if batched else x.unsqueeze(0)
    B, n, k = x3.shape
    cfg = config or pick_config(x.dtype, factor.dtype, k, allow_tf32)
    block, bk = cfg.block, cfg.bk
    t = cdiv(k, block)                   # tiles per side (the homogeneous column needs none)
    P = t * (t + 1) // 2
    # a split should read (rows x block x itemsize per tile block) >= 8x the fp32 partial tile
    # (block^2 x 4 bytes) it writes to the workspace
    min_rows = 32 * block * block // max(1, min(k, block) * x.element_size())
    S, rows = row_splits(n, P * B, bk, factor.device, splits, min_rows)
    ah, al = split_f64(alpha)
    bh, bl = split_f64(beta)
    hom = bool(homogeneous)
    # 128-wide tiles always finish in the second kernel: a fused epilogue (old-factor loads, mirror
    # stores) on top of a 128 x 128 accumulator would spill registers
    fused = S == 1 and block <= 64
    if not fused:
        wsa = empty((B, S, P, block, block), dtype=factor.dtype, device=factor.device)
        wsc = (empty((B, S, P, block), dtype=factor.dtype, device=factor.device)
               if hom else wsa)
    else:
        wsa = wsc = f3
    fs = dict(sfb=f3.stride(0), sfr=f3.stride(1), sfc=f3.stride(2))
    scalars = dict(alpha_hi=ah, alpha_lo=al, beta_hi=bh, beta_lo=bl)
    launches = [Launch(
        _syrk_kernel, (P, S, B),
        dict(x_ptr=x3, f_ptr=f3, wsa_ptr=wsa, wsc_ptr=wsc, n=n, k=k, P=P, rows_per_split=rows,
             sxb=x3.stride(0), sxn=x3.stride(1), sxk=x3.stride(2), **fs, **scalars),
        dict(DOT=cfg.dot, PRECISION=cfg.precision, HOMOG=hom, FUSED=fused, BLOCK=block, BK=bk),
        cfg.num_warps, cfg.num_stages)]
    if not fused:
        launches.append(Launch(
            sym_finalize_kernel, (P, B),
            dict(f_ptr=f3, wsa_ptr=wsa, wsc_ptr=wsc, C=k, KK=1, CB=1, S=S, P=P, rows=n, **fs,
                 hom=k, **scalars),
            # fp64 64-wide tiles: 8 rows a step (16 spills 4 bytes on sm_80 under triton 3.9)
            dict(HOMOG=hom, CBLOCK=False, BLOCK=block,
                 SUB=8 if factor.dtype == torch.float64 else finalize_rows(block)), 4, 1))
    return launches


def _launch(factor, x, alpha, beta, homogeneous, allow_tf32, *, config=None, splits=None):
    check_devices(factor, x)
    if factor.numel() == 0:
        return factor
    # in-tile offsets are int32 (x is walked by pointer increments, batches by int64 offsets)
    if not fits_int32(factor[0] if factor.dim() == 3 else factor) or \
            max(abs(s) for s in x.stride()[-2:]) * max(x.shape[-1], 128) >= 2**31:
        raise NotSupported("a factor spanning more than 2^31 elements, or x strides that large")
    if x.shape[-1] == 0:   # homogeneous with no columns: a 1 x 1 factor holding the row count
        new = torch.full_like(factor, alpha * x.shape[-2])
        return factor.copy_(new) if beta == 0 else factor.mul_(beta).add_(new)
    run_all(plan(factor, x, alpha, beta, homogeneous, allow_tf32, config=config, splits=splits))
    return factor


def aot_cases():
    """Representative launches of every configuration (planned on meta tensors) for ``_aot``:
    (op, label, launch, core); ``core`` marks the register-heaviest variant of each kernel and
    configuration (homogeneous, and the finalize kernel), compiled by the default test."""
    meta = dict(device="meta")
    out = []
    cases = [("bf16", torch.bfloat16, torch.float32, False, (4096, 256)),
             ("fp16", torch.float16, torch.float32, False, (4096, 256)),
             ("fp32 tf32", torch.float32, torch.float32, True, (4096, 256)),
             ("fp32 ieee", torch.float32, torch.float32, False, (1024,)),
             ("fp64", torch.float64, torch.float64, False, (1024,))]
    for name, xd, fd, tf32, widths in cases:
        for k in widths:
            for hom in (False, True):
                x = torch.empty(65536, k, dtype=xd, **meta)
                f = torch.empty(k + hom, k + hom, dtype=fd, **meta)
                label = f"{name} x[65536,{k}]{' homogeneous' if hom else ''}"
                core = hom and name != "fp16"
                launches = plan(f, x, 0.5, 0.5, hom, tf32)      # one split: fused if 64-wide
                out.append(("syrk_update", label, launches[0], core))
                launches = plan(f, x, 0.5, 0.5, hom, tf32, splits=8)
                if launches[0].constexprs["FUSED"] != out[-1][2].constexprs["FUSED"]:
                    out.append(("syrk_update", label + " (row-split)", launches[0], False))
                out.append(("syrk_update", label + " (finalize)", launches[1],
                            core and name in ("fp32 ieee", "fp64")))
    return out


def syrk_update(factor: torch.Tensor, x: torch.Tensor, *, alpha: float, beta: float,
                homogeneous: bool = False, allow_tf32: bool = False) -> torch.Tensor:
    """Triton ``factor <- beta * factor + alpha * xbar^T xbar`` in place (see the module doc)."""
    return _launch(factor, x, float(alpha), float(beta), homogeneous, allow_tf32)


def ema_factor_update(factor: torch.Tensor, x: torch.Tensor, decay: float, *,
                      homogeneous: bool = False, scale=None, allow_tf32: bool = False):
    """Running-average form: ``factor <- decay * factor + (1 - decay) * scale * xbar^T xbar``."""
    if scale is None:
        scale = 1.0 / x.shape[-2]
    return _launch(factor, x, (1.0 - decay) * float(scale), float(decay), homogeneous, allow_tf32)

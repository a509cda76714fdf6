"""KFC input factor of a convolution in Triton, with implicit im2col.

``conv_input_factor(x, kernel_size, stride, padding, dilation)`` is ``(1/(N T)) P^T P`` for the
patch matrix P [N T, C K] of x (plus the homogeneous column), computed without ever forming P:
each tile load computes, for a block of patch rows (n, t) and a block of patch columns (c, k),
the input positions ``t * stride - padding + k * dilation`` and reads x there (zero where the
position falls in the padding). Conv1d/2d/3d share one kernel: missing spatial dims are size-1
dims with stride 0.

Two column orders:

* channel-blocked (``CBLOCK``, used when the channel count fills the tiles): a tile holds BLOCK
  consecutive channels at ONE kernel offset k, so a row's input position and its bounds check
  are the same for the whole tile -- the loads cost what a plain GEMM's do. Internally the
  columns are ordered (k, c); the epilogue writes each entry at its (c, k) position, the order of
  ``weight.flatten(1)``.
* gather (small channel counts, e.g. a first RGB layer): columns in (c, k) order, each element
  with its own position arithmetic and bounds check.

Everything else is syrk's design (:mod:`.syrk`): upper-triangle tiles, diagonal tiles load once,
the homogeneous column from column sums, mirrored stores, deterministic row splits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._registry import NotSupported
from ._common import (TL_DTYPE, Launch, cdiv, check_devices, empty, finalize_rows, fits_int32,
                      hom_store, out_index, precision, row_splits, run_all, split_f64,
                      store_partial, sym_finalize_kernel, sym_store, torch_allows_tf32,
                      upper_tile)

__all__ = ["conv_input_factor"]


@triton.jit
def _conv_cols(t, C, KK, K2, K3, CB, dl1, dl2, dl3, sxc, sx2, sx3, sx4,
               BLOCK: tl.constexpr, CBLOCK: tl.constexpr):
    """Column part of the addresses of column tile t: offsets, kernel displacements, validity."""
    ar = tl.arange(0, BLOCK)
    if CBLOCK:
        kk = t // CB
        c = (t % CB) * BLOCK + ar
        ok = c < C
    else:
        q = t * BLOCK + ar
        ok = q < C * KK
        c = q // KK
        kk = q % KK
    o1 = (kk // (K2 * K3)) * dl1
    o2 = ((kk // K3) % K2) * dl2
    o3 = (kk % K3) * dl3
    coff = c * sxc + (o1 * sx2 + o2 * sx3 + o3 * sx4)
    return coff, o1, o2, o3, ok


@triton.jit
def _conv_rows(r, r1, TT, T2, T3, st1, st2, st3, pd1, pd2, pd3, sxn, sx2, sx3, sx4,
               INT64: tl.constexpr):
    """Row part of the addresses of patch rows r = n T + t: offsets, window origins, validity."""
    ok = r < r1
    nn = r // TT
    t = r % TT
    h1 = (t // (T2 * T3)) * st1 - pd1
    h2 = ((t // T3) % T2) * st2 - pd2
    h3 = (t % T3) * st3 - pd3
    if INT64:
        roff = nn.to(tl.int64) * sxn + (h1.to(tl.int64) * sx2 + h2.to(tl.int64) * sx3
                                        + h3.to(tl.int64) * sx4)
    else:
        roff = nn * sxn + (h1 * sx2 + h2 * sx3 + h3 * sx4)
    return roff, h1, h2, h3, ok


@triton.jit
def _inside(p, S):
    return (p >= 0) & (p < S)


@triton.jit
def _conv_load(x_ptr, roff, h1, h2, h3, rok, coff, o1, o2, o3, cok, S1, S2, S3,
               CBLOCK: tl.constexpr):
    """[BK, BLOCK] tile of the patch matrix: zero outside the input (padding) and past the ends."""
    if CBLOCK:   # one kernel offset per tile: the bounds check is per row
        rm = rok & _inside(h1 + o1, S1) & _inside(h2 + o2, S2) & _inside(h3 + o3, S3)
        m = rm[:, None] & cok[None, :]
    else:
        m = (rok[:, None] & cok[None, :] & _inside(h1[:, None] + o1[None, :], S1)
             & _inside(h2[:, None] + o2[None, :], S2) & _inside(h3[:, None] + o3[None, :], S3))
    return tl.load(x_ptr + roff[:, None] + coff[None, :], mask=m, other=0.0)


@triton.jit
def _conv_factor_kernel(x_ptr, f_ptr, wsa_ptr, wsc_ptr, R, rows_per_split, P,
                        C, KK, K2, K3, CB, TT, T2, T3, S1, S2, S3,
                        st1, st2, st3, pd1, pd2, pd3, dl1, dl2, dl3,
                        sxn, sxc, sx2, sx3, sx4, sfr, sfc, alpha_hi, alpha_lo,
                        DOT: tl.constexpr, PRECISION: tl.constexpr, HOMOG: tl.constexpr,
                        CBLOCK: tl.constexpr, INT64: tl.constexpr, FUSED: tl.constexpr,
                        BLOCK: tl.constexpr, BK: tl.constexpr):
    """Grid (P, S): upper tile p over patch-row split s; FUSED (one split): stores the result."""
    p = tl.program_id(0)
    s = tl.program_id(1)
    ACC: tl.constexpr = f_ptr.dtype.element_ty
    ti, tj = upper_tile(p)
    rk = tl.arange(0, BK)
    r0 = s * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, R)
    cj, oj1, oj2, oj3, kj = _conv_cols(tj, C, KK, K2, K3, CB, dl1, dl2, dl3, sxc, sx2, sx3, sx4,
                                       BLOCK, CBLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    colsum = tl.zeros((BLOCK,), dtype=ACC)
    if ti == tj:
        for r in range(r0, r1, BK):
            ro, h1, h2, h3, rv = _conv_rows(r + rk, r1, TT, T2, T3, st1, st2, st3, pd1, pd2, pd3,
                                            sxn, sx2, sx3, sx4, INT64)
            xj = _conv_load(x_ptr, ro, h1, h2, h3, rv, cj, oj1, oj2, oj3, kj, S1, S2, S3,
                            CBLOCK).to(DOT)
            acc = tl.dot(tl.trans(xj), xj, acc, input_precision=PRECISION, out_dtype=ACC)
            if HOMOG:
                colsum += tl.sum(xj.to(ACC), axis=0)
    else:
        ci, oi1, oi2, oi3, ki = _conv_cols(ti, C, KK, K2, K3, CB, dl1, dl2, dl3, sxc, sx2, sx3,
                                           sx4, BLOCK, CBLOCK)
        for r in range(r0, r1, BK):
            ro, h1, h2, h3, rv = _conv_rows(r + rk, r1, TT, T2, T3, st1, st2, st3, pd1, pd2, pd3,
                                            sxn, sx2, sx3, sx4, INT64)
            xi = _conv_load(x_ptr, ro, h1, h2, h3, rv, ci, oi1, oi2, oi3, ki, S1, S2, S3,
                            CBLOCK).to(DOT)
            xj = _conv_load(x_ptr, ro, h1, h2, h3, rv, cj, oj1, oj2, oj3, kj, S1, S2, S3,
                            CBLOCK).to(DOT)
            acc = tl.dot(tl.trans(xi), xj, acc, input_precision=PRECISION, out_dtype=ACC)
    if not FUSED:
        store_partial(wsa_ptr, wsc_ptr, acc, colsum, s * P + p, BLOCK, HOMOG)
    else:
        ar = tl.arange(0, BLOCK)
        alpha = tl.cast(alpha_hi, tl.float32).to(ACC) + tl.cast(alpha_lo, tl.float32).to(ACC)
        oi, mi = out_index(ti, ar, C, KK, CB, BLOCK, CBLOCK)
        oj, mj = out_index(tj, ar, C, KK, CB, BLOCK, CBLOCK)
        # the output is fresh (beta = 0): store-only epilogue, light enough for 128-wide tiles
        sym_store(f_ptr, sfr, sfc, acc * alpha, ar, oi, mi, ar, oj, mj, ti == tj, 0.0, True)
        if HOMOG:
            if ti == tj:
                hom_store(f_ptr, sfr, sfc, colsum, tj, oj, mj, C * KK, R, alpha, 0.0, True, BLOCK)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ConvConfig:
    dot: object
    precision: str
    cblock: bool
    block: int
    bk: int
    num_warps: int
    num_stages: int


def _channel_block(C: int, blocks) -> int:
    """Largest tile width the channels fill to >= 75% (0: none, use the gather order)."""
    for b in blocks:
        if C >= b // 2 and C / (cdiv(C, b) * b) >= 0.75:
            return b
    return 0


def pick_config(dtype: torch.dtype, C: int, KK: int, allow_tf32: bool) -> ConvConfig:
    """Channel-blocked order when the channels fill the tiles, else the gather order, whose
    per-element index arithmetic costs registers. Tile shapes, warps and stages were chosen so
    that no configuration spills on sm_80 or sm_90 with triton 3.6 or 3.9 (see _aot)."""
    if dtype == torch.float64:
        if _channel_block(C, (64,)):
            return ConvConfig(tl.float64, "ieee", True, 64, 16, 8, 2)
        return ConvConfig(tl.float64, "ieee", False, 32, 16, 8, 2)
    if dtype in (torch.float16, torch.bfloat16) or allow_tf32:
        dot = TL_DTYPE[dtype] if dtype != torch.float32 else tl.float32
        prec = precision(dot, True)
        b = _channel_block(C, (128, 64))
        if b == 128:
            return ConvConfig(dot, prec, True, 128, 16, 8, 3)
        if b == 64:
            return ConvConfig(dot, prec, True, 64, 32, 4, 3)
        return ConvConfig(dot, prec, False, 64, 16, 4, 3)
    # exact fp32 runs on the FMA units (no tensor cores); one stage: deeper pipelines spill
    if _channel_block(C, (64,)):
        return ConvConfig(tl.float32, "ieee", True, 64, 16, 4, 1)
    return ConvConfig(tl.float32, "ieee", False, 32, 16, 4, 1)


def _geometry(x, kernel_size, stride, padding, dilation):
    """Pad 1d/2d problems to 3 spatial dims (leading size-1 dims, stride 0)."""
    nd = x.dim() - 2
    pad = 3 - nd
    S = (1,) * pad + tuple(x.shape[2:])
    xs = (0,) * pad + tuple(x.stride()[2:])
    K = (1,) * pad + tuple(kernel_size)
    st = (1,) * pad + tuple(stride)
    pd = (0,) * pad + tuple(padding)
    dl = (1,) * pad + tuple(dilation)
    T = tuple((S[i] + 2 * pd[i] - dl[i] * (K[i] - 1) - 1) // st[i] + 1 for i in range(3))
    return S, xs, K, st, pd, dl, T


def plan(x, kernel_size, stride, padding, dilation, homogeneous, out, *, config=None,
         splits=None, allow_tf32=None):
    N, C = x.shape[:2]
    S_, xs, K, st, pd, dl, T = _geometry(x, kernel_size, stride, padding, dilation)
    KK = math.prod(K)
    TT = math.prod(T)
    R = N * TT
    if R >= 2**31 - 2**16 or C * KK >= 2**31:
        raise NotSupported("more than 2^31 patch rows or columns")
    if allow_tf32 is None:
        allow_tf32 = torch_allows_tf32()
    cfg = config or pick_config(x.dtype, C, KK, allow_tf32)
    block, bk = cfg.block, cfg.bk
    CB = cdiv(C, block)
    t = KK * CB if cfg.cblock else cdiv(C * KK, block)
    P = t * (t + 1) // 2
    # as in syrk: a split reads >= 8x the partial tile it writes
    min_rows = 32 * block * block // max(1, min(C * KK, block) * x.element_size())
    S, rows = row_splits(R, P, bk, x.device, splits, min_rows)
    hom = bool(homogeneous)
    # one split: the tile kernel writes the result (store-only, as the output is fresh); the
    # workspace exists only for row splits, so it is bounded by about one wave of tiles
    fused = S == 1
    if not fused:
        wsa = empty((S, P, block, block), dtype=out.dtype, device=out.device)
        wsc = empty((S, P, block), dtype=out.dtype, device=out.device) if hom else wsa
    else:
        wsa = wsc = out
    ah, al = split_f64(1.0 / R)
    launches = [Launch(
        _conv_factor_kernel, (P, S),
        dict(x_ptr=x, f_ptr=out, wsa_ptr=wsa, wsc_ptr=wsc, R=R, rows_per_split=rows, P=P,
             C=C, KK=KK, K2=K[1], K3=K[2], CB=CB, TT=TT, T2=T[1], T3=T[2],
             S1=S_[0], S2=S_[1], S3=S_[2], st1=st[0], st2=st[1], st3=st[2],
             pd1=pd[0], pd2=pd[1], pd3=pd[2], dl1=dl[0], dl2=dl[1], dl3=dl[2],
             sxn=x.stride(0), sxc=x.stride(1), sx2=xs[0], sx3=xs[1], sx4=xs[2],
             sfr=out.stride(0), sfc=out.stride(1), alpha_hi=ah, alpha_lo=al),
        dict(DOT=cfg.dot, PRECISION=cfg.precision, HOMOG=hom, CBLOCK=cfg.cblock,
             INT64=not fits_int32(x), FUSED=fused, BLOCK=block, BK=bk),
        cfg.num_warps, cfg.num_stages)]
    if not fused:
        launches.append(Launch(
            sym_finalize_kernel, (P, 1),
            dict(f_ptr=out, wsa_ptr=wsa, wsc_ptr=wsc, C=C, KK=KK, CB=CB, S=S, P=P, rows=R,
                 sfb=0, sfr=out.stride(0), sfc=out.stride(1), hom=C * KK,
                 alpha_hi=ah, alpha_lo=al, beta_hi=0.0, beta_lo=0.0),
            dict(HOMOG=hom, CBLOCK=cfg.cblock, BLOCK=block, SUB=finalize_rows(block)), 4, 1))
    return launches


def _conv_input_factor(x, kernel_size, stride, padding, dilation, homogeneous=False, *, out=None,
                       config=None, splits=None, allow_tf32=None):
    check_devices(x)
    D = x.shape[1] * math.prod(kernel_size) + int(bool(homogeneous))
    if out is None:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = empty((D, D), dtype=dtype, device=x.device)
    run_all(plan(x, kernel_size, stride, padding, dilation, homogeneous, out, config=config,
                 splits=splits, allow_tf32=allow_tf32))
    return out


def conv_input_factor(x: torch.Tensor, kernel_size, stride, padding, dilation, *,
                      homogeneous: bool = False) -> torch.Tensor:
    """Triton KFC input factor (tuples already normalised by the public wrapper).

    fp32 inputs run in exact fp32 unless torch allows TF32 for fp32 matmuls
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or the legacy ``allow_tf32``: the
    switch the unfold + matmul path obeys too).
    """
    return _conv_input_factor(x, tuple(kernel_size), tuple(stride), tuple(padding),
                              tuple(dilation), homogeneous)


def aot_cases():
    """Representative launches of every configuration (planned on meta tensors) for ``_aot``:
    (op, label, launch, core); ``core`` marks the register-heaviest variants."""
    out = []
    shapes = [  # (label, x shape, kernel, stride, padding): both column orders, every tile width
        ("C=256 3x3 (channel-blocked)", (32, 256, 14, 14), (3, 3), (1, 1), (1, 1)),
        ("C=64 3x3 (channel-blocked)", (32, 64, 56, 56), (3, 3), (1, 1), (1, 1)),
        ("C=3 7x7/2 (gather)", (32, 3, 224, 224), (7, 7), (2, 2), (3, 3)),
        ("C=16 3x3x3 3d (gather)", (4, 16, 16, 32, 32), (3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ]
    for dtype, dname, tf32 in ((torch.bfloat16, "bf16", False), (torch.float16, "fp16", False),
                               (torch.float32, "fp32 tf32", True),
                               (torch.float32, "fp32 ieee", False),
                               (torch.float64, "fp64", False)):
        seen = set()
        for label, shape, k, s, p in shapes:
            nd = len(shape) - 2
            x = torch.empty(shape, dtype=dtype, device="meta")
            C, KK = shape[1], math.prod(k)
            cfg = pick_config(dtype, C, KK, tf32)
            if (cfg, nd == 3) in seen:
                continue
            seen.add((cfg, nd == 3))
            for hom in (False, True):
                D = C * KK + hom
                f = torch.empty(D, D, dtype=torch.float64 if dtype == torch.float64
                                else torch.float32, device="meta")
                tag = f"{dname} {label}{' homogeneous' if hom else ''}"
                core = hom and dname != "fp16" and nd == 2
                ls = plan(x, k, s, p, (1,) * nd, hom, f, config=cfg, splits=1, allow_tf32=tf32)
                out.append(("conv_input_factor", f"{tag} [block {cfg.block}]", ls[0], core))
                ls = plan(x, k, s, p, (1,) * nd, hom, f, config=cfg, splits=4, allow_tf32=tf32)
                out.append(("conv_input_factor", f"{tag} (row-split)", ls[0], False))
                out.append(("conv_input_factor", f"{tag} (finalize)", ls[1],
                            core and cfg.cblock and dname == "fp32 ieee"))
    return out

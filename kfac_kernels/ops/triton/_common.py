"""Pieces shared by the symmetric-product kernels (syrk and conv_factor) and host helpers.

Symmetric products are computed on upper-triangle tiles only. A tile's columns map to output
indices through ``out_index`` (the identity for syrk; the (channel, kernel offset) permutation of
conv_factor's channel-blocked mode), and ``sym_store`` writes a finished tile together with its
mirror image, so the output is exactly symmetric whatever order the products were summed in.
Tiles finish either in the kernel that computed them (64-wide tiles, one row split) or in
``sym_finalize_kernel``, which sums row-split partials from a workspace in a fixed order.
The homogeneous row/column is never part of a tile: diagonal tiles accumulate the column sums of
their block and write them as the last row and column, and tile (0, 0) writes the corner (the row
count).
"""
from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from .._registry import NotSupported
from . import interpreting

# ----------------------------------------------------------------------------- host helpers
TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}


# Tests set this to fill every buffer the launchers allocate (outputs, intermediates, workspaces)
# with NaN, so an element a kernel forgets to write shows up as NaN instead of stale memory.
POISON = False


def empty(shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def split_f64(v: float):
    """(hi, lo) fp32 pair with hi + lo == v to ~2^-48 relative: Triton passes Python floats as
    fp32 scalars, so fp64 kernels rebuild their scalars from the pair."""
    hi = struct.unpack("f", struct.pack("f", float(v)))[0]
    lo = float(v) - hi
    return hi, lo


def check_devices(*tensors):
    """NotSupported unless the tensors can run here (CUDA, or anything under the interpreter)."""
    if interpreting():
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "cuda":
            raise NotSupported(f"the triton backend needs CUDA tensors (got {t.device}); CPU "
                               "tensors run only under the interpreter (TRITON_INTERPRET=1)")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small stand-in under the interpreter."""
    if device.type != "cuda" or interpreting():
        return 2
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def row_splits(n: int, ctas: int, bk: int, device, splits=None, min_rows=0):
    """Split the n rows of a symmetric product so that about one wave of CTAs runs.

    Each split keeps at least ``max(4 bk, min_rows)`` rows (callers size min_rows so that a split
    reads several times the partial tile it writes). Returns (splits, rows_per_split);
    rows_per_split is a multiple of ``bk``. ``splits`` forces a split count (tests use it to
    exercise both paths on small inputs).
    """
    if n <= 0:
        return 1, bk
    if splits is None:
        target = sm_count(device)
        splits = 1
        if ctas < target:
            splits = min(cdiv(target, ctas), max(1, n // max(4 * bk, min_rows)))
    splits = max(1, min(int(splits), cdiv(n, bk)))
    rows = cdiv(cdiv(n, splits), bk) * bk
    return cdiv(n, rows), rows


def finalize_rows(block: int) -> int:
    """Rows of a tile the finalize kernel handles at a time: 1024 elements (8 per thread of its
    4 warps), which compiles without spills on sm_80/sm_90 under triton 3.6 and 3.9."""
    return max(1, min(block, 1024 // block))


def torch_allows_tf32() -> bool:
    """Whether torch lets fp32 matmuls use TF32 on CUDA: the switch the plain-torch paths obey
    (``torch.backends.cuda.matmul.fp32_precision`` where torch has it, else ``allow_tf32``;
    torch raises when the legacy flag is read after the new API was used, hence the order)."""
    m = torch.backends.cuda.matmul
    prec = getattr(m, "fp32_precision", None)
    if prec in ("tf32", "ieee"):
        return prec == "tf32"
    try:
        return bool(m.allow_tf32)
    except RuntimeError:
        return False


def precision(dot_dtype, allow_tf32: bool) -> str:
    return "tf32" if (dot_dtype == tl.float32 and allow_tf32) else "ieee"


def fits_int32(t: torch.Tensor) -> bool:
    """Whether every element offset of ``t`` (through its strides) fits in int32."""
    span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
    return span < 2**31 - 1


class Launch:
    """One kernel launch as data: what the host launcher runs and what the ahead-of-time compile
    check (:mod:`._aot`) compiles, so both see the same kernels, constexprs and options."""

    __slots__ = ("kernel", "grid", "args", "constexprs", "num_warps", "num_stages")

    def __init__(self, kernel, grid, args, constexprs, num_warps, num_stages):
        self.kernel, self.grid, self.args, self.constexprs = kernel, tuple(grid), args, constexprs
        self.num_warps, self.num_stages = num_warps, num_stages

    def run(self):
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)

    def __repr__(self):
        name = getattr(self.kernel, "__name__", None) or getattr(self.kernel.fn, "__name__", "?")
        cx = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{name}[{self.grid}]({cx}; warps={self.num_warps}, stages={self.num_stages})"


def run_all(launches):
    for launch in launches:
        launch.run()


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def scalar_pair(hi, lo, DTYPE: tl.constexpr):
    """(hi + lo in DTYPE, whether it is exactly zero) from a split_f64 pair."""
    h = tl.cast(hi, tl.float32)
    l = tl.cast(lo, tl.float32)
    return h.to(DTYPE) + l.to(DTYPE), (h == 0.0) & (l == 0.0)


@triton.jit
def upper_tile(p):
    """(i, j), i <= j, of the p-th upper-triangle tile, enumerated column by column:
    (0,0), (0,1), (1,1), (0,2), ... The fp32 square root is corrected to the exact integer."""
    j = ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > p, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= p, j + 1, j)
    i = p - j * (j + 1) // 2
    return i, j


@triton.jit
def out_index(t, loc, C, KK, CB, BLOCK: tl.constexpr, CBLOCK: tl.constexpr):
    """Output indices and validity of the local indices ``loc`` of column tile ``t``.

    CBLOCK: tile t holds channels (t % CB) * BLOCK + loc at kernel offset t // CB, stored at
    c * KK + offset (the order of weight.flatten(1)); otherwise tile t holds the indices
    t * BLOCK + loc < C * KK in their natural order (syrk passes KK = 1).
    """
    if CBLOCK:
        c = (t % CB) * BLOCK + loc
        return c * KK + t // CB, c < C
    else:
        q = t * BLOCK + loc
        return q, q < C * KK


@triton.jit
def _update(ptrs, v, mask, beta, beta_zero):
    # beta == 0 overwrites: the old value is not even read (NaN there is ignored). The product is
    # computed once and fused with fma, so a tile and its mirror round identically.
    if beta_zero:
        tl.store(ptrs, v, mask=mask)
    else:
        old = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, tl.fma(old, beta, v), mask=mask)


@triton.jit
def sym_store(f_ptr, sfr, sfc, v, ri, oi, mi, cj, oj, mj, diag, beta, beta_zero):
    """factor[oi, oj] <- beta * factor + v and the same product at the mirror position
    factor[oj, oi]; ``ri``/``cj`` are the rows'/columns' local indices in their tiles. On a
    diagonal tile only its upper triangle is stored directly and its strict upper triangle
    mirrored, so the result is exactly symmetric. The mirror store uses a pointer tile in v's
    orientation, so the values are not transposed in registers."""
    lim = cj[None, :] + tl.where(diag, 0, 1 << 30)      # off the diagonal: no triangle limit
    m = mi[:, None] & mj[None, :]
    _update(f_ptr + oi[:, None] * sfr + oj[None, :] * sfc, v, m & (ri[:, None] <= lim), beta,
            beta_zero)
    _update(f_ptr + oi[:, None] * sfc + oj[None, :] * sfr, v, m & (ri[:, None] < lim), beta,
            beta_zero)


@triton.jit
def hom_store(f_ptr, sfr, sfc, colsum, tj, oj, mj, hom, rows, alpha, beta, beta_zero,
              BLOCK: tl.constexpr):
    """The homogeneous row and column of a diagonal tile's columns (their sums), and on tile
    (0, 0) the corner (the row count)."""
    w = colsum * alpha
    _update(f_ptr + hom * sfr + oj * sfc, w, mj, beta, beta_zero)
    _update(f_ptr + oj * sfr + hom * sfc, w, mj, beta, beta_zero)
    if tj == 0:
        ar = tl.arange(0, BLOCK)
        corner = tl.zeros((BLOCK,), dtype=w.dtype) + alpha * rows
        _update(f_ptr + hom * sfr + hom * sfc + ar * 0, corner, ar == 0, beta, beta_zero)


@triton.jit
def store_partial(wsa_ptr, wsc_ptr, acc, colsum, slot, BLOCK: tl.constexpr, HOMOG: tl.constexpr):
    """Write one split's partial tile (and column sums) to the workspace at ``slot``."""
    ar = tl.arange(0, BLOCK)
    base = slot.to(tl.int64)
    tl.store(wsa_ptr + base * (BLOCK * BLOCK) + ar[:, None] * BLOCK + ar[None, :], acc)
    if HOMOG:
        tl.store(wsc_ptr + base * BLOCK + ar, colsum)


@triton.jit
def sym_finalize_kernel(f_ptr, wsa_ptr, wsc_ptr, C, KK, CB, S, P, rows, sfb, sfr, sfc, hom,
                        alpha_hi, alpha_lo, beta_hi, beta_lo,
                        HOMOG: tl.constexpr, CBLOCK: tl.constexpr, BLOCK: tl.constexpr,
                        SUB: tl.constexpr):
    """Second stage of a symmetric product computed in partial tiles: sum the S partials of tile
    p of matrix b in a fixed order (deterministic, no atomics) and update the factor, SUB rows
    of the tile at a time (few registers; ``finalize_rows``). Grid (P, B)."""
    p = tl.program_id(0)
    b = tl.program_id(1)
    ACC: tl.constexpr = f_ptr.dtype.element_ty
    ti, tj = upper_tile(p)
    ar = tl.arange(0, BLOCK)
    alpha, _ = scalar_pair(alpha_hi, alpha_lo, ACC)
    beta, beta_zero = scalar_pair(beta_hi, beta_lo, ACC)
    fb = f_ptr + b.to(tl.int64) * sfb
    slot0 = (b * S * P + p).to(tl.int64)
    oj, mj = out_index(tj, ar, C, KK, CB, BLOCK, CBLOCK)
    for h in range(0, BLOCK // SUB):
        ri = h * SUB + tl.arange(0, SUB)
        acc = tl.zeros((SUB, BLOCK), dtype=ACC)
        for s in range(0, S):
            slot = slot0 + s * P
            acc += tl.load(wsa_ptr + slot * (BLOCK * BLOCK) + ri[:, None] * BLOCK + ar[None, :])
        oi, mi = out_index(ti, ri, C, KK, CB, BLOCK, CBLOCK)
        sym_store(fb, sfr, sfc, acc * alpha, ri, oi, mi, ar, oj, mj, ti == tj, beta, beta_zero)
    if HOMOG:
        if ti == tj:
            colsum = tl.zeros((BLOCK,), dtype=ACC)
            for s in range(0, S):
                colsum += tl.load(wsc_ptr + (slot0 + s * P) * BLOCK + ar)
            hom_store(fb, sfr, sfc, colsum, tj, oj, mj, hom, rows, alpha, beta, beta_zero, BLOCK)

"""Triton syrk_update / ema_factor_update against the float64 reference."""
import pytest
import torch

from _triton_helpers import (DEVICE, abs_call, poison, products_tol,  # noqa: F401
                             rel_err, requires_triton, sym)
import triton
import triton.language as tl

import kfac_kernels.ops as ops
from kfac_kernels.ops import _registry, reference
from kfac_kernels.ops.triton import syrk
from kfac_kernels.ops.triton._common import upper_tile

pytestmark = requires_triton


def _check(factor0, x, alpha, beta, homogeneous, math, out):
    """``out`` against the float64 reference within the bound of its arithmetic ``math`` (a key of
    _triton_helpers.MATH): each entry sums x.shape[-2] products, then scales and adds beta F."""
    args = lambda: (factor0.double().cpu().clone(), x.double().cpu())   # noqa: E731 (in place)
    kw = dict(alpha=alpha, beta=beta, homogeneous=homogeneous)
    ref = reference.syrk_update(*args(), **kw)
    tol = products_tol(ref, abs_call(reference.syrk_update, *args(), **kw), x.shape[-2] + 3, math)
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol}"
    assert torch.isfinite(out).all()
    assert torch.equal(out, out.transpose(-1, -2)), "result is not exactly symmetric"


@pytest.mark.parametrize("batch,n,k", [(None, 1, 1), (None, 7, 33), (None, 129, 7),
                                       (3, 33, 65), (1, 9, 129)])
@pytest.mark.parametrize("homogeneous", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.6])
def test_matches_reference(seed, batch, n, k, homogeneous, dtype, beta):
    shape = (n, k) if batch is None else (batch, n, k)
    x = torch.randn(shape).to(dtype).to(DEVICE)
    d = k + homogeneous
    f0 = sym(d, batch)
    f = f0.clone()
    if beta == 0.0:
        f.fill_(float("nan"))   # beta == 0 must overwrite whatever the factor held
    out = ops.syrk_update(f, x, alpha=0.37, beta=beta, homogeneous=homogeneous, backend="triton")
    assert out is f
    _check(f0, x, 0.37, beta, homogeneous, "fp32", f)


def test_non_contiguous_inputs_and_factor_view(seed):
    B, n, k = 3, 21, 35
    base = torch.randn(B, k, 2 * n, device=DEVICE)
    x = base.transpose(1, 2)[:, ::2, :]                # [B, n, k], strides (., 1, 2n)
    assert not x.is_contiguous()
    d = k + 1
    buf = torch.randn(B, d + 3, d + 5, device=DEVICE)
    f = buf[:, 1:d + 1, 2:d + 2]                       # factor view with row stride d + 5
    f.copy_(sym(d, B))
    f0 = f.clone()
    guard = buf.clone()
    ops.syrk_update(f, x, alpha=0.5, beta=0.25, homogeneous=True, backend="triton")
    _check(f0, x, 0.5, 0.25, True, "fp32", f)
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[:, 1:d + 1, 2:d + 2] = False
    assert torch.equal(buf[outside], guard[outside]), "wrote outside the factor view"


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("homogeneous", [False, True])
def test_small_tiles_and_row_splits(seed, splits, homogeneous):
    """16-wide tiles: several tile rows, diagonal and off-diagonal tiles, with the fused
    epilogue (one split) and the workspace + finalize path (three splits)."""
    B, n, k = 2, 50, 40
    x = torch.randn(B, n, k, device=DEVICE)
    f0 = sym(k + homogeneous, B)
    f = f0.clone()
    cfg = syrk.SyrkConfig(tl.float32, "ieee", 16, 16, 4, 1)
    syrk._launch(f, x, 0.3, 0.9, homogeneous, False, config=cfg, splits=splits)
    _check(f0, x, 0.3, 0.9, homogeneous, "fp32", f)


def test_wide_tiles_path(seed):
    """k > 512 with fp16 input picks the 128-wide configuration (workspace + finalize)."""
    n, k = 9, 520
    x = torch.randn(n, k).half().to(DEVICE)
    f0 = sym(k + 1)
    f = f0.clone()
    launches = syrk.plan(f, x, 1.0, 0.5, True, False)
    assert launches[0].constexprs["BLOCK"] == 128 and not launches[0].constexprs["FUSED"]
    ops.syrk_update(f, x, alpha=1.0, beta=0.5, homogeneous=True, backend="triton")
    _check(f0, x, 1.0, 0.5, True, "fp32", f)


def test_float64(seed):
    x = torch.randn(40, 70, dtype=torch.float64, device=DEVICE)
    f0 = sym(71, dtype=torch.float64)
    f = f0.clone()
    ops.syrk_update(f, x, alpha=1.0 / 3.0, beta=0.7, homogeneous=True, backend="triton")
    _check(f0, x, 1.0 / 3.0, 0.7, True, "fp64", f)


def test_float64_input_float32_factor(seed):
    x = torch.randn(33, 17, dtype=torch.float64, device=DEVICE)
    f0 = sym(17)
    f = f0.clone()
    ops.syrk_update(f, x, alpha=0.1, beta=1.0, backend="triton")
    _check(f0, x, 0.1, 1.0, False, "fp32", f)


def test_allow_tf32(seed):
    x = torch.randn(65, 33, device=DEVICE)
    f0 = sym(34)
    f = f0.clone()
    ops.syrk_update(f, x, alpha=0.2, beta=0.5, homogeneous=True, allow_tf32=True,
                    backend="triton")
    _check(f0, x, 0.2, 0.5, True, "tf32", f)


def test_homogeneous_without_columns():
    x = torch.empty(5, 0, device=DEVICE)
    f = torch.full((1, 1), 2.0, device=DEVICE)
    ops.syrk_update(f, x, alpha=0.5, beta=0.5, homogeneous=True, backend="triton")
    assert f.item() == pytest.approx(0.5 * 2.0 + 0.5 * 5)


@pytest.mark.parametrize("homogeneous", [False, True])
def test_no_rows(homogeneous):
    x = torch.empty(0, 4, device=DEVICE)
    f0 = sym(4 + homogeneous)
    f = f0.clone()
    ops.syrk_update(f, x, alpha=1.0, beta=0.5, homogeneous=homogeneous, backend="triton")
    _check(f0, x, 1.0, 0.5, homogeneous, "fp32", f)


@pytest.mark.parametrize("homogeneous", [False, True])
def test_ema_factor_update(seed, homogeneous):
    x = torch.randn(3, 31, 12, device=DEVICE)
    f0 = sym(12 + homogeneous, 3)
    f = f0.clone()
    ops.ema_factor_update(f, x, 0.95, homogeneous=homogeneous, backend="triton")
    args = lambda: (f0.double().cpu(), x.double().cpu(), 0.95)   # noqa: E731 (in place: fresh)
    ref = reference.ema_factor_update(*args(), homogeneous=homogeneous)
    ref_abs = abs_call(reference.ema_factor_update, *args(), homogeneous=homogeneous)
    assert rel_err(f, ref) <= products_tol(ref, ref_abs, x.shape[-2] + 3, "fp32")
    assert torch.equal(f, f.transpose(-1, -2))
    # the registered running-average entry point too
    g = f0.clone()
    syrk.ema_factor_update(g, x, 0.95, homogeneous=homogeneous, scale=0.5)
    ref = reference.ema_factor_update(*args(), homogeneous=homogeneous, scale=0.5)
    ref_abs = abs_call(reference.ema_factor_update, *args(), homogeneous=homogeneous, scale=0.5)
    assert rel_err(g, ref) <= products_tol(ref, ref_abs, x.shape[-2] + 3, "fp32")


@triton.jit
def _tile_ids(out_ptr):
    p = tl.program_id(0)
    i, j = upper_tile(p)
    tl.store(out_ptr + 2 * p, i)
    tl.store(out_ptr + 2 * p + 1, j)


def test_upper_tile_enumeration():
    """The kernels' closed-form tile index (an fp32 square root, corrected) visits every upper
    tile (i <= j) exactly once, in the order (0,0), (0,1), (1,1), (0,2), ..."""
    T = 3000 if DEVICE.type == "cuda" else 30
    P = T * (T + 1) // 2
    out = torch.full((P, 2), -1, dtype=torch.int32, device=DEVICE)
    _tile_ids[(P,)](out)
    j = torch.repeat_interleave(torch.arange(T, device=DEVICE), torch.arange(1, T + 1,
                                                                              device=DEVICE))
    i = torch.arange(P, device=DEVICE) - j * (j + 1) // 2
    assert torch.equal(out.long(), torch.stack([i, j], dim=1))


def test_auto_on_cpu_picks_torch():
    assert _registry.resolve("syrk_update", "auto", torch.device("cpu")) == "torch"
    assert _registry.implementations("syrk_update")["triton"].startswith("kfac_kernels.ops.triton")


@pytest.mark.skipif(DEVICE.type == "cuda", reason="checks the CPU decline path")
def test_declines_cpu_tensors_without_interpreter(monkeypatch):
    from kfac_kernels.ops.triton import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    f = torch.zeros(3, 3)
    with pytest.raises(ops.BackendUnavailable, match="CUDA tensors"):
        ops.syrk_update(f, torch.randn(4, 3), alpha=1.0, beta=0.0, backend="triton")


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,homogeneous", [(4096, 1024, True), (65536, 200, True),
                                             (8192, 777, False)])
def test_gpu_bf16(seed, n, k, homogeneous):
    x32 = torch.randn(n, k, device="cuda")
    x = x32.bfloat16()
    f = torch.full((k + homogeneous,) * 2, float("nan"), device="cuda")
    ops.syrk_update(f, x, alpha=1.0 / n, beta=0.0, homogeneous=homogeneous, backend="triton")
    # fp32 math on the bf16 values ...
    _check(torch.zeros_like(f), x, 1.0 / n, 0.0, homogeneous, "fp32", f)
    # ... and within the bf16 tolerance of the unrounded data
    args = lambda: (torch.zeros_like(f).double(), x32.double())   # noqa: E731 (in place)
    kw = dict(alpha=1.0 / n, beta=0.0, homogeneous=homogeneous)
    ref = reference.syrk_update(*args(), **kw)
    tol = products_tol(ref, abs_call(reference.syrk_update, *args(), **kw), n + 3, "bf16-data")
    assert rel_err(f, ref) <= tol


@pytest.mark.gpu
def test_gpu_batched_fp16_and_fp32(seed):
    x = torch.randn(4, 2048, 300, device="cuda").half()
    f0 = sym(301, 4, device="cuda")
    f = f0.clone()
    ops.ema_factor_update(f, x, 0.9, homogeneous=True, backend="triton")
    args = lambda: (f0.double(), x.double(), 0.9)   # noqa: E731 (in place: fresh)
    ref = reference.ema_factor_update(*args(), homogeneous=True)
    tol = products_tol(ref, abs_call(reference.ema_factor_update, *args(), homogeneous=True),
                       x.shape[-2] + 3, "fp32")
    assert rel_err(f, ref) <= tol and torch.equal(f, f.mT)
    x = torch.randn(3000, 1500, device="cuda")
    f0 = sym(1500, device="cuda")
    for tf32, tol in ((False, "fp32"), (True, "tf32")):
        f = f0.clone()
        ops.syrk_update(f, x, alpha=1e-3, beta=0.5, allow_tf32=tf32, backend="triton")
        _check(f0, x, 1e-3, 0.5, False, tol, f)


@pytest.mark.gpu
def test_gpu_float64(seed):
    x = torch.randn(2048, 513, dtype=torch.float64, device="cuda")
    f0 = sym(514, dtype=torch.float64, device="cuda")
    f = f0.clone()
    ops.syrk_update(f, x, alpha=1.0 / 2048, beta=0.3, homogeneous=True, backend="triton")
    _check(f0, x, 1.0 / 2048, 0.3, True, "fp64", f)


@pytest.mark.gpu
def test_gpu_auto_prefers_triton():
    assert _registry.resolve("syrk_update", "auto", torch.device("cuda")) == "triton"

"""Triton conv_input_factor (implicit im2col) against the float64 reference."""
import math

import pytest
import torch

from _triton_helpers import (DEVICE, TOL_FP64, poison, products_tol,  # noqa: F401
                             rel_err, requires_triton)
import triton.language as tl

import kfac_kernels.ops as ops
from kfac_kernels.ops import _registry, reference
from kfac_kernels.ops.triton import conv_factor
from kfac_kernels.ops.triton.conv_factor import ConvConfig

pytestmark = requires_triton

# (x shape, kernel, stride, padding, dilation): 1d/2d/3d, odd sizes, stride, padding, dilation
GEOMETRIES = {
    "2d-3x3-pad": ((2, 3, 9, 11), (3, 3), (1, 1), (1, 1), (1, 1)),
    "1d-stride-dil": ((3, 5, 17), (4,), (2,), (3,), (2,)),
    "3d-mixed": ((1, 4, 5, 6, 7), (2, 3, 2), (1, 2, 1), (1, 0, 1), (2, 1, 1)),
    "2d-1x1-stride2": ((2, 33, 7, 5), (1, 1), (2, 2), (0, 0), (1, 1)),
}


def _ref(x, k, s, p, d, homogeneous):
    return reference.conv_input_factor(x.double().cpu(), k, s, p, d, homogeneous=homogeneous)


def _terms(x, k, s, p, d):
    """Products per factor entry: one per patch row (examples x output positions), plus 2."""
    out = [(n + 2 * pi - di * (ki - 1) - 1) // si + 1
           for n, ki, si, pi, di in zip(x.shape[2:], k, s, p, d)]
    return x.shape[0] * math.prod(out) + 2


def _check(out, x, k, s, p, d, homogeneous, arith):
    ref = _ref(x, k, s, p, d, homogeneous)
    ref_abs = _ref(x.abs(), k, s, p, d, homogeneous)
    tol = products_tol(ref, ref_abs, _terms(x, k, s, p, d), arith)
    assert out.shape == ref.shape
    assert out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol}"
    assert torch.isfinite(out).all()
    assert torch.equal(out, out.T), "result is not exactly symmetric"


@pytest.mark.parametrize("geom", list(GEOMETRIES))
@pytest.mark.parametrize("homogeneous", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(seed, geom, homogeneous, dtype):
    shape, k, s, p, d = GEOMETRIES[geom]
    x = torch.randn(shape).to(dtype).to(DEVICE)
    out = ops.conv_input_factor(x, k, s, p, d, homogeneous=homogeneous, backend="triton")
    _check(out, x, k, s, p, d, homogeneous, "fp32")


@pytest.mark.parametrize("geom", ["2d-3x3-pad", "3d-mixed"])
def test_float64(seed, geom):
    shape, k, s, p, d = GEOMETRIES[geom]
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    out = ops.conv_input_factor(x, k, s, p, d, homogeneous=True, backend="triton")
    _check(out, x, k, s, p, d, True, "fp64")


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("homogeneous", [False, True])
def test_channel_blocked_order(seed, splits, homogeneous):
    """16-wide channel blocks: C=20 spans two blocks (one partial) at each of the 4 kernel
    offsets; the (k, c) tile order is written back in weight.flatten(1)'s (c, k) order, by the
    fused epilogue (one split) and by the finalize kernel (three splits)."""
    x = torch.randn(2, 20, 6, 5, device=DEVICE)
    k, s, p, d = (2, 2), (2, 1), (1, 0), (1, 2)
    out = conv_factor._conv_input_factor(x, k, s, p, d, homogeneous, splits=splits,
                                         config=ConvConfig(tl.float32, "ieee", True, 16, 16, 4, 1))
    _check(out, x, k, s, p, d, homogeneous, "fp32")


def test_default_config_orders():
    """The launcher's choice of column order: channel-blocked when the channels fill tiles."""
    assert conv_factor.pick_config(torch.bfloat16, 256, 9, False).cblock
    assert conv_factor.pick_config(torch.bfloat16, 256, 9, False).block == 128
    assert conv_factor.pick_config(torch.float32, 64, 9, False).block == 64
    assert not conv_factor.pick_config(torch.float32, 3, 49, False).cblock


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_non_contiguous_input(seed, layout):
    if layout == "channels_last":
        x = torch.randn(2, 6, 7, 9, device=DEVICE).to(memory_format=torch.channels_last)
    else:
        x = torch.randn(2, 12, 7, 18, device=DEVICE)[:, ::2, :, ::2]
    assert not x.is_contiguous()
    out = ops.conv_input_factor(x, 3, stride=2, padding=1, homogeneous=True, backend="triton")
    _check(out, x, (3, 3), (2, 2), (1, 1), (1, 1), True, "fp32")


def test_matches_explicit_unfold(seed):
    """Patch order: the same matrix as F.unfold's patches (the order of weight.flatten(1))."""
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64, device=DEVICE)
    out = ops.conv_input_factor(x, (2, 3), stride=1, padding=(1, 0), dilation=(2, 1),
                                backend="triton")
    cols = torch.nn.functional.unfold(x.cpu(), (2, 3), dilation=(2, 1), padding=(1, 0))
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    assert rel_err(out, rows.T @ rows / rows.shape[0]) <= TOL_FP64


def test_auto_on_cpu_picks_torch():
    assert _registry.resolve("conv_input_factor", "auto", torch.device("cpu")) == "torch"


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("C,hw,k,s,p", [(64, 28, 3, 1, 1), (256, 14, 3, 1, 1), (128, 28, 3, 2, 1),
                                        (3, 64, 7, 2, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_bf16_resnet_layers(seed, C, hw, k, s, p, channels_last):
    x32 = torch.randn(8, C, hw, hw, device="cuda")
    x = x32.bfloat16()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = ops.conv_input_factor(x, k, stride=s, padding=p, homogeneous=True, backend="triton")
    _check(out, x, (k, k), (s, s), (p, p), (1, 1), True, "fp32")
    ref = _ref(x32, (k, k), (s, s), (p, p), (1, 1), True)
    ref_abs = _ref(x32.abs(), (k, k), (s, s), (p, p), (1, 1), True)
    terms = _terms(x32, (k, k), (s, s), (p, p), (1, 1))
    assert rel_err(out, ref) <= products_tol(ref, ref_abs, terms, "bf16-data")


@pytest.mark.gpu
def test_gpu_fp32_fp64_and_3d(seed):
    x = torch.randn(4, 32, 20, 20, device="cuda")
    out = ops.conv_input_factor(x, 3, padding=1, homogeneous=True, backend="triton")
    _check(out, x, (3, 3), (1, 1), (1, 1), (1, 1), True, "fp32")
    x = torch.randn(2, 16, 6, 10, 10, dtype=torch.float64, device="cuda")
    out = ops.conv_input_factor(x, 3, stride=(1, 2, 2), padding=1, backend="triton")
    _check(out, x, (3, 3, 3), (1, 2, 2), (1, 1, 1), (1, 1, 1), False, "fp64")


@pytest.mark.gpu
def test_gpu_auto_prefers_triton():
    assert _registry.resolve("conv_input_factor", "auto", torch.device("cuda")) == "triton"


def test_geometry_helper_pads_to_3d():
    S, xs, K, st, pd, dl, T = conv_factor._geometry(torch.empty(2, 3, 17), (4,), (2,), (3,), (2,))
    assert S == (1, 1, 17) and K == (1, 1, 4) and xs[:2] == (0, 0)
    assert T == (1, 1, (17 + 6 - 2 * 3 - 1) // 2 + 1)
    assert math.prod(T) == reference.conv_patches(torch.zeros(1, 1, 17), 4, 2, 3, 2).shape[1]

"""Triton gradient_factor_update (both Gram factors in one launch) and kron_rotate (on the batched
GEMM kernel of kron.py) against the float64 reference. On CPU they run under the interpreter."""
import pytest
import torch

from _triton_helpers import (DEVICE, TOL_FP64, abs_call, poison, products_tol,  # noqa: F401
                             rel_err, requires_triton, sym)
import triton.language as tl

import kfac_kernels.ops as ops
from kfac_kernels.ops import reference
from kfac_kernels.ops.triton import gradient_factors as gf

pytestmark = requires_triton

SMALL = {torch.float32: gf.PairConfig(tl.float32, "ieee", 16, 16, 4, 1),
         torch.float64: gf.PairConfig(tl.float64, "ieee", 16, 16, 4, 1),
         torch.float16: gf.PairConfig(tl.float16, "ieee", 16, 16, 4, 1)}


def _ref(L0, R0, G, beta, scale):
    """Per factor: the float64 result, the same on absolute values (the error bound's scale,
    tests/README.md) and the number of products per entry (plus beta's term), or None."""
    def run(absolute):
        L = None if L0 is None else L0.double().cpu().clone()
        R = None if R0 is None else R0.double().cpu().clone()
        args = (L, R, G.double().cpu())
        fn = reference.gradient_factor_update
        return (abs_call(fn, *args, beta=beta, scale=scale) if absolute
                else fn(*args, beta=beta, scale=scale))
    terms = (G.shape[-1] + 3, G.shape[-2] + 3)         # L = G G^T sums columns, R = G^T G rows
    return tuple(None if w is None else (w, wa, t)
                 for w, wa, t in zip(run(False), run(True), terms))


def _check(out, want, math):
    for o, w in zip(out, want):
        if w is None:
            assert o is None
            continue
        w, w_abs, terms = w
        assert rel_err(o, w) <= products_tol(w, w_abs, terms, math), rel_err(o, w)
        assert torch.equal(o, o.transpose(-1, -2)), "not exactly symmetric"


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 5), (3, 7, 13), (2, 40, 17)])
@pytest.mark.parametrize("dtype,fdtype,tol", [(torch.float32, torch.float32, "fp32"),
                                              (torch.float64, torch.float64, "fp64"),
                                              (torch.float16, torch.float32, "fp32")])
@pytest.mark.parametrize("beta", [0.0, 0.95])
def test_matches_reference_small_tiles(seed, shape, dtype, fdtype, tol, beta):
    """16-wide tiles so that the small shapes have several tiles, diagonal and off-diagonal."""
    G = torch.randn(shape).to(dtype).to(DEVICE)
    m, n = shape[-2:]
    batch = shape[0] if len(shape) == 3 else None
    L0, R0 = sym(m, batch, fdtype), sym(n, batch, fdtype)
    L, R = L0.clone(), R0.clone()
    if beta == 0.0:
        L.fill_(float("nan"))
        R.fill_(float("nan"))
    gf._launch(L, R, G, 0.05, beta, False, config=SMALL[dtype])
    _check((L, R), _ref(L0, R0, G, beta, 0.05), tol)


@pytest.mark.parametrize("side", ["left", "right"])
def test_public_op_one_side_default_config_and_strides(seed, side):
    base = torch.randn(3, 21, 2 * 9, device=DEVICE)
    G = base.transpose(1, 2)[:, ::2, :]                     # [3, 9, 21], not contiguous
    L0, R0 = sym(9, 3), sym(21, 3)
    L = L0.clone() if side == "left" else None
    R = R0.clone() if side == "right" else None
    out = ops.gradient_factor_update(L, R, G, beta=1.0, backend="triton")   # sums: scale 1
    _check(out, _ref(L0 if L is not None else None, R0 if R is not None else None, G, 1.0, 1.0),
           "fp32")


def test_factor_views_are_written_in_place_only(seed):
    G = torch.randn(2, 6, 10, device=DEVICE)
    buf = torch.randn(2, 9, 12, device=DEVICE)
    L = buf[:, 1:7, 3:9]                                   # a strided view
    L.copy_(sym(6, 2))
    L0, guard = L.clone(), buf.clone()
    ops.gradient_factor_update(L, None, G, beta=0.5, backend="triton")
    _check((L,), _ref(L0, None, G, 0.5, 0.5)[:1], "fp32")
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[:, 1:7, 3:9] = False
    assert torch.equal(buf[outside], guard[outside])


@pytest.mark.parametrize("back", [False, True])
@pytest.mark.parametrize("sides", ["both", "left", "right"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, "fp32"), (torch.float64, "fp64")])
def test_kron_rotate_matches_reference(seed, back, sides, dtype, tol):
    V = torch.randn(3, 7, 13, device=DEVICE)
    QL = torch.linalg.qr(torch.randn(3, 7, 7, dtype=torch.float64)).Q.to(dtype).to(DEVICE)
    QR = torch.linalg.qr(torch.randn(3, 13, 13, dtype=torch.float64)).Q.to(dtype).to(DEVICE)
    QL = QL if sides in ("both", "left") else None
    QR = QR if sides in ("both", "right") else None
    U = ops.kron_rotate(V, QL, QR, back=back, backend="triton")
    args = (V.double().cpu(), None if QL is None else QL.double().cpu(),
            None if QR is None else QR.double().cpu())
    want = reference.kron_rotate(*args, back=back)
    tol = products_tol(want, abs_call(reference.kron_rotate, *args, back=back), 7 + 13, tol)
    assert U.dtype == dtype and rel_err(U, want) <= tol


def test_kron_rotate_unbatched(seed):
    V = torch.randn(5, 4, device=DEVICE)
    QL, QR = sym(5).double().to(DEVICE), sym(4).double().to(DEVICE)
    U = ops.kron_rotate(V, QL, QR, backend="triton")
    assert U.shape == (5, 4)
    assert rel_err(U, reference.kron_rotate(V.double().cpu(), QL.cpu(), QR.cpu())) <= TOL_FP64


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("B,m,n", [(12, 768, 3072), (4, 300, 70), (1, 2304, 768)])
def test_gpu_default_config_bf16_fp32_tf32(seed, B, m, n):
    G32 = torch.randn(B, m, n, device="cuda")
    for G, tf32, tol in ((G32, False, "fp32"), (G32, True, "tf32"),
                         (G32.bfloat16(), False, "fp32")):
        L0, R0 = sym(m, B, device="cuda"), sym(n, B, device="cuda")
        L, R = L0.clone(), R0.clone()
        ops.gradient_factor_update(L, R, G, beta=0.95, allow_tf32=tf32, backend="triton")
        _check((L, R), _ref(L0, R0, G, 0.95, 0.05), tol)
    L, R = torch.zeros(B, m, m, device="cuda"), torch.zeros(B, n, n, device="cuda")
    ops.gradient_factor_update(L, R, G32.bfloat16(), beta=0.0, scale=1.0, backend="triton")
    _check((L, R), _ref(torch.zeros_like(L), torch.zeros_like(R), G32, 0.0, 1.0), "bf16-data")

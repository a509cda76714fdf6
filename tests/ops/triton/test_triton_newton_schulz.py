"""Triton newton_schulz against the float64 reference: odd shapes, tall and wide, batches,
non-contiguous inputs, small tiles (several tile rows, off-diagonal tiles), exact symmetry of the
Gram products. Under the interpreter on CPU (fp32 and fp64: the interpreter mis-computes bf16);
the bf16 comparison with torch's own bf16 iteration runs on a GPU."""
import pytest
import torch

from _triton_helpers import (DEVICE, TOL_FP32, TOL_FP64, poison, rel_err,  # noqa: F401
                             requires_triton)
import triton.language as tl

import kfac_kernels.ops as ops
from kfac_kernels.ops import reference
from kfac_kernels.ops.triton import newton_schulz as ns
from kfac_kernels.ops.triton._common import run_all

pytestmark = requires_triton

TOL = {torch.float32: TOL_FP32, torch.float64: TOL_FP64}
# 16-wide tiles and K steps: several tile rows on small matrices, cheap under the interpreter
SMALL = {w: ns.NSConfig(tl.float32 if w == torch.float32 else tl.float64,
                        tl.float32 if w == torch.float32 else tl.float64,
                        "ieee", 16, 16, 16, 16, 16, 4, 1, 4) for w in TOL}


def _truth(X, steps=5):
    return reference.newton_schulz(X.detach().double().cpu(), steps)


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (33, 7), (1, 129), (3, 33, 7), (2, 7, 33)])
@pytest.mark.parametrize("w", [torch.float32, torch.float64])
def test_matches_reference(seed, shape, w):
    X = torch.randn(shape, device=DEVICE)
    out = ops.newton_schulz(X, steps=2, dtype=w, backend="triton")
    assert out.shape == X.shape and out.dtype == w and out.is_contiguous()
    err = rel_err(out, _truth(X, 2))
    assert err <= TOL[w], f"relative error {err:.3g} > {TOL[w]}"


def test_default_steps_batch_and_coefficients(seed):
    """Five steps (the default) and other coefficients (the cubic Newton-Schulz 1.5, -0.5, 0)."""
    X = torch.randn(2, 9, 20, device=DEVICE)
    assert rel_err(ops.newton_schulz(X, backend="triton"), _truth(X)) <= TOL_FP32
    cubic = (1.5, -0.5, 0.0)
    got = ops.newton_schulz(X, 7, cubic, dtype=torch.float64, backend="triton")
    want = reference.newton_schulz(X.double().cpu(), 7, cubic)
    assert rel_err(got, want) <= TOL_FP64


@pytest.mark.parametrize("w", [torch.float32, torch.float64])
@pytest.mark.parametrize("tall", [False, True])
def test_small_tiles_non_contiguous_batch(seed, w, tall):
    """A transposed, strided stack [3, 21, 40] (or its transpose) on 16-wide tiles: 2 x 2 and
    3 x 3 tile grids, diagonal and mirrored off-diagonal tiles, masked edges."""
    base = torch.randn(3, 40, 42, device=DEVICE, dtype=w)
    X = base.transpose(1, 2)[:, ::2, :]                     # [3, 21, 40], strides (., 1, 42)
    if tall:
        X = X.transpose(1, 2)                               # [3, 40, 21]
    assert not X.is_contiguous()
    Y0 = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    launches, out = ns.plan(Y0, 2, reference.NS_COEFFICIENTS, False, config=SMALL[w])
    run_all(launches)
    assert out.shape == X.shape
    err = rel_err(out, _truth(X, 2))
    assert err <= TOL[w], f"relative error {err:.3g} > {TOL[w]}"


@pytest.mark.parametrize("w", [torch.float32, torch.float64])
def test_gram_products_exactly_symmetric(seed, w):
    """A = Y Y^T and B = b A + c A^2 as the symmetric kernel writes them (16-wide tiles on a
    37 x 50 matrix: 3 x 3 tiles): every element written (poisoned buffers), exactly symmetric,
    equal to the float64 products."""
    Y = torch.randn(2, 37, 50, device=DEVICE, dtype=w)
    A = torch.full((2, 37, 37), float("nan"), device=DEVICE, dtype=w)
    Bm = torch.full_like(A, float("nan"))
    run_all([ns._sym(Y, None, A, 1.0, 0.0, SMALL[w]), ns._sym(A, A, Bm, -2.0, 0.3, SMALL[w])])
    for M in (A, Bm):
        assert torch.isfinite(M).all()
        assert torch.equal(M, M.transpose(1, 2))
    Yd = Y.double().cpu()
    Ad = Yd @ Yd.transpose(1, 2)
    assert rel_err(A, Ad) <= TOL[w]
    Ad = A.double().cpu()
    assert rel_err(Bm, 0.3 * Ad + (-2.0) * Ad @ Ad) <= TOL[w]


def test_zero_matrix_and_zero_steps(seed):
    X = torch.zeros(2, 5, 8, device=DEVICE)
    assert torch.equal(ops.newton_schulz(X, backend="triton"), X)     # eps keeps 0 / 0 away
    X = torch.randn(5, 8, device=DEVICE)
    got = ops.newton_schulz(X, steps=0, backend="triton")
    assert torch.allclose(got, X / X.norm(), rtol=1e-6, atol=0)


@pytest.mark.gpu       # skipped without CUDA: "no CUDA device" (the interpreter mis-computes bf16)
@pytest.mark.parametrize("shape", [(4, 768, 768), (3, 768, 3072), (2, 3072, 768), (1, 33, 129)])
def test_bf16_within_twice_torch_error(shape):
    """bf16 on the GPU: error against float64 at most twice that of torch's own bf16 iteration
    (torch.optim.Muon's: bf16 matmuls, A and A^2 rounded to bf16), plus one bf16 unit roundoff."""
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns
    g = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(shape, device="cuda", generator=g)
    got = ops.newton_schulz(X, dtype=torch.bfloat16, backend="triton")
    want = _truth(X)
    base = torch.stack([torch_ns(x, reference.NS_COEFFICIENTS, 5, 1e-7) for x in X])
    u = 2.0 ** -8
    assert rel_err(got, want) <= 2 * rel_err(base, want) + u


def test_muon_on_the_triton_backend(seed):
    """kfac_kernels.optim.Muon with backend="triton" (fp32 iteration under the interpreter) takes
    the steps of backend="torch": 3 steps on a batch of two same-shaped matrices and a tall one,
    to fp32 accuracy."""
    from kfac_kernels.optim import Muon
    init = [torch.randn(s, device=DEVICE) for s in ((9, 14), (9, 14), (20, 6))]
    runs = []
    for backend in ("triton", "torch"):
        ps = [p.clone().requires_grad_() for p in init]
        opt = Muon(ps, lr=0.05, ns_steps=3, ns_dtype=torch.float32, backend=backend)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
            opt.step()
        runs.append(ps)
    for p, q, p0 in zip(*runs, init):
        assert rel_err(p - p0, q - p0) <= TOL_FP32

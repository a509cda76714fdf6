"""Triton Kronecker preconditioning (eigen, EKFAC, inverse) against the float64 reference."""
import pytest
import torch

from _triton_helpers import (DEVICE, TOL_BF16, TOL_FP32, TOL_FP64, TOL_TF32,  # noqa: F401
                             abs_call, poison, products_tol, rel_err, requires_triton,
                             tf32_matmul)

import kfac_kernels.ops as ops
from kfac_kernels.ops import _registry, reference

pytestmark = requires_triton

SHAPES = [(None, 1, 7), (3, 33, 7), (1, 129, 33), (3, 7, 70)]


def _orth(batch, n, dtype, device=DEVICE):
    q = torch.linalg.qr(torch.randn(batch, n, n, dtype=torch.float64))[0]
    return q.to(dtype).to(device)


def _inputs(batch, m, n, vdtype, wdtype, device=DEVICE):
    B = batch or 1
    V = torch.randn(B, m, n).to(vdtype).to(device)
    QG, QA = _orth(B, m, wdtype, device), _orth(B, n, wdtype, device)
    # the other values at least 1e-2: far above the pseudo-inverse cut-off of damping 0
    # (size * eps * max, docs/math.md), which differs between fp32 and the fp64 reference
    lamG = torch.rand(B, m, dtype=torch.float64) + 1e-2
    lamA = torch.rand(B, n, dtype=torch.float64) + 1e-2
    lamG[:, 0] = 0.0                 # a zero eigenvalue ...
    lamA[:, -1] = -1e-3              # ... and a negative one (clamped to 0)
    scal = torch.randn(B, m, n, dtype=torch.float64)
    scal = scal + scal.sign() * 1e-2
    scal[:, 0, :] = 0.0
    t = dict(V=V, QG=QG, QA=QA, lamG=lamG.to(wdtype).to(device), lamA=lamA.to(wdtype).to(device),
             S=scal.to(wdtype).to(device),
             Gi=torch.randn(B, m, m, dtype=wdtype, device=device),
             Ai=torch.randn(B, n, n, dtype=wdtype, device=device))
    if batch is None:
        t = {k: v[0] for k, v in t.items()}
    return t


def _damping(kind, batch, wdtype, device=DEVICE):
    if kind == "float":
        return 1e-2
    if kind == "zero":
        return 0.0
    if kind == "0d":
        return torch.tensor(0.05, dtype=wdtype, device=device)
    g = torch.rand(batch or 1, dtype=wdtype) + 0.01
    return (g[0] if batch is None else g).to(device)


def _d64(d):
    return d.double().cpu() if isinstance(d, torch.Tensor) else d


def _cpu64(t):
    return {k: v.double().cpu() for k, v in t.items()}


def _check_dot(dot, ref_dot, U, V, tol):
    assert dot.shape == ref_dot.shape
    scale = (U.double().abs().cpu() * V.double().abs().cpu()).sum(dim=(-2, -1))
    assert ((dot.double().cpu() - ref_dot).abs() <= tol * scale + 1e-30).all(), (dot, ref_dot)


def _tol(fn, args, kwargs, m, n, vdtype=torch.float32, math="fp32"):
    """The bound on U = QG (s * (QG^T V QA)) QA^T (or Gi V Ai) against the float64 reference:
    gamma_(2(m + n) + 4) times the same computation on absolute values (the chain's products plus
    the scaling's three roundings, tests/README.md), plus the fp16 output's rounding."""
    if fn is reference.kron_precondition_eigen:   # negative eigenvalues count as 0 (clamped)
        args = tuple(a.clamp_min(0) if i in (2, 4) else a for i, a in enumerate(args))
    ref = fn(*args, **kwargs)
    ref_abs = abs_call(fn, *args, **kwargs)
    if vdtype == torch.float16:
        math = "fp32-fp16-out"
    return products_tol(ref, ref_abs, 2 * (m + n) + 4, math)


@pytest.mark.parametrize("batch,m,n", SHAPES)
@pytest.mark.parametrize("damping", ["float", "zero", "0d", "vector"])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.float16])
def test_eigen_matches_reference(seed, batch, m, n, damping, vdtype):
    t = _inputs(batch, m, n, vdtype, torch.float32)
    if damping == "vector" and batch is None:
        damping = "0d"
    d = _damping(damping, batch, torch.float32)
    U, dot = ops.kron_precondition_eigen(t["V"], t["QG"], t["lamG"], t["QA"], t["lamA"], d,
                                         return_dot=True, backend="triton")
    r = _cpu64(t)
    args = (r["V"], r["QG"], r["lamG"], r["QA"], r["lamA"], _d64(d))
    Ur, dotr = reference.kron_precondition_eigen(*args, return_dot=True)
    assert U.dtype == vdtype and U.shape == t["V"].shape
    assert torch.isfinite(U).all()
    assert rel_err(U, Ur) <= _tol(reference.kron_precondition_eigen, args, {}, m, n, vdtype)
    _check_dot(dot, dotr, Ur, r["V"], TOL_FP32)


@pytest.mark.parametrize("batch,m,n", SHAPES)
@pytest.mark.parametrize("damping", ["float", "zero", "vector"])
def test_ekfac_matches_reference(seed, batch, m, n, damping):
    t = _inputs(batch, m, n, torch.float32, torch.float32)
    if damping == "vector" and batch is None:
        damping = "0d"
    d = _damping(damping, batch, torch.float32)
    U, dot = ops.ekfac_precondition(t["V"], t["QG"], t["QA"], t["S"], d, return_dot=True,
                                    backend="triton")
    r = _cpu64(t)
    args = (r["V"], r["QG"], r["QA"], r["S"], _d64(d))
    Ur, dotr = reference.ekfac_precondition(*args, return_dot=True)
    assert torch.isfinite(U).all()
    assert rel_err(U, Ur) <= _tol(reference.ekfac_precondition, args, {}, m, n)
    _check_dot(dot, dotr, Ur, r["V"], TOL_FP32)


@pytest.mark.parametrize("batch,m,n", SHAPES)
@pytest.mark.parametrize("return_dot", [False, True])
def test_inverse_matches_reference(seed, batch, m, n, return_dot):
    t = _inputs(batch, m, n, torch.float32, torch.float32)
    res = ops.kron_precondition_inverse(t["V"], t["Gi"], t["Ai"], return_dot=return_dot,
                                        backend="triton")
    r = _cpu64(t)
    ref = reference.kron_precondition_inverse(r["V"], r["Gi"], r["Ai"], return_dot=return_dot)
    if return_dot:
        (U, dot), (Ur, dotr) = res, ref
        _check_dot(dot, dotr, Ur, r["V"], TOL_FP32)
    else:
        U, Ur = res, ref
    tol = _tol(reference.kron_precondition_inverse, (r["V"], r["Gi"], r["Ai"]), {}, m, n)
    assert rel_err(U, Ur) <= tol


def test_float64(seed):
    t = _inputs(3, 40, 17, torch.float64, torch.float64)
    d = torch.tensor([1e-3, 0.0, 2.0], dtype=torch.float64, device=DEVICE)
    U, dot = ops.kron_precondition_eigen(t["V"], t["QG"], t["lamG"], t["QA"], t["lamA"], d,
                                         return_dot=True, backend="triton")
    r = _cpu64(t)
    Ur, dotr = reference.kron_precondition_eigen(r["V"], r["QG"], r["lamG"], r["QA"], r["lamA"],
                                                 d.cpu(), return_dot=True)
    assert rel_err(U, Ur) <= TOL_FP64
    _check_dot(dot, dotr, Ur, r["V"], TOL_FP64)
    U = ops.kron_precondition_inverse(t["V"], t["Gi"], t["Ai"], backend="triton")
    assert rel_err(U, reference.kron_precondition_inverse(r["V"], r["Gi"], r["Ai"])) <= TOL_FP64


def test_float64_damping_float_keeps_precision(seed):
    """A Python-float damping reaches fp64 kernels with ~48 bits (hi/lo fp32 pair)."""
    t = _inputs(1, 9, 5, torch.float64, torch.float64)
    lamG = torch.zeros_like(t["lamG"])
    d = 1.0 / 3.0
    U = ops.kron_precondition_eigen(t["V"], t["QG"], lamG, t["QA"], t["lamA"], d,
                                    backend="triton")
    r = _cpu64(t)
    Ur = reference.kron_precondition_eigen(r["V"], r["QG"], lamG.cpu(), r["QA"], r["lamA"], d)
    assert rel_err(U, Ur) <= TOL_FP64


def test_non_contiguous_operands(seed):
    B, m, n = 3, 33, 20
    t = _inputs(B, m, n, torch.float32, torch.float32)
    V = t["V"].transpose(1, 2).contiguous().transpose(1, 2)          # column-major V
    QG = t["QG"].transpose(1, 2).contiguous().transpose(1, 2)        # column-major Q
    lamA = torch.stack([t["lamA"], t["lamA"]], dim=-1)[..., 0]       # strided eigenvalues
    assert not (V.is_contiguous() or QG.is_contiguous() or lamA.is_contiguous())
    d = torch.rand(2 * B, device=DEVICE)[::2] + 0.01                  # strided damping [B]
    U, dot = ops.kron_precondition_eigen(V, QG, t["lamG"], t["QA"], lamA, d, return_dot=True,
                                         backend="triton")
    r = _cpu64(t)
    args = (r["V"], r["QG"], r["lamG"], r["QA"], r["lamA"], d.double().cpu())
    Ur, dotr = reference.kron_precondition_eigen(*args, return_dot=True)
    assert rel_err(U, Ur) <= _tol(reference.kron_precondition_eigen, args, {}, m, n)
    _check_dot(dot, dotr, Ur, r["V"], TOL_FP32)


def test_zero_denominator_gives_zero(seed):
    """damping 0 with a zero eigenvalue on both sides: that entry of the rotated gradient is
    dropped (pseudo-inverse), not turned into inf/NaN."""
    m, n = 5, 4
    V = torch.randn(m, n, device=DEVICE)
    I_m, I_n = torch.eye(m, device=DEVICE), torch.eye(n, device=DEVICE)
    lamG = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], device=DEVICE)
    lamA = torch.tensor([1.0, 0.5, 0.25, 2.0], device=DEVICE)
    U = ops.kron_precondition_eigen(V, I_m, lamG, I_n, lamA, 0.0, backend="triton")
    expect = V / (lamG[:, None] * lamA[None, :])
    expect[0] = 0.0
    assert torch.allclose(U, expect, rtol=1e-6, atol=0)


def test_auto_on_cpu_picks_torch():
    for op in ("kron_precondition_eigen", "ekfac_precondition", "kron_precondition_inverse"):
        assert _registry.resolve(op, "auto", torch.device("cpu")) == "torch"


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("m,n", [(2304, 769), (768, 769), (3072, 769), (768, 3073)])
def test_gpu_gpt2_shapes(seed, m, n):
    t = _inputs(4, m, n, torch.float32, torch.float32, device="cuda")
    d = torch.full((4,), 1e-3, device="cuda")
    U, dot = ops.kron_precondition_eigen(t["V"], t["QG"], t["lamG"], t["QA"], t["lamA"], d,
                                         return_dot=True, backend="triton")
    args = (*(t[k].double() for k in ("V", "QG", "lamG", "QA", "lamA")), d.double())
    Ur, dotr = reference.kron_precondition_eigen(*args, return_dot=True)
    assert rel_err(U, Ur) <= _tol(reference.kron_precondition_eigen, args, {}, m, n)
    _check_dot(dot, dotr, Ur, t["V"].double(), TOL_FP32)


@pytest.mark.gpu
def test_gpu_bf16_gradient_and_tf32(seed):
    t = _inputs(3, 768, 769, torch.bfloat16, torch.float32, device="cuda")
    args = (t["QG"], t["lamG"], t["QA"], t["lamA"], 1e-3)
    U = ops.kron_precondition_eigen(t["V"], *args, backend="triton")
    Ur = reference.kron_precondition_eigen(t["V"].double(), *(a.double() if torch.is_tensor(a)
                                                              else a for a in args))
    assert U.dtype == torch.bfloat16 and rel_err(U, Ur) <= TOL_BF16
    t = _inputs(3, 768, 769, torch.float32, torch.float32, device="cuda")
    with tf32_matmul():
        U = ops.ekfac_precondition(t["V"], t["QG"], t["QA"], t["S"], 1e-3, backend="triton")
    Ur = reference.ekfac_precondition(t["V"].double(), t["QG"].double(), t["QA"].double(),
                                      t["S"].double(), 1e-3)
    assert rel_err(U, Ur) <= TOL_TF32


@pytest.mark.gpu
def test_gpu_auto_prefers_triton():
    assert _registry.resolve("kron_precondition_eigen", "auto", torch.device("cuda")) == "triton"

"""symeig / damped_inverse on a CUDA device: the CUDA kernels (kfac_kernels._C), cuSOLVER's batched
Jacobi through CuPy and the automatic choice, each against the reference: eigenvector residual
||FQ - QL|| / ||F|| <= 1e-4 (docs/math.md, "Accuracy of the kernel ops"; fp32 reaches ~1e-5), orthogonality, eigenvalues, inverse
error, failed-matrix reporting, layouts and streams. Skipped without a CUDA device; a backend that
should be there (nvcc present, CuPy importable) but fails to load is a failure, not a skip.
"""
from __future__ import annotations

import pytest
import torch

from _decomp_helpers import check_eigh as _check_eigh
from _decomp_helpers import rel, spd as _spd
from kfac_kernels import _cext, ops
from kfac_kernels.ops import reference
from kfac_kernels.ops._registry import BackendUnavailable

pytestmark = pytest.mark.gpu

RES = {torch.float32: 2e-5, torch.float64: 1e-11}
INV = {torch.float32: 2e-6, torch.float64: 1e-11}


def _need(backend):
    ok, why = ops.backend_status(backend)
    if ok:
        return
    if backend == "cuda" and ("nvcc not found" in why or "KFAC_KERNELS_CUDA=0" in why):
        pytest.skip(f"kfac_kernels._C not built: {why}")
    if backend == "cupy" and "cupy not importable" in why:
        pytest.skip(why)
    pytest.fail(f"backend {backend!r} should be usable here but is not: {why}")


@pytest.fixture
def cuda_backend():
    _need("cuda")


@pytest.fixture
def cupy_backend():
    _need("cupy")


def spd(bsz, n, dtype, seed=0, shift=0.0, device="cuda"):
    return _spd(bsz, n, dtype, seed=seed, shift=shift, device=device)


def check_eigh(f, lam, q, dtype):
    res = _check_eigh(f, lam, q, RES[dtype])
    assert res <= 1e-4, f"eigenvector residual {res:.2e} above the 1e-4 target"


# ----------------------------------------------------------------------------- Jacobi kernel
@pytest.mark.parametrize("dtype, n", [(torch.float32, n) for n in (1, 2, 7, 33, 64, 129, 147)]
                         + [(torch.float64, n) for n in (1, 7, 33, 100)])
def test_cuda_jacobi(cuda_backend, dtype, n):
    f = spd(5, n, dtype, seed=n)
    lam, q, info = ops.symeig(f, method="jacobi", backend="cuda", return_info=True)
    assert info.tolist() == [0] * 5
    check_eigh(f, lam, q, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_jacobi_matches_host_emulation(cuda_backend, dtype):
    """The device and the CPU run the same kernel code: same sweeps, same results to rounding."""
    from kfac_kernels.ops.cuda.symeig import DEFAULT_TOL, jacobi_eigh

    f = spd(3, 40, dtype, seed=3)
    lam, q, info, sweeps = jacobi_eigh(f)
    C = _cext.load()
    fh = f.cpu().contiguous()
    lam_h, q_h = torch.empty_like(lam.cpu()), torch.empty_like(fh)
    info_h, sweeps_h = torch.empty(3, dtype=torch.int32), torch.empty(3, dtype=torch.int32)
    C.emulate_jacobi_eigh(F=fh.data_ptr(), f_stride_b=fh.stride(0), f_stride_r=fh.stride(1), Q0=0,
                          q_stride_b=0, q_stride_r=0, evals=lam_h.data_ptr(), evecs=q_h.data_ptr(),
                          info=info_h.data_ptr(), sweeps=sweeps_h.data_ptr(), batch=3, n=40,
                          dtype=0 if dtype == torch.float32 else 1, tol=DEFAULT_TOL[dtype],
                          max_sweeps=15)
    assert info.tolist() == info_h.tolist() == [0, 0, 0]
    assert (sweeps.cpu() - sweeps_h).abs().max() <= 1
    assert (lam.cpu().double() - lam_h.double()).abs().max() <= RES[dtype] * f.double().norm().item()


def test_cuda_jacobi_warm_start(cuda_backend):
    from kfac_kernels.ops.cuda.symeig import jacobi_eigh

    f = spd(4, 96, torch.float32, seed=4)
    _, q0 = torch.linalg.eigh(f.double())
    f2 = (f.double() + 1e-3 * spd(4, 96, torch.float64, seed=5)).float()
    _, _, _, cold = jacobi_eigh(f2)
    lam, q, info, warm = jacobi_eigh(f2, q0.float())
    assert info.tolist() == [0] * 4
    check_eigh(f2, lam, q, torch.float32)
    assert bool((warm <= 3).all()) and bool((warm < cold).all()), (warm, cold)


def test_cuda_jacobi_failures(cuda_backend):
    f = spd(3, 33, torch.float32, seed=6)
    f[1, 4, 20] = float("nan")
    lam, q, info = ops.symeig(f, method="jacobi", backend="cuda", return_info=True)
    assert info.tolist() == [0, 2, 0]
    assert bool(torch.isnan(lam[1]).all()) and bool(torch.isnan(q[1]).all())
    check_eigh(f[[0, 2]], lam[[0, 2]], q[[0, 2]], torch.float32)
    lam, q, info = ops.symeig(f[[0, 2]], method="jacobi", backend="cuda", return_info=True,
                              max_sweeps=1)
    assert info.tolist() == [1, 1] and bool(torch.isnan(lam).all())


def test_cuda_jacobi_declines_beyond_shared_memory(cuda_backend):
    f = spd(2, 400, torch.float32, seed=7)
    with pytest.raises(BackendUnavailable, match="beyond the Jacobi kernel"):
        ops.symeig(f, method="jacobi", backend="cuda")
    lam, q = ops.symeig(f)  # auto: falls back to torch.linalg.eigh
    check_eigh(f, lam, q, torch.float32)


def test_cuda_refresh(cuda_backend):
    f = spd(4, 64, torch.float32, seed=8)
    _, q0 = torch.linalg.eigh(f)
    f2 = f.clone()
    f2[1:3] += 0.05 * spd(2, 64, torch.float32, seed=9)
    lam, q, info = ops.symeig(f2, method="refresh", prev_eigenvectors=q0, backend="cuda",
                              return_info=True)
    assert info.tolist() == [0] * 4
    check_eigh(f2, lam, q, torch.float32)
    # matrix 0 did not move: its previous vectors are kept (re-ordered), bit for bit
    same = (q[0].unsqueeze(2) == q0[0].unsqueeze(1)).all(0)  # [j, i]: column j of q is q0's i
    assert bool(same.any(1).all())
    lam_t, q_t = ops.symeig(f2, method="refresh", prev_eigenvectors=q0, backend="torch")
    check_eigh(f2, lam_t, q_t, torch.float32)


# ----------------------------------------------------------------------------- CuPy
@pytest.mark.parametrize("dtype, n", [(torch.float32, 1), (torch.float32, 7), (torch.float32, 32),
                                      (torch.float64, 17)])
def test_cupy_syevj(cupy_backend, dtype, n):
    f = spd(64, n, dtype, seed=10 + n)
    lam, q, info = ops.symeig(f, method="jacobi", backend="cupy", return_info=True)
    assert info.tolist() == [0] * 64
    check_eigh(f, lam, q, dtype)
    lam2, q2 = ops.symeig(f, method="jacobi", backend="cupy", tol=1e-4, max_sweeps=50)
    assert rel(lam2, lam) <= 1e-3


def test_cupy_failures_and_limits(cupy_backend):
    f = spd(3, 16, torch.float32, seed=11)
    f[2, 0, 0] = float("inf")
    lam, q, info = ops.symeig(f, backend="cupy", return_info=True)
    assert info.tolist() == [0, 0, 2] and bool(torch.isnan(q[2]).all())
    with pytest.raises(BackendUnavailable, match="n <= 32"):
        ops.symeig(spd(2, 33, torch.float32), backend="cupy")


def test_cupy_on_a_side_stream(cupy_backend):
    f = spd(32, 24, torch.float32, seed=12)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lam, q = ops.symeig(f, backend="cupy")
    s.synchronize()
    check_eigh(f, lam, q, torch.float32)


# ----------------------------------------------------------------------------- automatic choice
@pytest.mark.parametrize("n, bsz", [(16, 32), (48, 8), (48, 1), (300, 3)])
def test_auto_symeig(n, bsz):
    f = spd(bsz, n, torch.float32, seed=n)
    lam, q, info = ops.symeig(f, return_info=True)
    assert info.tolist() == [0] * bsz
    check_eigh(f, lam, q, torch.float32)


# ----------------------------------------------------------------------------- Cholesky inverse
def _cuda_inverse(f, damping, variant, **kw):
    from kfac_kernels.ops.cuda.damped_inverse import damped_inverse

    return damped_inverse(f, damping, variant=variant, return_info=True, **kw)


@pytest.mark.parametrize("variant", ["smem", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 33, 129, 200])
def test_cuda_inverse(cuda_backend, variant, dtype, n):
    f = spd(4, n, dtype, seed=20 + n, shift=1e-2)
    damping = torch.tensor([1e-3, 0.0, 0.1, 1.0], dtype=dtype, device="cuda")
    if variant == "smem" and dtype == torch.float64 and n == 200:
        with pytest.raises(Exception, match="beyond the shared-memory Cholesky kernel"):
            _cuda_inverse(f, damping, variant)
        return
    inv, info = _cuda_inverse(f, damping, variant)
    assert info.tolist() == [0] * 4
    ref = reference.damped_inverse(f.double(), damping.double())
    torch_err = rel(reference.damped_inverse(f, damping), ref)
    assert rel(inv, ref) <= max(2 * torch_err, INV[dtype]), (rel(inv, ref), torch_err)
    assert torch.equal(inv, inv.transpose(-1, -2)), "inverse not exactly symmetric"


@pytest.mark.parametrize("n", [513, 1000])
def test_cuda_inverse_blocked_large(cuda_backend, n):
    f = spd(3, n, torch.float32, seed=n, shift=1e-2)
    inv, info = _cuda_inverse(f, 1e-3, "blocked")
    ref = reference.damped_inverse(f.double(), 1e-3)
    assert info.tolist() == [0, 0, 0]
    assert rel(inv, ref) <= max(2 * rel(reference.damped_inverse(f, 1e-3), ref), INV[torch.float32])


@pytest.mark.parametrize("variant", ["smem", "blocked"])
def test_cuda_inverse_reports_failures(cuda_backend, variant):
    f = spd(4, 70, torch.float32, seed=30, shift=0.5)
    f[1, 5, 5] = -1.0
    f[2, 64, 64] = -3.0
    f[3, 40, 12] = float("nan")
    inv, info = _cuda_inverse(f, 0.0, variant)
    assert info.tolist() == [0, 6, 65, 41]
    assert info.tolist()[:3] == torch.linalg.cholesky_ex(f[:3])[1].tolist()
    assert bool(torch.isnan(inv[1:]).all()) and bool(torch.isfinite(inv[0]).all())


def test_cuda_inverse_layouts_and_damping_forms(cuda_backend):
    base = spd(3, 24, torch.float32, seed=31)
    wide = torch.zeros(3, 24, 40, device="cuda")
    wide[:, :, :24] = base
    strided = wide[:, :, :24]  # row stride 40
    ref = reference.damped_inverse(base.double(), 0.2)
    for damping in (0.2, torch.tensor(0.2, device="cuda"), torch.full((3,), 0.2, device="cuda")):
        for variant in ("smem", "blocked"):
            inv, info = _cuda_inverse(strided, damping, variant)
            assert info.tolist() == [0, 0, 0] and rel(inv, ref) <= INV[torch.float32]
    one = base[0].expand(5, 24, 24)  # batch stride 0
    inv, info = _cuda_inverse(one, 0.2, "smem")
    assert info.tolist() == [0] * 5 and rel(inv[4], ref[0]) <= INV[torch.float32]
    inv2, info2 = _cuda_inverse(base[1], 0.2, "blocked")  # unbatched
    assert inv2.shape == (24, 24) and int(info2) == 0
    empty, info0 = _cuda_inverse(base[:0], 0.2, "smem")
    assert empty.shape == (0, 24, 24) and info0.shape == (0,)


def test_cuda_inverse_fp32_accumulation_switch(cuda_backend):
    f = spd(2, 100, torch.float32, seed=32, shift=1e-3)
    ref = reference.damped_inverse(f.double(), 1e-3)
    for variant in ("smem", "blocked"):
        wide = rel(_cuda_inverse(f, 1e-3, variant, fp64_accumulate=True)[0], ref)
        narrow = rel(_cuda_inverse(f, 1e-3, variant, fp64_accumulate=False)[0], ref)
        assert wide <= narrow * 1.01 + 1e-7, (variant, wide, narrow)


def test_cuda_inverse_on_a_side_stream(cuda_backend):
    f = spd(8, 64, torch.float32, seed=33, shift=1e-2)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        inv, info = _cuda_inverse(f, 1e-3, "smem")
        inv_b, _ = _cuda_inverse(f, 1e-3, "blocked")
    s.synchronize()
    ref = reference.damped_inverse(f.double(), 1e-3)
    assert rel(inv, ref) <= INV[torch.float32] and rel(inv_b, ref) <= INV[torch.float32]


@pytest.mark.parametrize("n, bsz", [(32, 16), (200, 2), (600, 8), (600, 1)])
def test_auto_damped_inverse(n, bsz):
    f = spd(bsz, n, torch.float32, seed=n, shift=1e-2)
    inv, info = ops.damped_inverse(f, 1e-3, return_info=True)
    ref = reference.damped_inverse(f.double(), 1e-3)
    assert info.tolist() == [0] * bsz
    assert rel(inv, ref) <= max(2 * rel(reference.damped_inverse(f, 1e-3), ref), INV[torch.float32])

"""Torch twins of the CUDA kernels (tests/_support/_cuda_twins.py) against torch.linalg on the CPU:
same Jacobi round-robin ordering and convergence test, same left-looking and blocked Cholesky
structure, float64 and float32, odd sizes, batches, non-PD and non-finite inputs."""
from __future__ import annotations

import itertools

import pytest
import torch

import _cuda_twins as twins
from _decomp_helpers import check_eigh, rel, spd

SIZES = [1, 2, 7, 33, 129]
DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-13, torch.float32: 1e-6}  # Jacobi tolerance (the kernel's defaults)
RES = {torch.float64: 1e-12, torch.float32: 2e-5}  # eigen-residual / orthogonality bound


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the twins loop over small tensors: threads only add overhead
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- Jacobi ordering
@pytest.mark.parametrize("m", [2, 4, 8, 34, 130])
def test_round_robin_meets_every_pair_once_per_sweep(m):
    rounds = twins.jacobi_pairs(m)
    assert len(rounds) == m - 1
    seen = []
    for ps, qs in rounds:
        assert len(ps) == m // 2
        assert sorted(ps + qs) == list(range(m)), "a round must touch every index exactly once"
        assert all(p < q for p, q in zip(ps, qs))
        seen += list(zip(ps, qs))
    assert sorted(seen) == list(itertools.combinations(range(m), 2))


# ----------------------------------------------------------------------------- Jacobi
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_jacobi_twin_matches_eigh(dtype, n):
    bsz = 2 if n == 129 else 3
    f = spd(bsz, n, dtype, seed=n)
    lam, vec, info, sweeps = twins.jacobi_eigh_twin(f, tol=TOL[dtype], max_sweeps=15)
    assert info.tolist() == [0] * bsz
    check_eigh(f, lam, vec, RES[dtype])
    assert (sweeps <= 12).all()


def test_jacobi_twin_unbatched_and_odd_order_padding():
    f = spd(1, 7, torch.float64, seed=3)[0]
    lam, vec, info, sweeps = twins.jacobi_eigh_twin(f, tol=1e-13, max_sweeps=15)
    assert lam.shape == (7,) and vec.shape == (7, 7) and int(info) == 0
    check_eigh(f, lam, vec, 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_jacobi_twin_warm_start_converges_in_few_sweeps(dtype):
    f = spd(3, 33, dtype, seed=1)
    _, q0 = torch.linalg.eigh(f.double())
    f2 = (f.double() + 1e-3 * spd(3, 33, torch.float64, seed=2)).to(dtype)
    cold = twins.jacobi_eigh_twin(f2, tol=TOL[dtype], max_sweeps=15)
    warm = twins.jacobi_eigh_twin(f2, q0.to(dtype), tol=TOL[dtype], max_sweeps=15)
    assert warm[2].tolist() == [0, 0, 0]
    check_eigh(f2, warm[0], warm[1], RES[dtype])
    assert (warm[3] <= 3).all() and (warm[3] < cold[3]).all(), (warm[3], cold[3])


def test_jacobi_twin_nonfinite_and_not_converged():
    f = spd(3, 7, torch.float64, seed=4)
    f[1, 2, 5] = float("nan")
    lam, vec, info, sweeps = twins.jacobi_eigh_twin(f, tol=1e-13, max_sweeps=15)
    assert info.tolist() == [0, twins.JACOBI_NON_FINITE, 0]
    assert torch.isnan(lam[1]).all() and torch.isnan(vec[1]).all() and int(sweeps[1]) == 0
    check_eigh(f[[0, 2]], lam[[0, 2]], vec[[0, 2]], 1e-12)
    g = spd(2, 33, torch.float64, seed=5)
    lam, vec, info, sweeps = twins.jacobi_eigh_twin(g, tol=1e-13, max_sweeps=1)
    assert info.tolist() == [twins.JACOBI_NOT_CONVERGED] * 2 and sweeps.tolist() == [1, 1]
    assert torch.isnan(lam).all() and torch.isnan(vec).all()


@pytest.mark.parametrize("kind", ["zero", "identity", "repeated", "rank1", "graded"])
def test_jacobi_twin_special_matrices(kind):
    n = 16
    g = torch.Generator().manual_seed(6)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectra = {"zero": torch.zeros(n), "identity": torch.ones(n),
               "repeated": torch.tensor([1.0] * 8 + [2.0] * 8),
               "rank1": torch.tensor([0.0] * (n - 1) + [5.0]),
               "graded": torch.logspace(-8, 0, n)}
    f = q @ torch.diag(spectra[kind].double()) @ q.T
    f = (0.5 * (f + f.T)).unsqueeze(0)
    if kind in ("zero", "identity"):
        f = torch.diag(spectra[kind].double()).unsqueeze(0)
    dtype = torch.float32 if kind == "graded" else torch.float64
    lam, vec, info, sweeps = twins.jacobi_eigh_twin(f.to(dtype), tol=TOL[dtype], max_sweeps=15)
    assert info.tolist() == [0]
    check_eigh(f.to(dtype), lam, vec, RES[dtype])
    if kind in ("zero", "identity"):
        assert sweeps.tolist() == [0]


# ----------------------------------------------------------------------------- Cholesky
def torch_inverse(f, damping):
    eye = torch.eye(f.shape[-1], dtype=f.dtype)
    g = torch.as_tensor(damping, dtype=f.dtype).reshape(-1, 1, 1)
    return torch.cholesky_inverse(torch.linalg.cholesky(f + g * eye))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("which", ["smem", "blocked"])
def test_cholesky_twins_match_torch(dtype, n, which):
    f = spd(3, n, dtype, seed=20 + n)
    damping = torch.tensor([0.1, 0.0, 1.0], dtype=dtype)
    fn = twins.damped_inverse_twin if which == "smem" else twins.damped_inverse_blocked_twin
    inv, info = fn(f, damping)
    assert info.tolist() == [0, 0, 0]
    ref = torch_inverse(f.double(), damping.double())
    err = rel(inv, ref)
    if dtype == torch.float64:
        assert err <= 1e-12
    else:  # fp64 accumulation: at most twice torch's own fp32 error (flash-attention's rule)
        assert err <= 2 * rel(torch_inverse(f, damping), ref) + 1e-7, err


@pytest.mark.parametrize("dtype", DTYPES)
def test_cholesky_factor_twin_matches_torch(dtype):
    f = spd(2, 33, dtype, seed=8)
    l, info = twins.chol_lower_twin(f, torch.float64)
    ref = torch.linalg.cholesky(f.double())
    assert info.tolist() == [0, 0]
    assert rel(torch.tril(l), ref) <= (1e-14 if dtype == torch.float64 else 1e-7)
    w = twins.trtri_lower_twin(l, torch.float64)
    assert rel(torch.tril(w), torch.linalg.inv(ref)) <= (1e-13 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("which", ["smem", "blocked"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cholesky_twins_report_failures(which, dtype):
    n = 70  # three 32-wide tiles: failures in the first and in the last panel
    f = spd(4, n, dtype, seed=9, shift=0.5)
    f[1, 5, 5] = -1.0
    f[2, 64, 64] = -3.0
    f[3, 40, 12] = float("nan")
    fn = twins.damped_inverse_twin if which == "smem" else twins.damped_inverse_blocked_twin
    inv, info = fn(f, 0.0)
    assert info.tolist() == torch.linalg.cholesky_ex(f[:3].double())[1].tolist() + [41]
    assert info.tolist() == [0, 6, 65, 41]
    assert torch.isnan(inv[1:]).all() and torch.isfinite(inv[0]).all()


def test_cholesky_twins_damping_forms_and_unbatched():
    f = spd(3, 9, torch.float64, seed=10)
    ref = torch_inverse(f, 0.3)
    for damping in (0.3, torch.tensor(0.3, dtype=torch.float64),
                    torch.full((3,), 0.3, dtype=torch.float64)):
        for fn in (twins.damped_inverse_twin, twins.damped_inverse_blocked_twin):
            assert rel(fn(f, damping)[0], ref) <= 1e-13
    inv, info = twins.damped_inverse_blocked_twin(f[0], 0.3)
    assert inv.shape == (9, 9) and int(info) == 0
    assert rel(inv, ref[0]) <= 1e-13

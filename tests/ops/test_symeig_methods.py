"""symeig's methods on the CPU (torch backend): "eigh", "auto", the warm-started "refresh" with its
skip test, and the decomposition dispatch policy's candidate lists and fallbacks."""
from __future__ import annotations

import logging

import pytest
import torch

from kfac_kernels import ops
from kfac_kernels.ops import _decomp_policy as policy
from kfac_kernels.ops import reference
from kfac_kernels.ops._registry import BackendUnavailable

from helpers import eig_tol


def spd(bsz, n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, n, 2 * n, generator=g, dtype=torch.float64)
    return (x @ x.transpose(-1, -2) / (2 * n)).to(dtype)


def residual(f, lam, q):
    fd, qd = f.double(), q.double()
    return ((fd @ qd - qd * lam.double().unsqueeze(-2)).flatten(-2).norm(dim=-1)
            / fd.flatten(-2).norm(dim=-1))


def orth_err(q):
    qd = q.double()
    return (qd.transpose(-1, -2) @ qd - torch.eye(q.shape[-1], dtype=torch.float64)).abs().amax()


# ----------------------------------------------------------------------------- methods on torch
@pytest.mark.parametrize("method", ["auto", "eigh"])
def test_eigh_methods_match_linalg(method):
    f = spd(3, 17)
    lam, q, info = ops.symeig(f, method=method, return_info=True)
    ref = torch.linalg.eigvalsh(f)
    assert torch.allclose(lam, ref, rtol=0, atol=1e-12) and info.tolist() == [0, 0, 0]
    assert residual(f, lam, q).max() <= 1e-13


def test_jacobi_is_declined_on_cpu_with_the_reason():
    f = spd(2, 5)
    with pytest.raises(BackendUnavailable, match="torch backend has no Jacobi solver"):
        ops.symeig(f, method="jacobi")
    with pytest.raises(BackendUnavailable, match="torch backend has no Jacobi solver"):
        ops.symeig(f, method="jacobi", backend="torch")


def test_unknown_method_and_missing_prev():
    f = spd(2, 5)
    with pytest.raises(ValueError, match="unknown symeig method"):
        ops.symeig(f, method="qr")
    with pytest.raises(ValueError, match="needs prev_eigenvectors"):
        ops.symeig(f, method="refresh")


def test_direct_methods_accept_and_ignore_iteration_bounds():
    f = spd(2, 6)
    lam, _ = ops.symeig(f, method="eigh", tol=1e-3, max_sweeps=2)
    assert torch.allclose(lam, torch.linalg.eigvalsh(f), atol=1e-12)


def test_nonfinite_matrix_fails_alone():
    f = spd(3, 6)
    f[1, 0, 0] = float("nan")
    lam, q, info = ops.symeig(f, return_info=True)
    assert info.tolist() == [0, 1, 0]
    assert torch.isnan(lam[1]).all() and torch.isnan(q[1]).all()
    assert residual(f[[0, 2]], lam[[0, 2]], q[[0, 2]]).max() <= 1e-13


# ----------------------------------------------------------------------------- refresh
def test_refresh_skips_a_basis_that_still_diagonalises():
    f = spd(2, 12, seed=1)
    lam0, q0 = torch.linalg.eigh(f)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    q_prev = q0[:, :, perm]  # same basis, columns in another order
    lam, q, info, refreshed = reference.refresh_eigh(f, q_prev, skip_tol=1e-8)
    assert refreshed.tolist() == [False, False] and info.tolist() == [0, 0]
    assert torch.equal(q, q0), "a skipped matrix keeps its previous vectors, re-sorted"
    assert torch.allclose(lam, lam0, atol=1e-12)


def test_refresh_recomputes_when_the_factor_moved():
    f = spd(3, 20, seed=2)
    _, q0 = torch.linalg.eigh(f)
    f2 = f + 0.05 * spd(3, 20, seed=3)
    _, ratio = reference.offdiag_ratio(f2, q0)
    assert (ratio > 1e-4).all()
    lam, q, info, refreshed = reference.refresh_eigh(f2, q0)
    assert refreshed.all() and info.tolist() == [0, 0, 0]
    assert residual(f2, lam, q).max() <= 1e-12 and orth_err(q) <= 1e-12
    assert torch.allclose(lam, torch.linalg.eigvalsh(f2), atol=1e-12)


def test_refresh_mixed_batch_and_public_wrapper():
    f = spd(4, 10, seed=4)
    lam0, q0 = torch.linalg.eigh(f)
    f2 = f.clone()
    f2[1] += 0.1 * spd(1, 10, seed=5)[0]
    f2[3] += 0.1 * spd(1, 10, seed=6)[0]
    _, _, _, refreshed = reference.refresh_eigh(f2, q0)
    assert refreshed.tolist() == [False, True, False, True]
    lam, q, info = ops.symeig(f2, method="refresh", prev_eigenvectors=q0, return_info=True)
    assert info.tolist() == [0] * 4
    assert residual(f2, lam, q).max() <= 1e-4  # skipped ones: bounded by skip_tol
    assert residual(f2[[1, 3]], lam[[1, 3]], q[[1, 3]]).max() <= 1e-12
    lam1, q1 = ops.symeig(f2[1], method="refresh", prev_eigenvectors=q0[1])  # unbatched
    assert lam1.shape == (10,) and residual(f2[1:2], lam1[None], q1[None]).max() <= 1e-12


def test_refresh_skip_bound_is_the_residual_bound():
    f = spd(2, 16, seed=7)
    _, q0 = torch.linalg.eigh(f)
    for eps in (1e-6, 1e-5, 1e-3):
        f2 = f + eps * spd(2, 16, seed=8)
        _, ratio = reference.offdiag_ratio(f2, q0)
        lam, q, _, refreshed = reference.refresh_eigh(f2, q0, skip_tol=1e-4)
        assert (residual(f2, lam, q) <= 1e-4).all()
        assert torch.equal(refreshed, ratio > 1e-4)


@pytest.mark.parametrize("orth", ["qr", "cholqr"])
def test_refresh_reorthonormalises_a_drifted_basis(orth):
    f = spd(2, 14, seed=9)
    _, q0 = torch.linalg.eigh(f)
    g = torch.Generator().manual_seed(1)
    drifted = q0 + 1e-3 * torch.randn(q0.shape, generator=g, dtype=torch.float64)
    lam, q, info, refreshed = reference.refresh_eigh(f, drifted, orth=orth)
    assert refreshed.all() and info.tolist() == [0, 0]
    assert orth_err(q) <= 1e-12 and residual(f, lam, q).max() <= 1e-12


def test_refresh_cholqr_falls_back_to_qr_on_singular_factors():
    x = torch.randn(2, 12, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    f = x @ x.transpose(-1, -2)  # rank 4
    _, q0 = torch.linalg.eigh(spd(2, 12, seed=10))
    lam, q, info, _ = reference.refresh_eigh(f, q0, orth="cholqr")
    assert info.tolist() == [0, 0]
    assert orth_err(q) <= 1e-12 and residual(f, lam, q).max() <= 1e-12


def test_refresh_float32_and_nonfinite():
    f = spd(3, 24, torch.float32, seed=11)
    _, q0 = torch.linalg.eigh(f.double())
    f2 = f + 0.01 * spd(3, 24, torch.float32, seed=12)
    f2[2, 3, 3] = float("inf")
    lam, q, info, _ = reference.refresh_eigh(f2, q0.float())
    assert info.tolist() == [0, 0, 1]
    assert torch.isnan(lam[2]).all() and torch.isnan(q[2]).all()
    # a full-size subspace: Rayleigh-Ritz is exact, so only rounding is left, from four
    # backward-stable stages (QR of F Q0, Q1^T F Q1, eigh, Q1 Z): 4 n u each
    bound = eig_tol(24, torch.float32, c=4)
    assert residual(f2[:2], lam[:2], q[:2]).max() <= bound and orth_err(q[:2]) <= bound
    with pytest.raises(ValueError, match="orth must be"):
        reference.refresh_eigh(f, q0.float(), orth="svd", skip_tol=-1.0)


# ----------------------------------------------------------------------------- dispatch policy
def test_policy_candidates():
    assert policy.symeig_candidates(16, 8, "auto", False) == [("cupy", "jacobi"), ("cuda", "jacobi"),
                                                         ("torch", "eigh")]
    assert policy.symeig_candidates(48, 8, "auto", False) == [("cuda", "jacobi"), ("torch", "eigh")]
    assert policy.symeig_candidates(48, 1, "auto", False) == [("torch", "eigh")]
    assert policy.symeig_candidates(129, 8, "auto", False) == [("torch", "eigh")]
    assert policy.symeig_candidates(160, 8, "auto", True) == [("cuda", "jacobi"), ("torch", "eigh")]
    assert policy.symeig_candidates(1024, 8, "auto", True) == [("torch", "eigh")]
    assert policy.symeig_candidates(16, 8, "jacobi", True) == [("cuda", "jacobi")]
    assert policy.symeig_candidates(500, 8, "refresh", True) == [("cuda", "refresh"), ("torch", "refresh")]
    assert policy.symeig_candidates(16, 8, "eigh", False) == [("torch", "eigh")]
    assert policy.damped_inverse_candidates(64, 1) == [("cuda", "smem"), ("torch", None)]
    assert policy.damped_inverse_candidates(160, 1) == [("cuda", "smem"), ("torch", None)]
    assert policy.damped_inverse_candidates(512, 8) == [("cuda", "blocked"), ("torch", None)]
    assert policy.damped_inverse_candidates(512, 2) == [("torch", None)]
    assert policy.damped_inverse_candidates(4096, 64) == [("torch", None)]


def test_policy_falls_back_with_one_log_line(caplog, monkeypatch):
    f = spd(2, 8)
    cands = [("cupy", "jacobi"), ("cuda", "jacobi"), ("torch", "eigh")]
    monkeypatch.setattr(policy._registry, "backend_status",
                        lambda b, refresh=False: (False, f"{b} unavailable in this test"))
    policy._logged.clear()
    with caplog.at_level(logging.WARNING, logger="kfac_kernels"):
        for _ in range(3):
            lam, q = policy.run("symeig", cands, f.device, (f,),
                                dict(prev_eigenvectors=None, return_info=False), "method")
    assert torch.allclose(lam, torch.linalg.eigvalsh(f), atol=1e-12)
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2  # once per unavailable backend, not once per call
    with pytest.raises(BackendUnavailable, match="no backend could run 'symeig'"):
        policy.run("symeig", [("cuda", "jacobi"), ("torch", "jacobi")], f.device, (f,),
                   dict(prev_eigenvectors=None, return_info=False), "method")


def test_damped_inverse_wrapper_cpu_unchanged():
    f = spd(3, 7)
    inv, info = ops.damped_inverse(f, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
                                   return_info=True)
    eye = torch.eye(7, dtype=torch.float64)
    ref = torch.linalg.inv(f + torch.tensor([0.1, 0.2, 0.3]).double().reshape(3, 1, 1) * eye)
    assert torch.allclose(inv, ref, atol=1e-10) and info.tolist() == [0, 0, 0]

"""Decompositions return no NaN for finite input (ops/_fallback.py), and Shampoo / SOAP keep the
previous root or basis when a refresh still fails.

tests/data/eigh_nan_fp32_2x136.pt is a finite, positive semidefinite float32 stack (eigenvalues
-6e-22 to 0.035, from a byte-level GPT's Shampoo factors) for which float32 ``torch.linalg.eigh``
returned NaN on one CPU code path (one thread, Intel Xeon, torch 2.13) and finite values on
another (two threads).
"""
import os

import pytest
import torch

from kfac_kernels import ops
from kfac_kernels.ops import _fallback, _registry
from kfac_kernels.optim import SOAP, Shampoo

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                       "eigh_nan_fp32_2x136.pt")


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _eig_bound(F: torch.Tensor) -> float:
    """Weyl: a backward-stable eigensolver returns the eigenvalues of F + E with
    ||E||_2 <= p(n) u ||F||_2; p(n) = n is a generous polynomial for Householder tridiagonalisation
    (its proven bound is O(n^2) u in the worst case, observed O(sqrt(n)) u)."""
    n = F.shape[-1]
    return n * torch.finfo(F.dtype).eps * torch.linalg.matrix_norm(F.double(), ord=2).max().item()


@pytest.mark.parametrize("num_threads", [1, 2])
def test_fixture_symeig_and_inverse_root_finite(num_threads, threads):
    F = torch.load(FIXTURE)
    torch.set_num_threads(num_threads)
    lam, q, info = ops.symeig(F, return_info=True)
    assert torch.isfinite(lam).all() and torch.isfinite(q).all()
    assert (info == 0).all()
    lam64 = torch.linalg.eigvalsh(F.double())
    assert (lam.double() - lam64).abs().max().item() <= _eig_bound(F)
    # eigenvectors: orthonormal to float32 roundoff (n u, n = 136)
    eye = torch.eye(F.shape[-1], dtype=torch.float64)
    orth = (q.double().mT @ q.double() - eye).abs().max().item()
    assert orth <= F.shape[-1] * torch.finfo(torch.float32).eps
    eps = 1e-6
    P = ops.inverse_root(F, 4, epsilon=eps)
    assert torch.isfinite(P).all()
    # P^4 (F + eps I) = I: the float64 eigenpairs give the exact answer to float64 roundoff; a
    # float32 decomposition (F + E, ||E|| <= bound) moves P^4 (F + eps I) by at most
    # ||E|| / (lambda_min + eps) relative, lambda_min >= 0
    P64 = P.double()
    resid = (P64 @ P64 @ P64 @ P64 @ (F.double() + eps * eye) - eye).abs().max().item()
    assert resid <= 4 * _eig_bound(F) / eps + 4 * F.shape[-1] * torch.finfo(torch.float32).eps


def _nan_first_matrix(real):
    """A backend wrapper whose output for matrix 0 is NaN (as LAPACK's was on the fixture)."""
    def fn(factors, **kw):
        lam, q, info = real(factors, **{**kw, "return_info": True})
        lam, q = lam.clone(), q.clone()
        lam[0] = float("nan")
        q[0] = float("nan")
        return (lam, q, info) if kw.get("return_info") else (lam, q)
    return fn


def _patch_backend(monkeypatch, op, fn):
    """Route ``op``'s torch backend to ``fn`` (the registry caches loaded implementations)."""
    monkeypatch.setitem(_registry._loaded, (op, "torch"), fn)


def test_symeig_repairs_a_failed_matrix_in_float64(monkeypatch):
    torch.manual_seed(0)
    X = torch.randn(3, 9, 5)
    F = X @ X.mT
    calls = []
    from kfac_kernels.ops import reference
    wrapped = _nan_first_matrix(reference.symeig)

    def spy(*a, **k):
        calls.append(1)
        return wrapped(*a, **k)
    _patch_backend(monkeypatch, "symeig", spy)
    before = ops.fallback_counts()["symeig_float64"]
    lam, q, info = ops.symeig(F, return_info=True, backend="torch")
    assert calls, "the patched backend was not called"
    assert torch.isfinite(lam).all() and (info == 0).all()
    assert ops.fallback_counts()["symeig_float64"] == before + 1
    lam64, q64 = torch.linalg.eigh(F.double())
    # matrix 0 came from the float64 retry: float64 eigenvalues rounded to float32
    torch.testing.assert_close(lam[0], lam64[0].float(), rtol=0, atol=0)
    assert (lam[1:].double() - lam64[1:]).abs().max().item() <= _eig_bound(F)


def test_symeig_shift_when_float64_fails_too(monkeypatch):
    torch.manual_seed(1)
    X = torch.randn(2, 6, 6, dtype=torch.float64)
    F = X @ X.mT
    from kfac_kernels.ops import reference
    _patch_backend(monkeypatch, "symeig", _nan_first_matrix(reference.symeig))
    real64 = _fallback._eigh64
    seen = []

    def eigh64(f):
        seen.append(f.clone())
        lam, q = real64(f)
        if len(seen) == 1:                     # the plain float64 retry fails as well
            return torch.full_like(lam, float("nan")), q
        return lam, q
    monkeypatch.setattr(_fallback, "_eigh64", eigh64)
    before = ops.fallback_counts()["symeig_shift"]
    lam, q = ops.symeig(F, backend="torch")
    assert ops.fallback_counts()["symeig_shift"] == before + 1
    assert len(seen) == 2
    c = _fallback._SHIFT * F[0].diagonal().abs().max()
    torch.testing.assert_close(seen[1][0], F[0] + c * torch.eye(6, dtype=F.dtype))
    lam64 = torch.linalg.eigvalsh(F[0])
    # subtracting the shift again costs one rounding of c: |error| <= 2 u c + n u ||F||
    u = torch.finfo(torch.float64).eps
    assert (lam[0] - lam64).abs().max() <= 2 * u * c + 6 * u * torch.linalg.matrix_norm(F[0], 2)
    torch.testing.assert_close(q[0] @ torch.diag(lam[0]) @ q[0].mT, F[0],
                               rtol=0, atol=float(64 * u * torch.linalg.matrix_norm(F[0], 2)))


def test_non_finite_input_still_fails():
    F = torch.eye(4).repeat(2, 1, 1)
    F[1, 0, 0] = float("nan")
    lam, q, info = ops.symeig(F, return_info=True)
    assert torch.isfinite(lam[0]).all() and info[0] == 0
    assert not torch.isfinite(lam[1]).all() and info[1] != 0
    inv, info = ops.damped_inverse(F, 1e-3, return_info=True)
    assert torch.isfinite(inv[0]).all() and info[0] == 0 and info[1] != 0


def test_damped_inverse_retries_in_float64(monkeypatch):
    torch.manual_seed(2)
    X = torch.randn(3, 7, 7)
    F = X @ X.mT
    from kfac_kernels.ops import reference
    real = reference.damped_inverse

    def failing(factors, damping, *, return_info=False):
        inv, info = real(factors, damping, return_info=True)
        if factors.dtype == torch.float32:
            inv, info = inv.clone(), info.clone()
            inv[1] = float("nan")
            info[1] = 3
        return (inv, info) if return_info else inv
    _patch_backend(monkeypatch, "damped_inverse", failing)
    before = ops.fallback_counts()["damped_inverse_float64"]
    inv, info = ops.damped_inverse(F, 0.1, return_info=True, backend="torch")
    assert ops.fallback_counts()["damped_inverse_float64"] == before + 1
    assert (info == 0).all() and torch.isfinite(inv).all()
    ref64 = torch.linalg.inv(F[1].double() + 0.1 * torch.eye(7, dtype=torch.float64))
    torch.testing.assert_close(inv[1], ref64.float(), rtol=0, atol=0)


# ----------------------------------------------------------------- Shampoo / SOAP
def _break_next(monkeypatch, name, count):
    """Make the next ``count`` calls of ops.<name> return NaN (a refresh that fails even after
    the op's own repair, e.g. on a non-finite factor)."""
    real = getattr(ops, name)
    left = [count]

    def fn(*a, **k):
        out = real(*a, **k)
        if left[0] <= 0:
            return out
        left[0] -= 1
        if isinstance(out, tuple):
            return tuple(torch.full_like(t, float("nan")) for t in out)
        return torch.full_like(out, float("nan"))
    monkeypatch.setattr(ops, name, fn)


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _run(opt_cls, model, steps, **kw):
    opt = opt_cls(model.parameters(), **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return opt


def test_shampoo_keeps_previous_root(monkeypatch):
    model = _model()
    opt = _run(Shampoo, model, 2, lr=1e-2, precondition_frequency=1)
    roots = {id(p): opt.state[p]["L_root"].clone() for p in model.parameters() if p.dim() == 2}
    _break_next(monkeypatch, "inverse_root", 1)
    opt2 = opt
    x = torch.randn(16, 6)
    opt2.zero_grad()
    torch.nn.functional.mse_loss(model(x), torch.zeros(16, 3)).backward()
    opt2.step()
    assert opt2.failed_refreshes >= 1 and opt2.stats()["failed_refreshes"] >= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    p0 = [p for p in model.parameters() if p.dim() == 2][0]
    # the failed refresh (the first inverse_root call of the step: L of the first shape group)
    # kept the root of the step before
    assert torch.equal(opt.state[p0]["L_root"], roots[id(p0)])


def test_shampoo_first_refresh_failing_gives_zero_update(monkeypatch):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    _break_next(monkeypatch, "inverse_root", 100)
    opt = _run(Shampoo, model, 1, lr=1e-2, grafting="sgd")
    assert opt.failed_refreshes > 0
    for p, b in zip(model.parameters(), before):
        assert torch.isfinite(p).all()
        if p.dim() == 2:
            assert torch.equal(p, b)


@pytest.mark.parametrize("refresh", ["eigh", "qr"])
def test_soap_keeps_previous_basis(monkeypatch, refresh):
    model = _model()
    opt = _run(SOAP, model, 3, lr=1e-2, precondition_frequency=1, refresh=refresh)
    p0 = [p for p in model.parameters() if p.dim() == 2][0]
    QL = opt.state[p0]["QL"].clone()
    _break_next(monkeypatch, "symeig" if refresh == "eigh" else "eigenbasis_power_step", 1)
    x = torch.randn(16, 6)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), torch.zeros(16, 3)).backward()
    opt.step()
    assert opt.failed_refreshes >= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(opt.state[p0]["QL"], QL)
    assert torch.isfinite(opt.state[p0]["exp_avg"]).all()


def test_soap_first_basis_failing_is_identity(monkeypatch):
    model = _model()
    _break_next(monkeypatch, "symeig", 100)
    opt = _run(SOAP, model, 3, lr=1e-2)
    assert opt.failed_refreshes > 0
    p0 = [p for p in model.parameters() if p.dim() == 2][0]
    eye = torch.eye(opt.state[p0]["QL"].shape[-1])
    assert torch.equal(opt.state[p0]["QL"], eye)
    assert all(torch.isfinite(p).all() for p in model.parameters())

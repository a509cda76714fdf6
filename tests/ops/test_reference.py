"""The pure-torch reference ops against independent float64 computations, and the dispatch
rules of the backend registry."""
import logging

import pytest
import torch
import torch.nn.functional as F

from kfac_kernels import ops
from kfac_kernels.ops import _registry, reference
from helpers import rel_err

D = torch.float64


@pytest.mark.parametrize("hom", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_syrk_and_ema(hom, batched):
    g = torch.Generator().manual_seed(0)
    shape = (3, 33, 7) if batched else (33, 7)
    x = torch.randn(*shape, generator=g, dtype=D)[..., ::1].transpose(-1, -2).contiguous() \
        .transpose(-1, -2)                                              # non-contiguous view
    d = 7 + hom
    f0 = torch.randn(*shape[:-2], d, d, generator=g, dtype=D)
    xb = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=D)], -1) if hom else x
    ref = 0.7 * f0 + 0.3 * (xb.transpose(-1, -2) @ xb) / x.shape[-2]
    out = ops.ema_factor_update(f0.clone(), x, 0.7, homogeneous=hom, backend="torch")
    assert rel_err(out, ref) < 1e-14
    nan = torch.full_like(f0, float("nan"))
    out = ops.syrk_update(nan, x, alpha=2.0, beta=0.0, homogeneous=hom)
    assert torch.equal(out, out.transpose(-1, -2))
    assert rel_err(out, 2 * xb.transpose(-1, -2) @ xb) < 1e-14


@pytest.mark.parametrize("nd,k,s,p,dl", [
    (1, (3,), (2,), (1,), (1,)), (2, (3, 2), (2, 1), (1, 0), (1, 2)), (2, (1, 1), (1, 1), (0, 0), (1, 1)),
    (3, (2, 3, 1), (1, 2, 1), (1, 1, 0), (2, 1, 1))])
def test_conv_patches_match_convolution(nd, k, s, p, dl):
    """patch · w_flat equals the convolution's output at every position (any nd), and for 2-d
    the patches equal F.unfold's."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *([7] * nd), generator=g, dtype=D)
    w = torch.randn(4, 3, *k, generator=g, dtype=D)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    y = conv(x, w, stride=s, padding=p, dilation=dl)                  # [N, 4, *out]
    P = reference.conv_patches(x, k, s, p, dl)                         # [N, T, C*K]
    got = P @ w.reshape(4, -1).T                                       # [N, T, 4]
    assert rel_err(got, y.flatten(2).transpose(1, 2)) < 1e-13
    if nd == 2:
        U = F.unfold(x, k, dilation=dl, padding=p, stride=s).transpose(1, 2)
        assert torch.equal(P, U)
    A = ops.conv_input_factor(x, k, s, p, dl, homogeneous=True)
    Pb = torch.cat([P.reshape(-1, P.shape[-1]), torch.ones(P.shape[0] * P.shape[1], 1, dtype=D)], 1)
    assert rel_err(A, Pb.T @ Pb / Pb.shape[0]) < 1e-13


def test_conv_input_factor_checks():
    with pytest.raises(ValueError, match="smaller than the kernel's span"):
        ops.conv_input_factor(torch.randn(1, 2, 3, 3), 5)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ops.conv_input_factor(torch.randn(1, 2, 5, 5), 3, stride=0)
    with pytest.raises(ValueError, match="kernel_size has 3 entries"):
        ops.conv_input_factor(torch.randn(1, 2, 5, 5), (3, 3, 3))


def spd(n, b, g, cond=100.0):
    q, _ = torch.linalg.qr(torch.randn(b, n, n, generator=g, dtype=D))
    lam = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=D)
    return (q * lam) @ q.transpose(-1, -2)


def test_symeig_and_failure_isolation():
    g = torch.Generator().manual_seed(2)
    F_ = spd(9, 4, g)
    lam, Q, info = ops.symeig(F_, return_info=True)
    assert torch.equal(info, torch.zeros(4, dtype=torch.int32))
    assert rel_err(Q @ torch.diag_embed(lam) @ Q.transpose(-1, -2), F_) < 1e-12
    bad = F_.clone()
    bad[2, 0, 0] = float("nan")
    lam, Q, info = ops.symeig(bad, return_info=True)
    assert info.tolist() == [0, 0, 1, 0]
    assert torch.isfinite(lam[[0, 1, 3]]).all()


def test_damped_inverse_with_per_matrix_damping_and_info():
    g = torch.Generator().manual_seed(3)
    F_ = spd(7, 3, g)
    damp = torch.tensor([0.0, 0.1, 2.0], dtype=D)
    inv, info = ops.damped_inverse(F_, damp, return_info=True)
    ref = torch.linalg.inv(F_ + damp[:, None, None] * torch.eye(7, dtype=D))
    assert rel_err(inv, ref) < 1e-10 and info.tolist() == [0, 0, 0]
    neg = F_.clone()
    neg[1] = -neg[1]
    inv, info = ops.damped_inverse(neg, 0.0, return_info=True)
    assert info[1] > 0 and torch.isnan(inv[1]).all() and torch.isfinite(inv[[0, 2]]).all()
    with pytest.raises(ValueError, match="damping must be"):
        ops.damped_inverse(F_, torch.ones(2, dtype=D))


@pytest.mark.parametrize("batched", [False, True])
def test_kron_precondition_variants_against_dense_solves(batched):
    g = torch.Generator().manual_seed(4)
    B, m, n = 3, 5, 7
    A, G = spd(n, B, g), spd(m, B, g)
    V = torch.randn(B, m, n, generator=g, dtype=D)
    lamA, QA = torch.linalg.eigh(A)
    lamG, QG = torch.linalg.eigh(G)
    gamma = 0.05
    for i in range(B):
        dense = torch.kron(A[i], G[i]) + gamma * torch.eye(m * n, dtype=D)
        want = torch.linalg.solve(dense, V[i].T.reshape(-1)).reshape(n, m).T
        args = (V[i], QG[i], lamG[i], QA[i], lamA[i], gamma)
        if batched:
            args = (V, QG, lamG, QA, lamA, gamma)
        U, dot = ops.kron_precondition_eigen(*args, return_dot=True)
        Ui, doti = (U[i], dot[i]) if batched else (U, dot)
        assert rel_err(Ui, want) < 1e-10
        assert abs(float(doti) - float((want * V[i]).sum())) < 1e-10 * abs(float(doti))
        S = lamG[i, :, None] * lamA[i, None, :]
        Ue = ops.ekfac_precondition(V[i], QG[i], QA[i], S, gamma)
        assert rel_err(Ue, want) < 1e-10
    Gi, Ai = torch.linalg.inv(G), torch.linalg.inv(A)
    U, dot = ops.kron_precondition_inverse(V, Gi, Ai, return_dot=True)
    assert rel_err(U, Gi @ V @ Ai) < 1e-12
    # damping 0 on a singular factor: the null space gets 0 (pseudo-inverse), never inf/NaN
    lamA0 = lamA.clone()
    lamA0[:, 0] = 0.0
    U0 = ops.kron_precondition_eigen(V, QG, lamG, QA, lamA0, 0.0)
    assert torch.isfinite(U0).all()
    assert (U0 @ QA)[:, :, 0].abs().max() < 1e-12 * U0.abs().max()


def test_kron_input_checks():
    V = torch.randn(4, 5)
    with pytest.raises(ValueError, match="QG must be 4 x 4"):
        ops.kron_precondition_eigen(V, torch.eye(5), torch.ones(5), torch.eye(5), torch.ones(5), 0.1)
    with pytest.raises(ValueError, match="lamA has shape"):
        ops.kron_precondition_eigen(V, torch.eye(4), torch.ones(4), torch.eye(5), torch.ones(4), 0.1)
    with pytest.raises(TypeError, match="factor has dtype torch.float16"):
        ops.syrk_update(torch.zeros(3, 3, dtype=torch.float16), V[:, :3], alpha=1.0, beta=0.0)
    with pytest.raises(ValueError, match="x has 5 columns \\(\\+1 homogeneous\\) but factor is 5"):
        ops.syrk_update(torch.zeros(5, 5), V, alpha=1.0, beta=0.0, homogeneous=True)


# ---------------------------------------------------------------------------- registry
def test_registry_explicit_unavailable_raises_and_auto_falls_back(monkeypatch, caplog):
    monkeypatch.setitem(_registry._PROBES, "cupy", "kfac_kernels.ops.reference:_no_such_probe")
    monkeypatch.setitem(_registry._probe_cache, "cupy", (False, "cupy: no CUDA device"))
    monkeypatch.setitem(_registry._IMPLS, "testop", {"torch": "kfac_kernels.ops.reference:symeig",
                                                     "cupy": "nowhere:fn"})
    monkeypatch.setitem(_registry._DEFAULT_AUTO, "cpu", ("cupy", "torch"))
    with pytest.raises(ops.BackendUnavailable, match="cupy: no CUDA device"):
        _registry.call("testop", "cupy", torch.device("cpu"), torch.eye(2))
    with caplog.at_level(logging.WARNING, logger="kfac_kernels"):
        lam, q = _registry.call("testop", "auto", torch.device("cpu"), torch.eye(2))
        _registry.call("testop", "auto", torch.device("cpu"), torch.eye(2))
    assert torch.equal(lam, torch.ones(2))
    assert sum("backend 'cupy' skipped" in r.message for r in caplog.records) == 1


def test_registry_not_supported_moves_on(monkeypatch):
    def picky(x):
        raise ops.NotSupported("odd shapes only")
    import types
    mod = types.ModuleType("picky_mod")
    mod.fn = picky
    monkeypatch.setitem(__import__("sys").modules, "picky_mod", mod)
    monkeypatch.setitem(_registry._IMPLS, "testop2", {"torch": "kfac_kernels.ops.reference:_homogeneous",
                                                      "cuda": "picky_mod:fn"})
    monkeypatch.setitem(_registry._probe_cache, "cuda", (True, "pretend"))
    monkeypatch.setitem(_registry._DEFAULT_AUTO, "cpu", ("cuda", "torch"))
    out = _registry.call("testop2", "auto", torch.device("cpu"), torch.zeros(2, 1))
    assert out.shape == (2, 2)
    with pytest.raises(ops.BackendUnavailable, match="odd shapes only"):
        _registry.call("testop2", "cuda", torch.device("cpu"), torch.zeros(2, 1))

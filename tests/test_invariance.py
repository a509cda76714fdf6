"""Invariance (DESIGN.md §4): a network and its affine reparameterisation, trained by K-FAC with
damping 0 in float64 from equivalent initial points on identical batches, compute the same
function step after step; SGD and Adam on the same pair do not.

Network B inserts fixed (frozen) maps: the data is x' = M0 x + c0; after each nonlinearity an
affine map a' = M a + c; after each trainable layer an invertible map s' = P s that the next op
undoes (P^-1 before the nonlinearity). B's trainable layers start at Wbar' = P Wbar T^-1, where
T = [[M, c], [0, 1]] acts on the homogeneous input abar (for a convolution, M ⊗ I on patches).
"""
import pytest
import torch
import torch.nn as nn

import kfac_kernels as kk

STEPS = 20


def well_conditioned(n, g):
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    d = torch.empty(n, dtype=torch.float64).uniform_(0.5, 2.0, generator=g)
    return q1 @ torch.diag(d) @ q2


def frozen_linear(M, c=None):
    lin = nn.Linear(M.shape[1], M.shape[0], bias=c is not None).double()
    with torch.no_grad():
        lin.weight.copy_(M)
        if c is not None:
            lin.bias.copy_(c)
    lin.requires_grad_(False)
    return lin


def frozen_conv1x1(M, c=None):
    conv = nn.Conv2d(M.shape[1], M.shape[0], 1, bias=c is not None).double()
    with torch.no_grad():
        conv.weight.copy_(M[:, :, None, None])
        if c is not None:
            conv.bias.copy_(c)
    conv.requires_grad_(False)
    return conv


def set_transformed(layer_b, layer_a, P, T):
    """layer_b <- P [W | b] T^-1 (homogeneous input transform T, output transform P)."""
    W = layer_a.weight.detach().reshape(layer_a.weight.shape[0], -1)
    Wbar = torch.cat([W, layer_a.bias.detach()[:, None]], 1)
    Wb = P @ Wbar @ torch.linalg.inv(T)
    with torch.no_grad():
        layer_b.weight.copy_(Wb[:, :-1].reshape(layer_b.weight.shape))
        layer_b.bias.copy_(Wb[:, -1])


def homog(M, c):
    n = M.shape[0]
    T = torch.eye(n + 1, dtype=torch.float64)
    T[:n, :n] = M
    T[:n, n] = c
    return T


def build_mlp_pair(g):
    dims = [6, 8, 7, 4]
    torch.manual_seed(0)
    lin_a = [nn.Linear(dims[i], dims[i + 1]).double() for i in range(3)]
    net_a = nn.Sequential(lin_a[0], nn.Tanh(), lin_a[1], nn.Tanh(), lin_a[2])
    Ms = [well_conditioned(d, g) for d in dims[:3]]
    cs = [torch.randn(d, generator=g, dtype=torch.float64) for d in dims[:3]]
    Ps = [well_conditioned(d, g) for d in dims[1:]]
    lin_b = [nn.Linear(dims[i], dims[i + 1]).double() for i in range(3)]
    for i in range(3):
        set_transformed(lin_b[i], lin_a[i], Ps[i], homog(Ms[i], cs[i]))
    inv = torch.linalg.inv
    net_b = nn.Sequential(
        lin_b[0], frozen_linear(inv(Ps[0])), nn.Tanh(), frozen_linear(Ms[1], cs[1]),
        lin_b[1], frozen_linear(inv(Ps[1])), nn.Tanh(), frozen_linear(Ms[2], cs[2]),
        lin_b[2], frozen_linear(inv(Ps[2])))
    to_b = lambda x: x @ Ms[0].T + cs[0]                                   # noqa: E731
    x = torch.randn(64, dims[0], generator=g, dtype=torch.float64)
    return net_a, net_b, to_b, x


def build_cnn_pair(g):
    torch.manual_seed(0)
    c1a, c2a = nn.Conv2d(2, 4, 3).double(), nn.Conv2d(4, 3, 2, stride=2).double()
    fca = nn.Linear(3 * 2 * 2, 3).double()
    net_a = nn.Sequential(c1a, nn.Tanh(), c2a, nn.Tanh(), nn.Flatten(), fca)
    M0, M1, M2 = (well_conditioned(c, g) for c in (2, 4, 3))
    b0, b1, b2 = (torch.randn(c, generator=g, dtype=torch.float64) for c in (2, 4, 3))
    P1, P2, P3 = (well_conditioned(c, g) for c in (4, 3, 3))
    c1b, c2b = nn.Conv2d(2, 4, 3).double(), nn.Conv2d(4, 3, 2, stride=2).double()
    fcb = nn.Linear(12, 3).double()
    k1, k2, hw = 9, 4, 4
    set_transformed(c1b, c1a, P1, homog(torch.kron(M0, torch.eye(k1, dtype=torch.float64)),
                                        torch.kron(b0, torch.ones(k1, dtype=torch.float64))))
    set_transformed(c2b, c2a, P2, homog(torch.kron(M1, torch.eye(k2, dtype=torch.float64)),
                                        torch.kron(b1, torch.ones(k2, dtype=torch.float64))))
    set_transformed(fcb, fca, P3, homog(torch.kron(M2, torch.eye(hw, dtype=torch.float64)),
                                        torch.kron(b2, torch.ones(hw, dtype=torch.float64))))
    inv = torch.linalg.inv
    net_b = nn.Sequential(
        c1b, frozen_conv1x1(inv(P1)), nn.Tanh(), frozen_conv1x1(M1, b1),
        c2b, frozen_conv1x1(inv(P2)), nn.Tanh(), frozen_conv1x1(M2, b2), nn.Flatten(),
        fcb, frozen_linear(inv(P3)))
    to_b = lambda x: torch.einsum("cd,ndhw->nchw", M0, x) + b0[:, None, None]   # noqa: E731
    x = torch.randn(96, 2, 6, 6, generator=g, dtype=torch.float64)
    return net_a, net_b, to_b, x


def train_pair(builder, make_opt, curvature, steps=STEPS):
    """Train both nets on identical batches; return the max relative output mismatch per step."""
    g = torch.Generator().manual_seed(42)
    net_a, net_b, to_b, x_all = builder(g)
    with torch.no_grad():
        w_true = torch.randn(net_a(x_all[:1]).shape[1], x_all[0].numel(), generator=g,
                             dtype=torch.float64)
        y_all = torch.tanh(x_all.flatten(1) @ w_true.T) + 0.1 * torch.randn(
            x_all.shape[0], w_true.shape[0], generator=g, dtype=torch.float64)
    x_test = x_all[:16]
    with torch.no_grad():
        start = float((net_a(x_test) - net_b(to_b(x_test))).norm() / net_a(x_test).norm())
    assert start < 1e-12, start
    opts = [make_opt(net_a), make_opt(net_b)]
    mismatch = []
    for step in range(steps):
        idx = torch.randperm(x_all.shape[0], generator=g)[:48]
        xb, yb = x_all[idx], y_all[idx]
        for net, opt, inp in ((net_a, opts[0], xb), (net_b, opts[1], to_b(xb))):
            out = net(inp)
            loss = 0.5 * ((out - yb) ** 2).sum(1).mean()
            opt.zero_grad()
            if isinstance(opt, kk.KFAC):
                opt.backward(loss, out)
            else:
                loss.backward()
            opt.step()
        with torch.no_grad():
            oa, ob = net_a(x_test), net_b(to_b(x_test))
            mismatch.append(float((oa - ob).norm() / oa.norm()))
    return mismatch, float(loss.detach())


def kfac(curvature, damping=0.0, **kw):
    return lambda net: kk.KFAC(net, lr=0.05, momentum=0.5, damping=damping, curvature=curvature,
                               likelihood="gaussian", ema_decay=0.9, inverse_every=1, **kw)


@pytest.mark.parametrize("builder", [build_mlp_pair, build_cnn_pair], ids=["mlp", "cnn"])
@pytest.mark.parametrize("curvature", ["empirical", "ggn"])
def test_kfac_is_invariant_with_damping_zero(builder, curvature):
    mismatch, loss = train_pair(builder, kfac(curvature), curvature)
    assert max(mismatch) <= 1e-8, mismatch
    if curvature == "ggn":   # and it trains (first-batch loss is ~1.4 for both nets)
        assert loss < 0.6, loss


@pytest.mark.parametrize("builder", [build_mlp_pair, build_cnn_pair], ids=["mlp", "cnn"])
def test_kfac_invariant_with_cholesky_damping_zero_and_kl_clip(builder):
    mk = lambda net: kk.KFAC(net, lr=0.05, momentum=0.5, damping=0.0, inverse="cholesky",  # noqa
                             damping_mode="pi", curvature="empirical", ema_decay=0.9,
                             inverse_every=1, kl_clip=1e-2)
    mismatch, _ = train_pair(builder, mk, "empirical")
    assert max(mismatch) <= 1e-8, mismatch


@pytest.mark.parametrize("builder", [build_mlp_pair, build_cnn_pair], ids=["mlp", "cnn"])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_first_order_methods_are_not_invariant(builder, name):
    mk = {"sgd": lambda net: torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.5),
          "adam": lambda net: torch.optim.Adam(net.parameters(), lr=1e-2)}[name]
    mismatch, _ = train_pair(builder, mk, None)
    assert mismatch[-1] > 1e-3, mismatch


@pytest.mark.parametrize("builder", [build_mlp_pair, build_cnn_pair], ids=["mlp", "cnn"])
def test_damping_breaks_exact_invariance_and_is_reported(builder, record_property, capsys):
    mismatch, _ = train_pair(builder, kfac("empirical", damping=1e-2), "empirical")
    record_property("mismatch_with_damping_1e-2", max(mismatch))
    with capsys.disabled():
        print(f"\n[{builder.__name__}] K-FAC with damping 1e-2: max relative output mismatch "
              f"over {STEPS} steps = {max(mismatch):.2e} (damping 0 gives <= 1e-8)")
    assert max(mismatch) > 1e-6, mismatch

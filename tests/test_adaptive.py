"""Step control from the quadratic model: exact Gauss-Newton products, the (alpha, mu) solve,
Levenberg-Marquardt damping, the closure API, state round trips and no host sync."""
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.adaptive import StepControl, gauss_newton_gram
from kfac_kernels.engine import KFACWarning
from helpers import host_sync_forbidden, rel_err


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def data(n=24, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    return x, (x[:, :3] - x[:, 1:]).argmax(1)


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def dense_model(model, x, y, wd=0.0):
    """Dense GGN C = J^T H J of the mean cross-entropy, and the gradient g (+ wd theta)."""
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    theta = flat([p.detach() for p in params])
    shapes = [p.shape for p in params]

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            out[n] = v[i:i + k].reshape(s)
            i += k
        return out

    f = lambda v: torch.func.functional_call(model, unflat(v), (x,))          # noqa: E731
    out = f(theta)
    J = torch.autograd.functional.jacobian(f, theta).reshape(out.numel(), -1)
    H = torch.autograd.functional.hessian(
        lambda o: F.cross_entropy(o.reshape(out.shape), y), out.detach().reshape(-1))
    g = torch.autograd.functional.jacobian(lambda v: F.cross_entropy(f(v), y), theta)
    return J.T @ H @ J, g + wd * theta, theta


def closure_for(model, x, y):
    def closure():
        out = model(x)
        return F.cross_entropy(out, y), out
    return closure


# ---------------------------------------------------------------------------- the products
def test_gauss_newton_gram_matches_the_dense_ggn():
    model = mlp()
    x, y = data()
    C, _, _ = dense_model(model, x, y)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(5)
    vs = [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params] for _ in range(2)]
    out = model(x)
    loss = F.cross_entropy(out, y)
    K = gauss_newton_gram(loss, out, params, vs)
    V = torch.stack([flat(v) for v in vs], 1)
    assert rel_err(K, V.T @ C @ V) <= 1e-10


def test_solve_minimises_the_two_by_two_model_and_survives_a_singular_one():
    K = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    a, m = StepControl._solve(K, b, None)
    assert torch.allclose(torch.stack([a, m]), torch.linalg.solve(K, -b), rtol=1e-12)
    a, m = StepControl._solve(K, b, 0.9)                   # momentum fixed: alpha alone
    assert float(m) == 0.9 and abs(float(K[0, 0] * a + K[0, 1] * m + b[0])) < 1e-12
    Ks = torch.tensor([[2.0, 2.0], [2.0, 2.0]], dtype=torch.float64)   # collinear vectors
    a, m = StepControl._solve(Ks, torch.tensor([-1.0, -1.0], dtype=torch.float64), None)
    assert float(m) == 0.0 and float(a) == 0.5


# ---------------------------------------------------------------------------- adaptive lr
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_adaptive_update_is_the_minimiser_of_the_damped_quadratic_model(wd):
    """Step 1: delta = alpha Delta with Delta the K-FAC direction; step 2: delta minimises
    M(delta) = 1/2 delta^T (C + (lambda + wd) I) delta + g^T delta over span(Delta, delta_1),
    i.e. the model's gradient (C + (lambda + wd) I) delta + g is orthogonal to delta and delta_1."""
    lam = 1e-2
    x, y = data()
    kw = dict(damping=lam, weight_decay=wd, curvature="ggn", likelihood="categorical",
              inverse_every=1)
    model, twin = mlp(), mlp()
    opt = kk.KFAC(model, adaptive_lr=True, adaptive_momentum=True, **kw)
    ref = kk.KFAC(twin, lr=1.0, momentum=0.0, **kw)      # its first step is -Delta exactly
    C, g, theta0 = dense_model(model, x, y, wd)
    opt.step(closure_for(model, x, y))
    ref.step(closure_for(twin, x, y))
    delta1 = flat([p.detach() for p in model.parameters()]) - theta0
    Delta = flat([p.detach() for p in twin.parameters()]) - theta0
    alpha = float(opt.control.last["alpha"])
    assert rel_err(delta1, alpha * Delta) <= 1e-10
    Cl = C + (lam + wd) * torch.eye(C.shape[0], dtype=C.dtype)
    assert abs(float(delta1 @ (Cl @ delta1 + g))) <= 1e-10 * float(delta1.norm() * g.norm())

    C, g, theta1 = dense_model(model, x, y, wd)
    opt.step(closure_for(model, x, y))
    delta2 = flat([p.detach() for p in model.parameters()]) - theta1
    assert float(opt.control.last["mu"]) != 0.0
    r = (C + (lam + wd) * torch.eye(C.shape[0], dtype=C.dtype)) @ delta2 + g
    scale = float(r.norm())
    for v in (delta2, delta1):
        assert abs(float(v @ r)) <= 1e-9 * float(v.norm()) * max(scale, float(g.norm()))
    stored = flat([opt.state[p]["kfac_delta"] for p in model.parameters()])
    assert rel_err(stored, delta2) <= 1e-12
    pred = float(opt.control.last["predicted"])
    assert pred < 0 and math.isclose(pred, float(0.5 * delta2 @ (C + (lam + wd) * torch.eye(
        C.shape[0], dtype=C.dtype)) @ delta2 + g @ delta2), rel_tol=1e-9)


def test_adaptive_lr_trains_and_needs_no_host_sync():
    model = mlp(dtype=torch.float32)
    x, y = data(64, dtype=torch.float32)
    opt = kk.KFAC(model, damping=1e-2, curvature="fisher", likelihood="categorical", seed=0,
                  adaptive_lr=True, adaptive_momentum=True, inverse_every=100)
    losses = [float(opt.step(closure_for(model, x, y)))]

    with host_sync_forbidden():
        for _ in range(3):
            opt.step(closure_for(model, x, y))
    for _ in range(15):
        losses.append(float(opt.step(closure_for(model, x, y))))
    assert losses[-1] < 0.3 * losses[0], losses


# ---------------------------------------------------------------------------- LM damping
def linear_problem(seed=0):
    """Least squares: the loss is exactly quadratic, so the model is exact up to its damping."""
    torch.manual_seed(seed)
    lin = nn.Linear(5, 3).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randn(40, 3, generator=g, dtype=torch.float64)

    def closure():
        out = lin(x)
        return 0.5 * ((out - y) ** 2).sum(1).mean(), out
    return lin, closure


def test_levenberg_marquardt_lowers_damping_when_the_model_predicts_well():
    lin, closure = linear_problem()
    lam0, every, decay = 1.0, 2, 0.9
    opt = kk.KFAC(lin, damping=lam0, curvature="ggn", likelihood="gaussian", adaptive_lr=True,
                  adaptive_momentum=True, adaptive_damping=True, damping_adaptation_every=every,
                  damping_adaptation_decay=decay)
    for _ in range(every):
        opt.step(closure)
    (h,) = opt.control.history
    # an exactly quadratic loss: actual / predicted >= 1 (the model's damping term only makes
    # the predicted reduction smaller)
    assert h["step"] == every and h["rho"] >= 1.0, h
    assert math.isclose(opt.damping, lam0 * decay ** every, rel_tol=1e-12)
    for _ in range(60):                       # converged: rho is noise and the damping stays
        opt.step(closure)
    last = opt.control.history[-1]
    assert math.isnan(last["rho"]) and last["damping"] == opt.control.history[-2]["damping"]


def test_levenberg_marquardt_raises_damping_when_steps_overshoot():
    lin, closure = linear_problem(1)
    lam0, every, decay = 1e-3, 2, 0.9
    opt = kk.KFAC(lin, lr=3.0, momentum=0.0, damping=lam0, curvature="ggn",
                  likelihood="gaussian", adaptive_damping=True, damping_adaptation_every=every,
                  damping_adaptation_decay=decay, damping_bounds=(1e-8, 1.0))
    for _ in range(4):
        opt.step(closure)
    hist = opt.control.history
    # lr 3 overshoots an exactly quadratic loss: the model predicts the increase (M > 0)
    assert len(hist) == 2 and all(h["predicted"] > 0 and h["actual"] > 0 for h in hist), hist
    assert math.isclose(opt.damping, lam0 / (decay ** every) ** 2, rel_tol=1e-12)
    lin, closure = linear_problem(1)
    opt = kk.KFAC(lin, lr=3.0, momentum=0.0, damping=lam0, curvature="ggn",
                  likelihood="gaussian", adaptive_damping=True, damping_adaptation_every=every,
                  damping_adaptation_decay=decay, damping_bounds=(1e-8, 2e-3))
    for _ in range(8):      # 1e-3 / 0.81^4 = 2.3e-3
        opt.step(closure)
    assert opt.damping == 2e-3                # clamped at the upper bound


def test_adaptive_damping_alone_keeps_the_fixed_update_rule():
    """Without adaptive_lr the step is the ordinary one (lr, momentum, KL clip) until the
    damping changes."""
    x, y = data()
    kw = dict(lr=0.3, momentum=0.9, damping=1e-2, kl_clip=1e-3, curvature="ggn",
              likelihood="categorical")
    m1, m2 = mlp(), mlp()
    o1 = kk.KFAC(m1, adaptive_damping=True, damping_adaptation_every=3, **kw)
    o2 = kk.KFAC(m2, **kw)
    for _ in range(3):
        o1.step(closure_for(m1, x, y))
        o2.step(closure_for(m2, x, y))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert len(o1.control.history) == 1 and o1.damping != 1e-2


# ---------------------------------------------------------------------------- API, state, faults
def test_closure_api_and_errors():
    model = mlp()
    x, y = data()
    with pytest.raises(ValueError, match="adaptive_momentum=True needs adaptive_lr=True"):
        kk.KFAC(model, adaptive_momentum=True)
    with pytest.raises(ValueError, match="kl_clip and adaptive_lr"):
        kk.KFAC(model, adaptive_lr=True, kl_clip=1e-2)
    with pytest.raises(ValueError, match="GradScaler"):
        kk.KFAC(model, adaptive_damping=True, grad_scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="damping_adaptation_decay"):
        kk.KFAC(model, adaptive_damping=True, damping_adaptation_decay=1.5)
    opt = kk.KFAC(model, adaptive_lr=True)
    with pytest.raises(ValueError, match=r"need opt.step\(closure\)"):
        opt.step()
    with pytest.raises(ValueError, match=r"must return \(loss, out\)"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    # without adaptive options a (loss, out) closure also works: the step runs the backward
    m1, m2 = mlp(), mlp()
    o1 = kk.KFAC(m1, lr=0.1, curvature="ggn", likelihood="categorical")
    o2 = kk.KFAC(m2, lr=0.1, curvature="ggn", likelihood="categorical")
    l1 = o1.step(closure_for(m1, x, y))
    out = m2(x)
    o2.zero_grad()
    o2.backward(F.cross_entropy(out, y), out)
    o2.step()
    assert not l1.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_adaptive_state_round_trip_is_bit_identical():
    x, y = data()
    kw = dict(damping=1e-2, curvature="fisher", likelihood="categorical", seed=3,
              adaptive_lr=True, adaptive_momentum=True, adaptive_damping=True,
              damping_adaptation_every=2, inverse_every=2)
    full = mlp()
    o_full = kk.KFAC(full, **kw)
    for _ in range(6):
        o_full.step(closure_for(full, x, y))
    part = mlp()
    o_part = kk.KFAC(part, **kw)
    for _ in range(3):
        o_part.step(closure_for(part, x, y))
    buf = io.BytesIO()
    torch.save({"m": part.state_dict(), "o": o_part.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    res = mlp(seed=9)
    res.load_state_dict(ck["m"])
    o_res = kk.KFAC(res, **dict(kw, damping=0.5))     # damping comes from the checkpoint
    o_res.load_state_dict(ck["o"])
    assert o_res.damping == o_part.damping != 0.5
    for _ in range(3):
        o_res.step(closure_for(res, x, y))
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), res.parameters()))
    assert o_res.damping == o_full.damping
    assert o_res.control.history == o_full.control.history


def test_adaptive_step_with_nonfinite_gradients_changes_nothing():
    model = mlp()
    x, y = data()
    opt = kk.KFAC(model, damping=1e-2, curvature="empirical", adaptive_lr=True,
                  adaptive_momentum=True)
    opt.step(closure_for(model, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    prev = [opt.state[p]["kfac_delta"].clone() for p in model.parameters()]
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(KFACWarning, match="parameter and factor updates were skipped"):
        opt.step(closure_for(model, bad, y))
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(a, opt.state[p]["kfac_delta"]) for a, p in zip(prev,
                                                                          model.parameters()))
    assert opt.skipped_steps == 1
    opt.step(closure_for(model, x, y))
    assert all(torch.isfinite(p).all() for p in model.parameters())

"""Behaviour of KFAC / KFACPreconditioner: the update rule against dense formulas, exact
identities, training-state round trips, param groups, and the no-host-sync guarantee."""
import contextlib
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from helpers import cuda_sync_forbidden, host_sync_forbidden, rel_err


def colvec(M):
    """Column-major vec (stacks columns)."""
    return M.T.reshape(-1)


def small_mlp(dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias)).to(dtype)


TEACHER = torch.randn(5, 3, generator=torch.Generator().manual_seed(99), dtype=torch.float64)


def batch(n=32, dtype=torch.float64, seed=1):
    """Inputs and learnable labels (a linear teacher)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return x.to(dtype), (x @ TEACHER).argmax(1)


# ---------------------------------------------------------------------------- exact identities
@pytest.mark.parametrize("curvature", ["ggn", "empirical"])
def test_single_example_dense_block_is_kronecker(curvature):
    """For one example, the dense curvature block of a Linear layer equals A ⊗ G (vec order)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    y = torch.tensor([2])
    opt = kk.KFAC(lin, lr=0.0, momentum=0.0, curvature=curvature, likelihood="categorical")
    out = lin(x)
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    opt.backward(loss, out)
    opt.step()

    def f_of_wbar(wbar):
        return torch.cat([x, torch.ones(1, 1, dtype=x.dtype)], 1) @ wbar.T

    wbar = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
    if curvature == "ggn":
        J = torch.autograd.functional.jacobian(f_of_wbar, wbar)[0]          # [3, 3, 5]
        Jv = J.permute(0, 2, 1).reshape(3, -1)                              # column-major vec
        p = torch.softmax(out.detach()[0], 0)
        H = torch.diag(p) - torch.outer(p, p)
        dense = Jv.T @ H @ Jv
    else:
        grad = torch.autograd.functional.jacobian(
            lambda w: F.cross_entropy(f_of_wbar(w), y), wbar)
        dense = torch.outer(colvec(grad), colvec(grad))
    assert rel_err(opt.blocks[""].to_dense(), dense) <= 1e-12


def test_gaussian_ggn_single_linear_layer_solves_least_squares_in_one_step():
    torch.manual_seed(0)
    N, k, m = 50, 4, 3
    x = torch.randn(N, k, dtype=torch.float64)
    y = torch.randn(N, m, dtype=torch.float64)
    lin = nn.Linear(k, m).double()
    opt = kk.KFAC(lin, lr=1.0, momentum=0.0, damping=0.0, curvature="ggn", likelihood="gaussian")
    out = lin(x)
    loss = 0.5 * ((out - y) ** 2).sum(1).mean()
    opt.zero_grad()
    opt.backward(loss, out)
    opt.step()
    X = torch.cat([x, torch.ones(N, 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(X, y).solution.T                                 # [m, k+1]
    got = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
    assert rel_err(got, sol) <= 1e-10


@pytest.mark.parametrize("damping", [1e-3, 0.3])
def test_eigen_damping_update_is_damped_kronecker_solve(damping):
    """inverse="eigh", damping_mode="eigen": vec(U) = (A ⊗ G + damping I)^-1 vec(V)."""
    model = small_mlp()
    x, y = batch()
    opt = kk.KFAC(model, lr=1.0, momentum=0.0, damping=damping, curvature="ggn",
                  likelihood="categorical")
    before = copy.deepcopy(model)
    out = model(x)
    opt.zero_grad()
    opt.backward(F.cross_entropy(out, y), out)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, b in opt.blocks.items():
        V = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][:, None]], 1)
        dense = torch.kron(b.A, b.G) + damping * torch.eye(b.A.shape[0] * b.G.shape[0],
                                                            dtype=torch.float64)
        U = torch.linalg.solve(dense, colvec(V)).reshape(V.shape[1], V.shape[0]).T
        mod_b, mod_a = dict(before.named_modules())[name], dict(model.named_modules())[name]
        delta = torch.cat([mod_b.weight - mod_a.weight, (mod_b.bias - mod_a.bias)[:, None]], 1)
        assert rel_err(delta.detach(), U) <= 1e-10


def test_pi_damping_cholesky_update_and_weight_decay_and_momentum():
    """inverse="cholesky": U = (G + sqrt(g)/pi I)^-1 V (A + pi sqrt(g) I)^-1, V = grad + wd W;
    then heavy-ball momentum on U."""
    model = small_mlp()
    gamma, wd, mom, lr = 1e-2, 1e-2, 0.9, 0.5
    opt = kk.KFAC(model, lr=lr, momentum=mom, weight_decay=wd, damping=gamma, inverse="cholesky",
                  damping_mode="pi", curvature="ggn", likelihood="categorical", inverse_every=1)
    buf = {}
    for step in range(2):
        x, y = batch(seed=step)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = model(x)
        opt.zero_grad()
        opt.backward(F.cross_entropy(out, y), out)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        for name, b in opt.blocks.items():
            W = torch.cat([before[f"{name}.weight"], before[f"{name}.bias"][:, None]], 1)
            V = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][:, None]], 1) + wd * W
            A, G = b.A, b.G
            pi = torch.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
            ea, eg = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(G.shape[0], dtype=G.dtype)
            U = torch.linalg.solve(G + gamma ** 0.5 / pi * eg, V) @ torch.linalg.inv(
                A + pi * gamma ** 0.5 * ea)
            buf[name] = U if name not in buf else mom * buf[name] + U
            now = dict(model.named_modules())[name]
            W_new = torch.cat([now.weight, now.bias[:, None]], 1).detach()
            assert rel_err(W - W_new, lr * buf[name]) <= 1e-10


@pytest.mark.parametrize("clip", [1e-6, 1e3])
def test_kl_clip_scales_the_step(clip):
    """nu = min(1, sqrt(C / (lr^2 sum_b <U_b, V_b>))) multiplies every block's update."""
    model = small_mlp()
    ref = copy.deepcopy(model)
    x, y = batch()
    lr = 0.3
    kw = dict(lr=lr, momentum=0.0, damping=1e-3, curvature="ggn", likelihood="categorical")
    for net, opt in ((model, kk.KFAC(model, kl_clip=clip, **kw)), (ref, kk.KFAC(ref, **kw))):
        start = [p.detach().clone() for p in net.parameters()]
        out = net(x)
        opt.zero_grad()
        opt.backward(F.cross_entropy(out, y), out)
        net.grads = [p.grad.clone() for p in net.parameters()]
        opt.step()
        net.delta = [s - p.detach() for s, p in zip(start, net.parameters())]
    dot = sum(float((d / lr * g).sum()) for d, g in zip(ref.delta, ref.grads))
    nu = min(1.0, (clip / (lr ** 2 * dot)) ** 0.5)
    assert (nu < 1.0) == (clip < 1)
    for a, b in zip(model.delta, ref.delta):
        assert rel_err(a, nu * b) <= 1e-10


# ---------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian", "bernoulli"])
def test_fisher_converges_to_ggn_as_mc_samples_grow(likelihood):
    """For these likelihoods Fisher = GGN: the sampled G approaches the exact one ~ 1/sqrt(S)."""
    torch.manual_seed(0)
    x = torch.randn(64, 5, dtype=torch.float64)
    errs = []
    exact = None
    for curvature, S in [("ggn", 1), ("fisher", 1), ("fisher", 16), ("fisher", 256)]:
        model = small_mlp()
        opt = kk.KFAC(model, lr=0.0, curvature=curvature, likelihood=likelihood, mc_samples=S,
                      seed=3)
        out = model(x)
        opt.zero_grad()
        opt.backward(out.sum(), out)   # the loss itself plays no part in the G of these metrics
        opt.step()
        Gs = [b.G.clone() for b in opt.blocks.values()]
        if exact is None:
            exact = Gs
        else:
            errs.append(max(rel_err(g, e) for g, e in zip(Gs, exact)))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.15, errs


# ---------------------------------------------------------------------------- state
def run_steps(model, opt, steps, start=0, curvature="fisher"):
    for s in range(start, start + steps):
        x, y = batch(seed=100 + s, dtype=next(model.parameters()).dtype)
        out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()


@pytest.mark.parametrize("inverse", ["eigh", "cholesky"])
def test_state_dict_resume_is_bit_identical(inverse):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, damping=1e-2, curvature="fisher",
              likelihood="categorical", inverse=inverse, inverse_every=3, kl_clip=1e-2, seed=5,
              ema_decay=0.9)
    full = small_mlp(torch.float32)
    opt_full = kk.KFAC(full, **kw)
    run_steps(full, opt_full, 8)

    part = small_mlp(torch.float32)
    opt_part = kk.KFAC(part, **kw)
    run_steps(part, opt_part, 4)
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt_part.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = small_mlp(torch.float32, seed=123)      # different init: everything comes from ckpt
    resumed.load_state_dict(ckpt["model"])
    opt_res = kk.KFAC(resumed, **kw)
    opt_res.load_state_dict(ckpt["opt"])
    run_steps(resumed, opt_res, 4, start=4)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for name in opt_full.blocks:
        assert torch.equal(opt_full.blocks[name].A, opt_res.blocks[name].A)


def test_factors_keep_their_dtype_through_load_on_a_bf16_model():
    model = small_mlp(torch.bfloat16)
    opt = kk.KFAC(model, lr=0.01, curvature="empirical")
    run_steps(model, opt, 2)
    sd = opt.state_dict()
    opt2 = kk.KFAC(model, lr=0.01, curvature="empirical")
    opt2.load_state_dict(sd)
    for b in opt2.blocks.values():
        assert b.A.dtype == torch.float32 and b.G.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in b.inverse.values())
    run_steps(model, opt2, 1, start=2)
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())


def test_param_groups_and_lr_scheduler():
    model = small_mlp()
    opt = kk.KFAC(model, params=[{"params": model[0].parameters(), "lr": 0.0},
                                 {"params": model[2].parameters()}], lr=0.1, momentum=0.0,
                  curvature="empirical")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    w0 = model[0].weight.detach().clone()
    deltas = []
    for s in range(3):
        before = model[2].weight.detach().clone()
        run_steps(model, opt, 1, start=s, curvature="empirical")
        deltas.append(float((model[2].weight.detach() - before).norm()))
        sched.step()
    assert torch.equal(model[0].weight.detach(), w0)              # lr 0 group untouched
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert all(d > 0 for d in deltas)


def test_weight_and_bias_in_different_groups_is_an_error():
    model = small_mlp()
    with pytest.raises(ValueError, match="different param groups"):
        kk.KFAC(model, params=[{"params": [model[0].weight, model[2].weight, model[2].bias]},
                               {"params": [model[0].bias]}])


def test_state_dict_from_a_different_model_names_the_mismatch():
    opt = kk.KFAC(small_mlp(), curvature="empirical")
    other = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    opt_other = kk.KFAC(other, curvature="empirical")
    run_steps(other, opt_other, 1, curvature="empirical")
    with pytest.raises(ValueError, match=r"block '0' has shape \(7, 6\) there and \(6, 6\) here"):
        opt.load_state_dict(opt_other.state_dict())
    deeper = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3), nn.Linear(3, 3)).double()
    with pytest.raises(ValueError, match=r"blocks only in the state_dict: \['3'\]"):
        opt.load_state_dict(kk.KFAC(deeper).state_dict())
    with pytest.raises(ValueError, match="no 'kfac' entry"):
        opt.load_state_dict(torch.optim.SGD(small_mlp().parameters(), lr=1).state_dict())


def test_step_with_closure_and_preconditioner_match_kfac():
    """KFACPreconditioner rewrites .grad with the direction KFAC steps along."""
    m1, m2 = small_mlp(), small_mlp()
    x, y = batch()
    opt = kk.KFAC(m1, lr=1.0, momentum=0.0, curvature="ggn", likelihood="categorical")
    pre = kk.KFACPreconditioner(m2, curvature="ggn", likelihood="categorical")
    start = [p.detach().clone() for p in m1.parameters()]

    def closure():
        out = m1(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        opt.backward(loss, out)
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    out = m2(x)
    m2.zero_grad()
    pre.backward(F.cross_entropy(out, y), out)
    pre.step()
    for s, p1, p2 in zip(start, m1.parameters(), m2.parameters()):
        assert rel_err(s - p1.detach(), p2.grad) <= 1e-12


def test_fallback_parameters_are_updated_and_described():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.PReLU(6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = kk.KFAC(model, lr=0.1, momentum=0.0, curvature="empirical", skip=["3"])
    ln_w = model[1].weight.detach().clone()
    out_w = model[3].weight.detach().clone()
    x, y = batch()
    out = model(x)
    opt.zero_grad()
    F.cross_entropy(out, y).backward()
    g_ln, g_out = model[1].weight.grad.clone(), model[3].weight.grad.clone()
    opt.step()
    assert torch.allclose(model[1].weight.detach(), ln_w - 0.1 * g_ln)       # plain SGD
    assert torch.allclose(model[3].weight.detach(), out_w - 0.1 * g_out)
    text = opt.describe()
    assert "1.weight: no block for PReLU" in text
    assert "3.weight: listed in skip=" in text and "3.bias: listed in skip=" in text
    assert set(opt.blocks) == {"0"}


def test_close_removes_hooks():
    model = small_mlp()
    opt = kk.KFAC(model)
    assert any(len(m._forward_hooks) for m in model.modules())
    opt.close()
    assert not any(len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------------------- host sync
def test_step_has_no_host_sync_between_inverse_updates():
    """Outside inverse updates, the factor update (with its NaN guard), preconditioning, KL
    clipping and the parameter update never read a tensor value on the host."""
    model = small_mlp(torch.float32)
    opt = kk.KFAC(model, lr=0.1, curvature="fisher", likelihood="categorical", kl_clip=1e-3,
                  inverse_every=100, seed=1)
    run_steps(model, opt, 1)                       # first step: inverse update (may sync)
    x, y = batch(dtype=torch.float32)

    with host_sync_forbidden():
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
    assert opt.engine.factor_updates == 2


# ---------------------------------------------------------------------------- dtypes / devices
def test_float32_model_trains_and_factors_are_fp32():
    model = small_mlp(torch.float32)
    opt = kk.KFAC(model, lr=0.1, curvature="ggn", likelihood="categorical", damping=1e-2)
    x, y = batch(256, torch.float32)
    losses = []
    for _ in range(15):
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert all(b.A.dtype == torch.float32 for b in opt.blocks.values())


@pytest.mark.gpu
def test_cuda_model_trains_without_sync_in_step():
    model = small_mlp(torch.float32).cuda()
    opt = kk.KFAC(model, lr=0.1, curvature="fisher", likelihood="categorical", kl_clip=1e-2,
                  inverse_every=50)
    x, y = batch(256, torch.float32)
    x, y = x.cuda(), y.cuda()
    for i in range(5):
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        opt.backward(loss, out)
        with (cuda_sync_forbidden() if i > 0 else contextlib.nullcontext()):
            opt.step()
    assert torch.isfinite(loss)


def test_refresh_between_full_decompositions_tracks_the_factors(monkeypatch):
    """full_eigh_every=3: inverse updates 1, 2 of every 3 refresh the previous eigenbasis; the
    resulting basis still diagonalises the current factors."""
    import kfac_kernels.engine as engine_mod
    methods = []
    real = engine_mod.ops.symeig

    def spy(*a, **k):
        methods.append(k.get("method", "full"))
        return real(*a, **k)

    monkeypatch.setattr(engine_mod.ops, "symeig", spy)
    model = small_mlp()
    opt = kk.KFAC(model, lr=0.05, momentum=0.0, curvature="ggn", likelihood="categorical",
                  inverse_every=1, full_eigh_every=3, ema_decay=0.9)
    for s in range(5):
        run_steps(model, opt, 1, start=s)
        for b in opt.blocks.values():
            for which in "AG":
                F_, Q, lam = getattr(b, which), b.inverse["Q" + which], b.inverse["lam" + which]
                resid = (F_ @ Q - Q * lam).norm() / F_.norm()
                assert resid < 1e-3, (s, b.name, which, float(resid))
    assert opt.engine.inverse_updates == 5
    per_update = len(methods) // 5       # one call per size bucket
    assert methods[::per_update] == ["full", "refresh", "refresh", "full", "refresh"]


@pytest.mark.parametrize("warmup,expected", [(True, [1, 2, 3, 4, 5, 5, 5, 5]),
                                             (False, [1, 1, 1, 1, 2, 2, 2, 2])])
def test_inverse_warmup_decomposes_after_every_early_factor_update(warmup, expected):
    """inverse_every=4, factor_every=1: with the warm-up, steps 0-3 each recompute the
    decompositions, then every 4th step; without it only steps 0, 4, ... do."""
    model = small_mlp()
    opt = kk.KFAC(model, lr=0.05, curvature="ggn", likelihood="categorical", inverse_every=4,
                  inverse_warmup=warmup)
    seen = []
    for s in range(8):
        run_steps(model, opt, 1, start=s)
        seen.append(opt.engine.inverse_updates)
    assert seen == expected

"""Mixed precision: bf16/fp16 models, autocast, torch.amp.GradScaler (unscaled gradients and G,
overflowed steps skipped on the device), non-finite gradients, stale captures of skipped steps."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.engine import KFACWarning
from helpers import rel_err


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def data(step, n=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(7))
    return x.to(dtype), (x @ w).argmax(1)


KW = dict(lr=0.05, momentum=0.9, damping=1e-2, inverse_every=2, weight_decay=1e-3)


def plain_step(model, opt, step, nan_at=None):
    x, y = data(step, dtype=next(model.parameters()).dtype)
    if nan_at is not None:
        x[nan_at] = float("nan")
    out = model(x)
    loss = F.cross_entropy(out.float(), y)
    opt.zero_grad()
    opt.backward(loss, out)
    opt.step()
    return loss


def scaled_step(model, opt, scaler, step, unscale_first=False, poison=None):
    x, y = data(step)
    out = model(x)
    loss = F.cross_entropy(out, y)
    if poison == "loss":                        # an overflow in the whole backward pass
        loss = loss * torch.tensor(float("inf"))
    opt.zero_grad()
    opt.backward(scaler.scale(loss), out)
    if poison == "grad":     # one parameter gradient overflows, the captured statistics do not
        model[2].bias.grad[0] = float("inf")
    if unscale_first:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1e6)
    scaler.step(opt)
    scaler.update()


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {n: (b.A.clone(), b.G.clone(), b.count.clone()) for n, b in opt.blocks.items()},
            {k: v["momentum_buffer"].clone() for k, v in opt.state.items()})


# ---------------------------------------------------------------------------- low precision models
def test_autocast_bf16_keeps_fp32_factors_close_to_the_fp32_run():
    ref, low = mlp(), mlp()
    kw = dict(KW, curvature="fisher", likelihood="categorical", seed=3)
    o_ref, o_low = kk.KFAC(ref, **kw), kk.KFAC(low, **kw)
    x, y = data(0)
    for model, opt, ac in ((ref, o_ref, False), (low, o_low, True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            out = model(x)
            loss = F.cross_entropy(out, y)
        assert out.dtype == (torch.bfloat16 if ac else torch.float32)
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
    for name in o_ref.blocks:
        a, b = o_ref.blocks[name], o_low.blocks[name]
        assert b.A.dtype == b.G.dtype == torch.float32
        # docs/math.md (accuracy of the kernel ops): bf16 inputs to fp32 accumulation are within 2e-2 of the fp32 truth
        assert rel_err(b.A, a.A) <= 2e-2 and rel_err(b.G, a.G) <= 2e-2
    for p, q in zip(ref.parameters(), low.parameters()):
        assert rel_err(q.detach(), p.detach()) <= 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_trains_with_fp32_factors(dtype):
    model = mlp(dtype)
    opt = kk.KFAC(model, **dict(KW, lr=0.2), curvature="empirical")
    losses = [float(plain_step(model, opt, 0).detach())]
    for s in range(1, 12):
        losses.append(float(plain_step(model, opt, 0).detach()))
    assert all(b.A.dtype == torch.float32 for b in opt.blocks.values())
    assert all(v.dtype == torch.float32 for b in opt.blocks.values() for v in b.inverse.values())
    assert losses[-1] < 0.7 * losses[0], losses
    assert opt.skipped_steps == 0


# ---------------------------------------------------------------------------- GradScaler
@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("curvature,inverse", [("empirical", "eigh"), ("fisher", "eigh"),
                                               ("empirical", "ekfac")])
def test_grad_scaler_run_matches_the_unscaled_run(curvature, inverse, unscale_first):
    """A power-of-two loss scale is exact: parameters, factors and momentum must match a run
    without scaler, whether or not unscale_ ran before step (and G, and EKFAC's scalings, are
    unscaled by S^2)."""
    kw = dict(KW, curvature=curvature, likelihood="categorical", seed=2, inverse=inverse)
    ref, sc = mlp(), mlp()
    o_ref = kk.KFAC(ref, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    o_sc = kk.KFAC(sc, grad_scaler=scaler, **kw)
    for s in range(5):
        plain_step(ref, o_ref, s)
        scaled_step(sc, o_sc, scaler, s, unscale_first=unscale_first)
    assert float(scaler.get_scale()) > 2.0 ** 12           # it grew: scale changed mid-run
    for p, q in zip(ref.parameters(), sc.parameters()):
        assert rel_err(q.detach(), p.detach()) <= 1e-6
    for name, b in o_ref.blocks.items():
        assert rel_err(o_sc.blocks[name].G, b.G) <= 1e-6
        assert rel_err(o_sc.blocks[name].A, b.A) <= 1e-6
        if inverse == "ekfac":
            assert rel_err(o_sc.blocks[name].inverse["S"], b.inverse["S"]) <= 1e-6


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_overflowed_step_changes_nothing_and_its_statistics_are_discarded(poison):
    # inverse_every=1: a skipped step still counts in the host-side schedule (reading the
    # device flag there would sync), so only an every-step schedule lines up with the reference
    kw = dict(KW, curvature="empirical", inverse_every=1)
    model, ref = mlp(), mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = kk.KFAC(model, grad_scaler=scaler, **kw)
    o_ref = kk.KFAC(ref, **kw)
    for s in range(3):
        scaled_step(model, opt, scaler, s)
        plain_step(ref, o_ref, s)
    before = snapshot(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KFACWarning)    # a scaler skip is routine: no warning
        scaled_step(model, opt, scaler, 99, poison=poison)
    after = snapshot(model, opt)
    assert float(scaler.get_scale()) == 2.0 ** 9         # the scaler saw the overflow
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    for n in before[1]:
        assert all(torch.equal(u, v) for u, v in zip(before[1][n], after[1][n]))
    for k in before[2]:
        assert torch.equal(before[2][k], after[2][k])
    assert opt.skipped_steps == 1
    assert all(int(b.skipped) == 1 for b in opt.blocks.values())
    # the next steps continue as if the overflowed step had never happened
    for s in range(3, 6):
        scaled_step(model, opt, scaler, s)
        plain_step(ref, o_ref, s)
    for p, q in zip(ref.parameters(), model.parameters()):
        assert rel_err(q.detach(), p.detach()) <= 1e-6
    for name, b in o_ref.blocks.items():
        assert rel_err(opt.blocks[name].G, b.G) <= 1e-6


def test_grad_scaler_misuse_is_named():
    scaler = torch.amp.GradScaler("cpu")
    model = mlp()
    opt = kk.KFAC(model, grad_scaler=scaler, **KW)
    x, y = data(0)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match=r"stepped through scaler.step\(opt\)"):
        opt.step()
    # without grad_scaler=, unscale_ before step hides the scale of the captured gradients
    model = mlp()
    opt = kk.KFAC(model, **KW)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="pass grad_scaler=scaler"):
        scaler.step(opt)


def test_preconditioner_with_grad_scaler_matches_unscaled():
    ref, sc = mlp(), mlp()
    p_ref = kk.KFACPreconditioner(ref, damping=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    p_sc = kk.KFACPreconditioner(sc, damping=1e-2, grad_scaler=scaler)
    b_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    b_sc = torch.optim.SGD(sc.parameters(), lr=0.1)
    for s in range(4):
        x, y = data(s)
        b_ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        p_ref.step()
        b_ref.step()
        b_sc.zero_grad()
        scaler.scale(F.cross_entropy(sc(x), y)).backward()
        scaler.unscale_(b_sc)
        p_sc.step()
        scaler.step(b_sc)
        scaler.update()
    for p, q in zip(ref.parameters(), sc.parameters()):
        assert rel_err(q.detach(), p.detach()) <= 1e-6


# ---------------------------------------------------------------------------- non-finite, no scaler
def test_nonfinite_gradients_skip_the_whole_step_and_warn_once():
    model = mlp()
    opt = kk.KFAC(model, **KW, curvature="empirical")
    for s in range(2):
        plain_step(model, opt, s)
    before = snapshot(model, opt)
    with pytest.warns(KFACWarning, match="non-finite gradients or a non-finite preconditioned "
                                         "update; its parameter and factor updates were skipped"):
        plain_step(model, opt, 2, nan_at=5)
    after = snapshot(model, opt)
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    for k in before[2]:
        assert torch.equal(before[2][k], after[2][k])
    for n in before[1]:
        assert all(torch.equal(u, v) for u, v in zip(before[1][n], after[1][n]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KFACWarning)   # once
        plain_step(model, opt, 3, nan_at=0)
    assert opt.skipped_steps == 2
    plain_step(model, opt, 4)
    assert opt.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_nonfinite_false_lets_nan_through():
    model = mlp()
    opt = kk.KFAC(model, **KW, curvature="empirical", skip_nonfinite=False)
    plain_step(model, opt, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KFACWarning)
        plain_step(model, opt, 1, nan_at=3)
    assert not all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("curvature,inverse", [("empirical", "eigh"), ("ggn", "eigh"),
                                               ("ggn", "ekfac")])  # ggn: folded in backward()
@pytest.mark.parametrize("forward_first", [False, True])
def test_statistics_of_a_step_the_loop_skipped_are_dropped(curvature, inverse, forward_first):
    """A loop that skips step() (here: a loss it does not like) must not merge that batch into
    the next factor update; forward-before-zero_grad ordering keeps the new batch's inputs."""
    kw = dict(KW, curvature=curvature, likelihood="categorical", seed=4, inverse_every=1,
              inverse=inverse)
    model, ref = mlp(), mlp()
    opt, o_ref = kk.KFAC(model, **kw), kk.KFAC(ref, **kw)

    def step(m, o, s, take=True):
        x, y = data(s)
        if forward_first:
            out = m(x)
            o.zero_grad()
        else:
            o.zero_grad()
            out = m(x)
        o.backward(F.cross_entropy(out, y), out)
        if take:
            o.step()

    step(model, opt, 0)
    step(ref, o_ref, 0)
    with pytest.warns(KFACWarning, match="step\\(\\) never ran were dropped"):
        step(model, opt, 1, take=False)
        step(model, opt, 2)
    step(ref, o_ref, 2)
    step(model, opt, 3)
    step(ref, o_ref, 3)
    for name, b in o_ref.blocks.items():
        assert torch.equal(opt.blocks[name].A, b.A)
        assert rel_err(opt.blocks[name].G, b.G) <= 1e-12
        if inverse == "ekfac":
            assert rel_err(opt.blocks[name].inverse["S"], b.inverse["S"]) <= 1e-12
    assert len(opt.engine.capture.grads) == 0 and all(
        not opt.engine.capture.of(b).inputs for b in opt.blocks.values())


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("curvature", ["empirical", "fisher"])
def test_cuda_fp16_autocast_with_grad_scaler_trains_without_sync(curvature):
    """fp16 autocast + GradScaler on CUDA: fp32 factors, training progresses, and
    scaler.step(opt) (unscale, overflow check, skip decision, factor update) never syncs."""
    model = mlp().cuda()
    scaler = torch.amp.GradScaler("cuda")
    opt = kk.KFAC(model, grad_scaler=scaler, **dict(KW, lr=0.2), curvature=curvature,
                  likelihood="categorical", inverse_every=50)
    x, y = data(0, n=256)
    x, y = x.cuda(), y.cuda()
    losses = []
    for i in range(20):
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
            loss = F.cross_entropy(out, y)
        opt.zero_grad()
        opt.backward(scaler.scale(loss), out)
        if i > 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        scaler.update()
        losses.append(float(loss))
    assert all(b.A.dtype == torch.float32 for b in opt.blocks.values())
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------------------- bf16 factor storage
def _storage_run(storage, steps, model_fn=mlp, **kw):
    model = model_fn()
    opt = kk.KFAC(model, factor_storage_dtype=storage, **{**KW, **kw})
    for s in range(steps):
        plain_step(model, opt, s)
    return model, opt


def test_bf16_factor_storage_rounds_the_running_average_once_per_update():
    """The running factors are bf16 (half the memory); each update averages in fp32 and rounds
    once, so the first factors are exactly the fp32 run's rounded, and the decompositions stay
    fp32."""
    _, ref = _storage_run(None, 1)
    _, opt = _storage_run(torch.bfloat16, 1)
    for name, b in opt.blocks.items():
        assert b.A.dtype == b.G.dtype == torch.bfloat16 and b.A.element_size() == 2
        assert torch.equal(b.A, ref.blocks[name].A.bfloat16())
        assert torch.equal(b.G, ref.blocks[name].G.bfloat16())
        assert all(v.dtype == torch.float32 for v in b.inverse.values())
    # fixed weights (lr 0): the factors differ by the accumulated rounding only
    _, ref = _storage_run(None, 12, lr=0.0)
    _, opt = _storage_run(torch.bfloat16, 12, lr=0.0)
    for name, b in opt.blocks.items():
        for which in "AG":
            err = rel_err(getattr(b, which).float(), getattr(ref.blocks[name], which))
            assert 1e-5 < err < 1e-2, (name, which, err)    # rounded, and only by bf16's 2^-9
    model_ref, _ = _storage_run(None, 12)
    model, _ = _storage_run(torch.bfloat16, 12)
    for p, q in zip(model.parameters(), model_ref.parameters()):
        assert rel_err(p.detach(), q.detach()) < 5e-2


@pytest.mark.parametrize("inverse", ["eigh", "cholesky", "ekfac"])
def test_bf16_factor_storage_with_embedding_norm_and_stacked_blocks(inverse):
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))
    model, opt = _storage_run(torch.bfloat16, 5, net, inverse=inverse)
    assert {b.A.dtype for b in opt.blocks.values()} == {torch.bfloat16}
    assert opt.engine.inverse_updates == 3
    model_ref, _ = _storage_run(None, 5, net, inverse=inverse)
    for p, q in zip(model.parameters(), model_ref.parameters()):
        assert torch.isfinite(p).all() and rel_err(p.detach(), q.detach()) < 5e-2


def test_bf16_factor_storage_checkpoint_resumes_bit_identically():
    model, opt = _storage_run(torch.bfloat16, 3)
    sd_model = {k: v.clone() for k, v in model.state_dict().items()}
    sd_opt = copy.deepcopy(opt.state_dict())     # state_dict() holds live buffers
    for s in range(3, 6):
        plain_step(model, opt, s)
    model2 = mlp()
    model2.load_state_dict(sd_model)
    opt2 = kk.KFAC(model2, factor_storage_dtype=torch.bfloat16, **KW)
    opt2.load_state_dict(sd_opt)
    assert {b.A.dtype for b in opt2.blocks.values()} == {torch.bfloat16}
    for s in range(3, 6):
        plain_step(model2, opt2, s)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad", [torch.float16, torch.float32, "bf16"])
def test_factor_storage_dtype_rejects_other_values(bad):
    with pytest.raises(ValueError, match="factor_storage_dtype must be None"):
        kk.KFAC(mlp(), factor_storage_dtype=bad)

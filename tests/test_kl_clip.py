"""The KL clip: what it bounds (``kl_clip_mode``), whether lr still sets the step, and how often
it binds (``opt.stats()``, counted on the device)."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from helpers import host_sync_forbidden
from kfac_kernels.health import KFACWarning

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def data(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 6, generator=g)
    return x, (x[:, :3] - x[:, 3:]).argmax(1)


def train(opt, model, steps, start=0, no_sync=False):
    dtype = next(model.parameters()).dtype
    for s in range(start, start + steps):
        x, y = data(s)
        out = model(x.to(dtype))
        opt.zero_grad()
        opt.backward(F.cross_entropy(out, y), out)
        if no_sync:
            with host_sync_forbidden():
                opt.step()
        else:
            opt.step()


def one_step_change(lr, mode, kl_clip, model=None):
    """The parameter change of one step (float64: the change is read off p_new - p_old)."""
    model = copy.deepcopy(model or mlp().double())
    opt = kk.KFAC(model, lr=lr, momentum=0.0, curvature="ggn", likelihood="categorical",
                  kl_clip=kl_clip, kl_clip_mode=mode, inverse_every=1)
    before = [p.detach().clone() for p in model.parameters()]
    train(opt, model, 1)
    return [p.detach() - b for p, b in zip(model.parameters(), before)], opt


def test_step_mode_while_binding_ignores_lr():
    """The historical clip bounds lr^2 <U, V>: once it binds, lr cancels out of the step."""
    d1, o1 = one_step_change(1.0, "step", 1e-8)
    d3, o3 = one_step_change(3.0, "step", 1e-8)
    assert float(o1._last_nu) < 1 and float(o3._last_nu) < 1
    for a, b in zip(d1, d3):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0)


def test_direction_mode_lr_scales_the_step_while_binding():
    d1, o1 = one_step_change(1.0, "direction", 1e-8)
    d3, o3 = one_step_change(3.0, "direction", 1e-8)
    assert float(o1._last_nu) < 1
    torch.testing.assert_close(o1._last_nu, o3._last_nu)     # the factor does not read lr
    for a, b in zip(d1, d3):
        torch.testing.assert_close(b, 3.0 * a, rtol=1e-9, atol=0)


def test_direction_mode_is_the_clipped_direction_times_lr():
    """Step = lr * min(1, sqrt(C / sum <U, V>)) U, U the unclipped direction, in float64."""
    model = mlp().double()
    lr, C = 0.7, 1e-6
    free, _ = one_step_change(lr, "direction", None, model)
    # <U, V> of that unclipped step: U = -change / lr, V the gradient
    m2 = copy.deepcopy(model)
    x, y = data(0)
    F.cross_entropy(m2(x.double()), y).backward()
    dot = sum(float(((-d / lr) * p.grad).sum()) for d, p in zip(free, m2.parameters()))
    nu = min(1.0, math.sqrt(C / dot))
    assert nu < 1
    clipped, opt = one_step_change(lr, "direction", C, model)
    assert math.isclose(float(opt._last_nu), nu, rel_tol=1e-10)
    for a, b in zip(free, clipped):
        torch.testing.assert_close(b, nu * a, rtol=1e-10, atol=0)


def test_a_clip_that_does_not_bind_changes_nothing():
    free, _ = one_step_change(0.3, "direction", None)
    loose, opt = one_step_change(0.3, "direction", 1e6)
    assert float(opt._last_nu) == 1.0
    for a, b in zip(free, loose):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stats_count_the_binding_steps_on_the_device():
    model = mlp()
    opt = kk.KFAC(model, lr=0.1, curvature="ggn", likelihood="categorical", kl_clip=1e-8)
    assert "kl_clip/binds" not in opt.stats()
    train(opt, model, 1)                        # an inverse update reads health on the host
    train(opt, model, 2, start=1, no_sync=True)  # steps without one: no host sync
    with host_sync_forbidden():
        st = opt.stats()
    assert isinstance(st["kl_clip/binds"], torch.Tensor)
    opt.kl_clip = 1e6                              # never binds from here on
    train(opt, model, 2, start=3)
    st = opt.stats(sync=True)
    assert st["kl_clip/steps"] == 5 and st["kl_clip/binds"] == 3
    assert st["kl_clip/bind_fraction"] == pytest.approx(0.6)
    # kept in checkpoints
    opt.close()
    other = kk.KFAC(model, lr=0.1, curvature="ggn", likelihood="categorical", kl_clip=1e6)
    other.load_state_dict(opt.state_dict())
    st2 = other.stats(sync=True)
    assert st2["kl_clip/steps"] == 5 and st2["kl_clip/binds"] == 3


def test_preconditioner_counts_too():
    model = mlp()
    pre = kk.KFACPreconditioner(model, curvature="ggn", likelihood="categorical", kl_clip=1e-8)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(2):
        x, y = data(s)
        out = model(x)
        base.zero_grad()
        pre.backward(F.cross_entropy(out, y), out)
        pre.step()
        base.step()
    st = pre.stats(sync=True)
    assert st["kl_clip/steps"] == 2 and st["kl_clip/binds"] == 2


@pytest.mark.parametrize("mode", ["step", "direction"])
def test_a_clip_binding_on_every_step_of_a_window_warns_in_step_mode(mode, recwarn):
    model = mlp()
    opt = kk.KFAC(model, lr=0.1, curvature="ggn", likelihood="categorical", kl_clip=1e-8,
                  kl_clip_mode=mode)
    opt.clip_count.window = 4
    train(opt, model, 3)
    opt.engine.health.poll()
    assert not [w for w in recwarn if issubclass(w.category, KFACWarning)]
    train(opt, model, 2, start=3)                  # the window closes at step 4
    opt.engine.health.poll()
    hits = [str(w.message) for w in recwarn if issubclass(w.category, KFACWarning)]
    if mode == "step":
        assert len(hits) == 1 and "bound on every one of the last 4 steps" in hits[0]
        assert "kl_clip_mode='direction'" in hits[0]
    else:                                          # lr still sets the step: nothing to say
        assert not hits


def test_kl_clip_mode_is_checked():
    with pytest.raises(ValueError, match="unknown kl_clip_mode 'trust'"):
        kk.KFAC(mlp(), kl_clip=1e-3, kl_clip_mode="trust")

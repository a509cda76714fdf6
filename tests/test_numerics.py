"""K-FAC's own state holds no subnormal numbers (kfac_kernels/_numerics.py).

A classifier driven to zero loss on a repeated batch makes the softmax probabilities of the wrong
classes underflow: the output-gradients then hold subnormal floats, and so would the G factors,
their eigendecompositions and the per-step plans built from them. On CPUs every product with such
a matrix runs many times slower, so K-FAC flushes them to zero in its own state (and leaves the
global floating-point mode alone).
"""
import pytest
import torch
import torch.nn as nn

import kfac_kernels as kk
from kfac_kernels._numerics import flush_subnormals_


def _subnormals(t: torch.Tensor) -> int:
    if not t.is_floating_point():
        return 0
    a = t.abs()
    return int(((a > 0) & (a < torch.finfo(t.dtype).tiny)).sum())


def test_flush_subnormals_only_touches_subnormals():
    tiny = torch.finfo(torch.float32).tiny
    t = torch.tensor([0.0, tiny / 4, -tiny / 2, tiny, -tiny, 1.0, float("nan"), float("inf")])
    flush_subnormals_(t)
    assert t[1] == 0 and t[2] == 0
    assert t[3] == tiny and t[4] == -tiny and t[5] == 1.0
    assert torch.isnan(t[6]) and torch.isinf(t[7])


@pytest.mark.parametrize("inverse", ["eigh", "cholesky"])
def test_state_has_no_subnormals_at_zero_loss(inverse):
    """A ReLU MLP memorising one batch (the setting of the kfac-pytorch comparison, smaller):
    after a dozen steps the loss is 0 in float32 and the middle layer's output-gradients are so
    small that their products, this step's G estimate, hold subnormal numbers. None may reach the
    running factors, the decompositions or the plans."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    kw = dict(lr=0.01, damping=1e-3, kl_clip=1e-3, inverse=inverse, inverse_every=1)
    if inverse == "cholesky":
        kw["damping_mode"] = "pi"
    opt = kk.KFAC(model, **kw)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    grads = []
    model[2].register_full_backward_hook(lambda m, gi, go: grads.append(go[0].detach()))
    seen = 0
    for _ in range(20):
        opt.zero_grad()
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.backward(loss, out)
        g = grads.pop() * x.shape[0]            # per-example output-gradients of layer 2
        seen += _subnormals(g.T @ g / x.shape[0])
        opt.step()
    assert loss.item() == 0.0
    assert seen > 0, "the test did not reach the regime of subnormal G estimates"
    for b in opt.blocks.values():
        for name, t in (("A", b.A), ("G", b.G), *b.inverse.items()):
            assert _subnormals(t) == 0, (b.name, name)
    plans = [g.plan for g in opt.engine.preconditioning.groups if g.plan is not None]
    assert plans or inverse == "cholesky"
    for plan in plans:
        for k in plan._TERMS:
            t = getattr(plan, k)
            if t is not None:
                assert _subnormals(t) == 0, k
    # the global floating-point mode is the user's: subnormal arithmetic still gives subnormals
    tiny = torch.finfo(torch.float32).tiny
    assert (torch.tensor([tiny]) / 4).item() > 0

"""Passes that are not the step's leave K-FAC alone (capture.py, "Passes that are not the step's").

torch.func transforms (per-example gradients, Jacobians, jvp) and torch.autograd.grad probes (a
Hessian-vector product, an input gradient) run on the model between two K-FAC steps, or after the
step's backward and before step(), must neither crash inside the hooks nor enter the factors: the
run with the probe equals the run without it bit for bit (parameters and factors).
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, jacfwd, jacrev, vmap

import kfac_kernels as kk

def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def conv():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3))


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.gn(self.ln(self.fc(x)))
        return self.head(torch.tanh(self.bn(h)))


class Conv1dT(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(2, 4, 3)
        self.t = nn.ConvTranspose1d(4, 2, 2)
        self.head = nn.Linear(2 * 7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.t(torch.tanh(self.c(x)))).flatten(1))


MODELS = {
    "mlp": (mlp, (12, 5)),
    "conv2d": (conv, (12, 2, 4, 4)),
    "norms": (Norms, (12, 5)),
    "conv1d_transpose": (Conv1dT, (12, 2, 8)),
}


def _kwargs(curvature, inverse):
    kw = dict(lr=0.1, damping=1e-2, curvature=curvature, inverse=inverse, seed=0,
              inverse_every=2)
    if curvature != "empirical":
        kw["likelihood"] = "categorical"
    return kw


def _batch(shape, k):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(*shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g)


def _loss(out, y, reduction):
    return nn.functional.cross_entropy(out, y, reduction=reduction)


# ---------------------------------------------------------------- the probes
def per_example_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi[None],))
        return _loss(out, yi[None], "mean")
    was = model.training
    model.eval()              # per-example passes through BatchNorm need its running statistics
    try:
        g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    finally:
        model.train(was)
    assert all(torch.isfinite(v).all() for v in g.values())


def jacobian_of_block(model, x, y):
    name, w = next((n, p) for n, p in model.named_parameters() if p.dim() >= 2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    was = model.training
    model.eval()
    try:
        J = jacrev(lambda v: functional_call(model, ({**params, name: v}, buffers), (x,)))(
            params[name])
        Jf = jacfwd(lambda v: functional_call(model, ({**params, name: v}, buffers), (x[:2],)))(
            params[name])
    finally:
        model.train(was)
    assert J.shape[:2] == (x.shape[0], 3) and torch.isfinite(Jf).all()


def hvp(model, x, y):
    params = [p for p in model.parameters()]
    loss = _loss(model(x), y, "mean")
    gs = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.ones_like(p) for p in params]
    hv = torch.autograd.grad(sum((g * u).sum() for g, u in zip(gs, v)), params)
    assert all(torch.isfinite(h).all() for h in hv)


def input_grad(model, x, y):
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(_loss(model(xr), y, "sum"), xr)
    assert gx.shape == x.shape


PROBES = {"per_example": per_example_grads, "jacobian": jacobian_of_block, "hvp": hvp,
          "input_grad": input_grad}


# ---------------------------------------------------------------- the runs
def _state(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    for b in opt.blocks.values():
        for f in (b.A, b.G):
            if f is not None:
                out.append(f.detach().clone())
    return out


def _train(model, kw, shape, probe=None, where="between", steps=3, reduction="mean"):
    opt = kk.KFAC(model, **kw)
    for k in range(steps):
        x, y = _batch(shape, k)
        if probe is not None and where == "between" and k == 1:
            probe(model, x, y)
        opt.zero_grad()
        out = model(x)
        loss = _loss(out, y, reduction)
        opt.backward(loss, out)
        if probe is not None and where == "before_step" and k == 1:
            probe(model, x, y)
        opt.step()
    state = _state(model, opt)
    opt.close()
    return state


def _same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("curvature", ["empirical", "fisher", "ggn"])
def test_probe_between_steps_changes_nothing(model_name, curvature):
    make, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = make()
    kw = _kwargs(curvature, "eigh")
    ref = _train(copy.deepcopy(model), kw, shape)
    for probe in PROBES.values():
        _same(ref, _train(copy.deepcopy(model), kw, shape, probe, "between"))


@pytest.mark.parametrize("inverse", ["eigh", "cholesky", "ekfac"])
@pytest.mark.parametrize("curvature", ["empirical", "fisher", "ggn"])
@pytest.mark.parametrize("where", ["between", "before_step"])
def test_every_inverse_kind(inverse, curvature, where):
    if inverse == "cholesky":
        kw = _kwargs(curvature, inverse)
        kw["damping_mode"] = "pi"
    else:
        kw = _kwargs(curvature, inverse)
    torch.manual_seed(1)
    model = mlp()
    shape = MODELS["mlp"][1]
    ref = _train(copy.deepcopy(model), kw, shape)
    for probe in PROBES.values():
        _same(ref, _train(copy.deepcopy(model), kw, shape, probe, where))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sum_loss_and_probe_after_backward(reduction):
    torch.manual_seed(2)
    model = Norms()
    kw = _kwargs("empirical", "eigh")
    if reduction == "sum":
        kw["loss_reduction"] = "sum"
    shape = MODELS["norms"][1]
    ref = _train(copy.deepcopy(model), kw, shape, reduction=reduction)
    for probe in PROBES.values():
        got = _train(copy.deepcopy(model), kw, shape, probe, "before_step", reduction=reduction)
        _same(ref, got)


def test_probe_between_micro_batches_keeps_accumulation():
    """Gradient accumulation over two micro-batches with an HVP probe between them gives the
    factors of the accumulation without it."""
    torch.manual_seed(3)
    model = mlp()
    kw = _kwargs("empirical", "eigh")

    def run(with_probe):
        m = copy.deepcopy(model)
        opt = kk.KFAC(m, **kw)
        for k in range(2):
            opt.zero_grad()
            for j in range(2):
                x, y = _batch((6, 5), 10 * k + j)
                out = m(x)
                opt.backward(_loss(out, y, "mean") / 2, out)
                if with_probe and j == 0:
                    hvp(m, x, y)
                    per_example_grads(m, x, y)
            opt.step()
        s = _state(m, opt)
        opt.close()
        return s

    _same(run(False), run(True))


def test_recording_pass_after_autograd_grad_still_counts():
    """A gradient penalty: torch.autograd.grad on the step's own forward pass, then the
    backward pass of loss + penalty. The forward pass is the step's (its outputs got a recording
    backward), so its factors are updated: the same factors as a run whose penalty is computed
    without touching the hooked outputs (detached weights give the same A and G here)."""
    torch.manual_seed(4)
    model = mlp()
    opt = kk.KFAC(model, **_kwargs("empirical", "eigh"))
    x, y = _batch((12, 5), 0)
    opt.zero_grad()
    out = model(x)
    loss = _loss(out, y, "mean")
    gs = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    pen = sum((g ** 2).sum() for g in gs)
    opt.backward(loss + 0.0 * pen, out)
    opt.step()
    assert all(b.A is not None and b.G is not None for b in opt.blocks.values())
    # the same step without the autograd.grad call
    torch.manual_seed(4)
    model2 = mlp()
    opt2 = kk.KFAC(model2, **_kwargs("empirical", "eigh"))
    opt2.zero_grad()
    out2 = model2(x)
    opt2.backward(_loss(out2, y, "mean"), out2)
    opt2.step()
    for b, b2 in zip(opt.blocks.values(), opt2.blocks.values()):
        torch.testing.assert_close(b.A, b2.A, rtol=0, atol=0)
        # the penalty's double backward changes G's rounding only: 4 ulp of fp32 per entry
        scale = b2.G.abs().max()
        assert (b.G - b2.G).abs().max() <= 4 * torch.finfo(torch.float32).eps * scale

"""Every block's A and G against brute-force per-example computations in float64 (<= 1e-10)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.curvature import per_example_loss
from helpers import brute_factors, rel_err, sampled_targets

TOL = 1e-10


def mlp(bias, seq):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)).double()


class CNN(nn.Module):
    def __init__(self, bias):
        super().__init__()
        torch.manual_seed(2)
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias)
        self.c2 = nn.Conv2d(3, 2, 2, dilation=2, padding=1, bias=bias)
        self.fc = nn.Linear(2 * 3 * 3, 3, bias=bias)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.fc(h.flatten(1))


def data(kind, likelihood, n=4):
    g = torch.Generator().manual_seed(3)
    if kind == "mlp":
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        out_shape = (n, 3)
    elif kind == "seq":
        x = torch.randn(n, 3, 5, generator=g, dtype=torch.float64)
        out_shape = (n, 3, 3)
    else:
        x = torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64)
        out_shape = (n, 3)
    if likelihood == "categorical":
        y = torch.randint(0, 3, out_shape[:-1], generator=g)
    elif likelihood == "gaussian":
        y = torch.randn(out_shape, generator=g, dtype=torch.float64)
    else:
        y = torch.bernoulli(torch.full(out_shape, 0.5, dtype=torch.float64), generator=g)
    return x, y


CASES = [(kind, bias, ws) for kind in ("mlp", "seq", "cnn") for bias in (True, False)
         for ws in ("expand", "reduce") if not (kind == "mlp" and ws == "reduce")]


@pytest.mark.parametrize("curvature,likelihood", [
    ("empirical", "categorical"), ("empirical", "gaussian"), ("fisher", "categorical"),
    ("fisher", "gaussian"), ("fisher", "bernoulli"), ("ggn", "categorical"), ("ggn", "gaussian"),
    ("ggn", "bernoulli")])
@pytest.mark.parametrize("kind,bias,ws", CASES)
def test_factors_match_brute_force(kind, bias, ws, curvature, likelihood):
    model = CNN(bias).double() if kind == "cnn" else mlp(bias, kind == "seq")
    x, y = data(kind, likelihood)
    mc = 2 if curvature == "fisher" else 1
    opt = kk.KFAC(model, lr=0.0, momentum=0.0, curvature=curvature, likelihood=likelihood,
                  mc_samples=mc, weight_sharing=ws, seed=7)
    out = model(x)
    loss = per_example_loss(likelihood, out, y).mean()
    targets = sampled_targets(likelihood, out, mc, 7) if curvature == "fisher" else None
    opt.zero_grad()
    opt.backward(loss, out)
    opt.step()
    assert set(opt.blocks) == set(n for n, m in model.named_modules()
                                  if isinstance(m, (nn.Linear, nn.Conv2d)))
    for name, block in opt.blocks.items():
        A, G = brute_factors(model, name, x, y, curvature, likelihood, ws, targets)
        assert block.A.dtype == torch.float64
        assert rel_err(block.A, A) <= TOL, (name, rel_err(block.A, A))
        assert rel_err(block.G, G) <= TOL, (name, rel_err(block.G, G))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_plain_backward_and_loss_reduction(reduction):
    """loss.backward() alone captures the empirical factors; a summed loss's curvature is N
    times the mean loss's (so G scales by N)."""
    model = mlp(True, False)
    x, y = data("mlp", "categorical", n=6)
    opt = kk.KFAC(model, lr=0.0, loss_reduction=reduction)
    per = per_example_loss("categorical", model(x), y)
    (per.mean() if reduction == "mean" else per.sum()).backward()
    opt.step()
    for name, block in opt.blocks.items():
        A, G = brute_factors(model, name, x, y, "empirical", "categorical", "expand")
        scale = 1.0 if reduction == "mean" else x.shape[0]
        assert rel_err(block.A, A) <= TOL
        assert rel_err(block.G, G * scale) <= TOL


def test_running_average_first_estimate_rule():
    """F_k = rho_k F_{k-1} + (1 - rho_k) F_hat_k with rho_k = min(1 - 1/k, decay)."""
    model = mlp(True, False)
    decay = 0.9
    opt = kk.KFAC(model, lr=0.0, momentum=0.0, ema_decay=decay)
    ref = None
    for k in range(1, 6):
        x, y = data("mlp", "categorical", n=5 + k)
        out = model(x)
        loss = per_example_loss("categorical", out, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        # (on a copy: forwards with grad enabled on the model itself would be captured)
        A_hat, _ = brute_factors(copy.deepcopy(model), "0", x, y, "empirical", "categorical",
                                 "expand")
        rho = min(1 - 1 / k, decay)
        ref = A_hat if ref is None else rho * ref + (1 - rho) * A_hat
        assert rel_err(opt.blocks["0"].A, ref) <= TOL


def test_factor_every_skips_capture():
    model = mlp(True, False)
    opt = kk.KFAC(model, lr=0.0, factor_every=3)
    x, y = data("mlp", "categorical")
    seen = []
    for _ in range(7):
        out = model(x)
        opt.zero_grad()
        per_example_loss("categorical", out, y).mean().backward()
        opt.step()
        seen.append(opt.engine.factor_updates)
    assert seen == [1, 1, 1, 2, 2, 2, 3]


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_curvature_passes_after_an_inplace_activation_give_the_layer_output_gradients(curvature):
    """The curvature passes differentiate w.r.t. the captured layer outputs; an in-place
    activation on an output (ReLU(inplace=True) after a Linear) must not turn its gradient into
    the activation's: the factors equal those of the same model with an out-of-place ReLU."""
    def run(inplace):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 4)).double()
        opt = kk.KFACPreconditioner(m, curvature=curvature, likelihood="categorical", seed=0)
        x = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out = m(x)
        opt.backward(F.cross_entropy(out, torch.arange(9) % 4), out)
        opt.step()
        return [(b.A.clone(), b.G.clone()) for b in opt.blocks.values()]
    for (a1, g1), (a2, g2) in zip(run(True), run(False)):
        assert torch.allclose(a1, a2, rtol=1e-12, atol=1e-14)
        assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-14)

"""Transposed convolutions (ConvTransposeBlock): the block is the stride-1 convolution over the
zero-inserted, padded input with the flipped, channel-swapped kernel. Checked independently:
per-example weight gradients from autograd equal the sum over positions of g a^T built from the
captured input, and every factor, EKFAC scaling and update equals that of an nn.Conv*d run on the
equivalent input (whose factors tests/test_factors.py checks against brute force)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.engine import KFACWarning
from kfac_kernels.blocks import ConvTransposeBlock, block_type_for

CASES = [  # (nd, kwargs)
    (1, dict(stride=2, padding=1, output_padding=1)),
    (1, dict(stride=3, padding=0, dilation=2)),
    (2, dict(stride=2, padding=1, output_padding=1)),
    (2, dict(stride=1, padding=2)),
    (2, dict(stride=2, padding=3, dilation=2, output_padding=1, bias=False)),
    (3, dict(stride=2, padding=1)),
]
TCLS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
CCLS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _pair(nd, kw, seed=0):
    """The transposed conv and the plain conv it equals on the prepared input."""
    torch.manual_seed(seed)
    t = TCLS[nd](3, 4, 3, **kw).double()
    c = CCLS[nd](3, 4, 3, dilation=kw.get("dilation", 1), bias=kw.get("bias", True)).double()
    with torch.no_grad():
        c.weight.copy_(t.weight.flip(tuple(range(2, 2 + nd))).transpose(0, 1))
        if t.bias is not None:
            c.bias.copy_(t.bias)
    return t, c


@pytest.mark.parametrize("nd,kw", CASES)
def test_per_example_gradients_are_sums_of_captured_patch_products(nd, kw):
    t, _ = _pair(nd, kw)
    opt = kk.KFAC(nn.Sequential(t))
    b = opt.blocks["0"]
    assert isinstance(b, ConvTransposeBlock) and b.shape == (4, 3 * 3 ** nd + int(t.bias is not None))
    x = torch.randn(2, 3, *([5] * nd), dtype=torch.float64)
    y = t(x)
    xu = b.prepare_input(x, y)
    patches = F.unfold(xu, (3, 3), dilation=kw.get("dilation", 1)).transpose(1, 2) if nd == 2 \
        else kk.ops.reference.conv_patches(xu, b.ks, b.st, (0,) * nd, b.dil)
    g = torch.randn(y.shape, dtype=torch.float64)
    for n in range(2):                       # one example at a time: autograd's gradient
        t.zero_grad()
        (t(x[n:n + 1]) * g[n:n + 1]).sum().backward()
        gn = g[n].reshape(4, -1).T                                   # [T, O]
        want = b.grad_matrix()
        got = gn.T @ patches[n]
        assert (got - want[:, :got.shape[1]]).abs().max() <= 1e-12
        if t.bias is not None:
            assert (gn.sum(0) - want[:, -1]).abs().max() <= 1e-12
    W = b.split(b.grad_matrix())
    assert torch.equal(W[0], t.weight.grad)


@pytest.mark.parametrize("nd,kw", CASES)
@pytest.mark.parametrize("curvature,ws,inverse", [("empirical", "expand", "eigh"),
                                                  ("fisher", "reduce", "eigh"),
                                                  ("fisher", "expand", "ekfac"),
                                                  ("empirical", "expand", "cholesky")])
def test_factors_and_updates_equal_the_equivalent_convolution(nd, kw, curvature, ws, inverse):
    t, c = _pair(nd, kw)
    mt, mc = nn.Sequential(t), nn.Sequential(c)
    opts = [kk.KFAC(m, lr=0.1, momentum=0.5, damping=1e-2, curvature=curvature,
                    likelihood="gaussian", weight_sharing=ws, inverse=inverse, inverse_every=2,
                    weight_decay=1e-3, seed=7) for m in (mt, mc)]   # same Fisher draws
    bt = opts[0].blocks["0"]
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 3, *([5] * nd), generator=g, dtype=torch.float64)
        yt = mt(x)
        xu = bt.prepare_input(x, yt)
        yc = mc(xu)
        assert (yt - yc).abs().max() <= 1e-12 * yt.abs().max()
        target = torch.randn(yt.shape, generator=g, dtype=torch.float64)
        for m, out, opt in ((mt, yt, opts[0]), (mc, yc, opts[1])):
            loss = 0.5 * ((out - target) ** 2).flatten(1).sum(1).mean()
            opt.zero_grad()
            opt.backward(loss, out)
            opt.step()
        a, b = opts[0].blocks["0"], opts[1].blocks["0"]
        assert (a.A - b.A).abs().max() <= 1e-12 * b.A.abs().max()
        assert (a.G - b.G).abs().max() <= 1e-12 * b.G.abs().max()
        if inverse == "ekfac":
            assert (a.inverse["S"] - b.inverse["S"]).abs().max() <= 1e-10 * b.inverse["S"].abs().max()
        assert (a.param_matrix() - b.param_matrix()).abs().max() <= 1e-10 * b.param_matrix().abs().max()


def test_output_size_argument_and_training():
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1)

    class Dec(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4 * 4 * 4)
            self.up = up

        def forward(self, z):
            return self.up(torch.tanh(self.fc(z)).view(-1, 4, 4, 4), output_size=[8, 8])

    model = Dec()
    opt = kk.KFAC(model, lr=0.1, damping=1e-2, kl_clip=1e-2, curvature="ggn",
                  likelihood="gaussian", inverse_every=1)
    assert set(opt.blocks) == {"fc", "up"} and "fallback parameters: none" in opt.describe()
    z = torch.randn(32, 6)
    target = torch.randn(32, 2, 8, 8)
    losses = []
    for _ in range(15):
        out = model(z)
        assert out.shape == (32, 2, 8, 8)
        loss = 0.5 * ((out - target) ** 2).flatten(1).sum(1).mean()
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses


def test_grouped_transposed_convolution_is_left_to_the_fallback_with_the_reason():
    cls, why = block_type_for(nn.ConvTranspose2d(4, 4, 3, groups=2))
    assert cls is None and "groups != 1" in why
    with pytest.warns(KFACWarning, match=r"0.weight \(4, 2, 3, 3\) \(grouped transposed"):
        opt = kk.KFAC(nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2), nn.Flatten(),
                                    nn.Linear(4 * 36, 2)))
    assert "0.weight: grouped transposed convolutions have no block yet" in opt.describe()
    assert copy.deepcopy(opt.blocks["2"]).name == "2"

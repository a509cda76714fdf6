"""K-FAC matrices against curvlinops' KFACLinearOperator (an independent implementation):
Linear, Conv2d and Linear-over-sequence layers, weight_sharing "expand" and "reduce",
curvature "empirical" and "ggn" (curvlinops' EMPIRICAL and TYPE2), batch-mean and summed losses.

Conventions (docs/layers.md): both put the bias last in one [W | b] block with
``separate_weight_and_bias=False`` and use the same expand/reduce definitions. They differ in the
normalisation of a batch-mean loss over sequences: curvlinops averages over all N·T loss terms,
kfac_kernels over the N examples (an example's loss sums over its positions), so curvlinops' G
is ours / T; with summed losses the two agree exactly.

For "ggn" on sequence outputs curvlinops back-propagates, per class c, the c-th Hessian-root
column of all positions at once: a matrix whose outer product is not the per-example Hessian
(it has cross-position blocks). kfac_kernels runs one pass per (position, class) column of a true
square root, the exact GGN of docs/math.md (checked against brute force in test_blocks.py; under
"reduce" the result R J^T H J R^T does not depend on which square root is used). The two coincide
under "expand" when a layer's output at one position affects only that position's loss (the
position-wise model "tokens" below); with attention, or under "reduce" over positions, they differ,
so those are compared for "empirical" (a single backward pass in both).
"""
import pytest
import torch
import torch.nn as nn

import kfac_kernels as kk
from kfac_kernels.curvature import per_example_loss
from helpers import rel_err

curvlinops = pytest.importorskip(
    "curvlinops", reason="curvlinops (the independent K-FAC reference) is not installed")
from curvlinops import KFACLinearOperator  # noqa: E402

D = torch.float64


class Seq(nn.Module):
    """Attention-style sequence model: Linear projections applied at T positions."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        att = (self.q(x) @ self.k(x).transpose(1, 2) / 2.0).softmax(-1)
        return self.head(torch.tanh(x + att @ self.v(x)))                   # [N, T, 3]


class ClassesSecond(nn.Module):
    """curvlinops' CrossEntropyLoss wants classes in dim 1; kfac_kernels in the last dim."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out.movedim(-1, 1) if out.dim() > 2 else out


def build(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(6, 5, generator=g, dtype=D)
    elif kind == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                              nn.Conv2d(3, 2, 2, dilation=2, padding=1), nn.Tanh(), nn.Flatten(),
                              nn.Linear(18, 3))
        x = torch.randn(6, 2, 6, 6, generator=g, dtype=D)
    elif kind == "tokens":       # Linear layers over [N, T, features], positions independent
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(6, 4, 4, generator=g, dtype=D)
    else:
        model = Seq()
        x = torch.randn(6, 4, 4, generator=g, dtype=D)
    model = model.double()
    out = model(x)
    y = torch.randint(0, 3, out.shape[:-1], generator=g)
    return model, x, y


def ours_dense(model, opt):
    """Block-diagonal K-FAC matrix in curvlinops' order: parameters in model order, each
    flattened row-major (ours is column-major vec of [W | b] per block)."""
    mats, order = [], []
    offset = 0
    for name, b in opt.blocks.items():
        out, inn = b.shape
        mats.append(b.to_dense())
        idx = []
        for i in range(out):                       # weight, row-major
            for j in range(inn - 1):
                idx.append(offset + j * out + i)
        for i in range(out):                       # bias
            idx.append(offset + (inn - 1) * out + i)
        order += idx
        offset += out * inn
    dense = torch.block_diag(*mats)
    order = torch.tensor(order)
    return dense[order][:, order]


CASES = [(kind, ws, curv) for kind, ws in [("mlp", "expand"), ("cnn", "expand"), ("cnn", "reduce"),
                                            ("tokens", "expand")]
         for curv in ("empirical", "ggn")] + [("tokens", "reduce", "empirical"),
                                              ("attention", "expand", "empirical"),
                                              ("attention", "reduce", "empirical")]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind,ws,curvature", CASES)
def test_kfac_matches_curvlinops(kind, ws, curvature, reduction):
    model, x, y = build(kind)
    opt = kk.KFAC(model, lr=0.0, momentum=0.0, curvature=curvature, likelihood="categorical",
                  weight_sharing=ws, loss_reduction=reduction)
    out = model(x)
    per = per_example_loss("categorical", out, y)
    opt.zero_grad()
    opt.backward(per.mean() if reduction == "mean" else per.sum(), out)
    opt.step()

    params = [p for p in model.parameters()]
    op = KFACLinearOperator(
        ClassesSecond(model), nn.CrossEntropyLoss(reduction=reduction), params, [(x, y)],
        fisher_type={"empirical": "empirical", "ggn": "type-2"}[curvature], kfac_approx=ws,
        separate_weight_and_bias=False, check_deterministic=False)
    n = sum(p.numel() for p in params)
    theirs = op @ torch.eye(n, dtype=D)
    T = y[0].numel()
    scale = T if reduction == "mean" else 1.0         # curvlinops normalises by N*T loss terms
    assert rel_err(ours_dense(model, opt), theirs * scale) <= 1e-10

"""factor_max_rows (kfac_kernels/factors.py, FactorStatistics.subsample): a factor estimate from
every k-th row, scaled by k. The k offsets partition the rows, so the mean of k consecutive
estimates is the full estimate (checked in float64 against the full syrk, for plain and
homogeneous jobs, rows divisible by k or not); jobs within the limit are untouched; a model
trains with it and equals the run without it when no layer sees more rows than the limit."""
import math

import pytest
import torch
import torch.nn as nn

import kfac_kernels as kk
from kfac_kernels.blocks import SyrkJob
from kfac_kernels.options import resolve
from kfac_kernels.factors import FactorStatistics
from kfac_kernels.health import Health


def _stats(cap):
    model = nn.Linear(3, 2)
    _, opts = resolve("KFAC", (model,), {"factor_max_rows": cap})
    return FactorStatistics(opts, Health(), lambda op: "torch")


@pytest.mark.parametrize("rows,cap", [(12, 4), (10, 4), (7, 3), (5, 5), (9, 1)])
@pytest.mark.parametrize("homogeneous", [False, True])
def test_mean_over_offsets_is_the_full_estimate(rows, cap, homogeneous):
    fs = _stats(cap)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 4, generator=gen, dtype=torch.float64)
    xb = torch.cat([x, torch.ones(rows, 1, dtype=torch.float64)], 1) if homogeneous else x
    full = 0.5 * xb.T @ xb
    k = math.ceil(rows / cap)
    est = []
    for _ in range(k):
        job = fs.subsample(SyrkJob(x, 0.5, homogeneous))
        fs._row_offsets += 1
        assert job.x.shape[0] <= cap
        xs = torch.cat([job.x, torch.ones(job.x.shape[0], 1, dtype=torch.float64)], 1) \
            if homogeneous else job.x
        est.append(job.alpha * xs.T @ xs)
    mean = sum(est) / k
    # k products of at most rows/k+1 terms each: rounding far below 1e-12 of the scale
    torch.testing.assert_close(mean, full, rtol=1e-12, atol=1e-12 * float(full.abs().max()))
    if k > 1:
        assert not torch.allclose(est[0], full)      # one estimate alone is not the full one


def test_jobs_within_the_limit_are_untouched():
    fs = _stats(8)
    job = SyrkJob(torch.randn(8, 3), 1.0, False)
    assert fs.subsample(job) is job
    assert _stats(None).subsample(SyrkJob(torch.randn(100, 3), 1.0, False)).x.shape[0] == 100


def test_refuses_bad_values():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="factor_max_rows"):
            kk.KFAC(nn.Linear(3, 2), factor_max_rows=bad)


class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _train(cap, steps=4):
    torch.manual_seed(0)
    model = Seq().double()
    opt = kk.KFAC(model, lr=0.1, damping=1e-2, loss_reduction="token_mean",
                  factor_max_rows=cap, inverse_every=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 8, 5, generator=gen, dtype=torch.float64)   # 48 rows a step
        out = model(x)
        loss = out.square().mean()
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
    return model, opt


def test_model_with_rows_within_the_limit_is_unchanged():
    m0, _ = _train(None)
    m1, _ = _train(48)
    for p, q in zip(m0.parameters(), m1.parameters()):
        assert torch.equal(p, q)


def test_model_trains_with_subsampled_factors():
    m0, o0 = _train(None)
    m1, o1 = _train(12)         # every 4th row
    for (n, b0), b1 in zip(o0.blocks.items(), o1.blocks.values()):
        assert torch.isfinite(b1.A).all() and torch.isfinite(b1.G).all()
        # a quarter of the rows: the same matrix up to sampling (not equal, same scale)
        assert not torch.equal(b0.A, b1.A)
        r = float(b1.A.diagonal().sum() / b0.A.diagonal().sum())
        assert 0.5 < r < 2.0, (n, r)
    assert all(torch.isfinite(p).all() for p in m1.parameters())

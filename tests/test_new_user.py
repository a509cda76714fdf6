"""What a new user hit in a fresh trial (issue 22), each pinned by a test."""
import pytest
import torch
import torch.nn as nn

import kfac_kernels as kk


@pytest.mark.parametrize("curvature", ["empirical", "fisher"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_batch_is_a_clear_error(curvature, reduction):
    model = nn.Sequential(nn.Linear(4, 3))
    kw = dict(curvature=curvature, loss_reduction=reduction)
    if curvature == "fisher":
        kw["likelihood"] = "categorical"
    opt = kk.KFAC(model, **kw)
    x, y = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    out = model(x)
    loss = nn.functional.cross_entropy(out, y, reduction=reduction)
    with pytest.raises(ValueError, match="empty batch|non-empty batch"):
        opt.backward(loss, out)
        opt.step()
    # the optimiser is usable afterwards
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    opt.zero_grad()
    out = model(x)
    opt.backward(nn.functional.cross_entropy(out, y, reduction=reduction), out)
    opt.step()
    assert all(b.A is not None for b in opt.blocks.values())


def test_model_converted_to_float64_after_construction_gets_float64_factors():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = kk.KFAC(model)
    model.double()
    x = torch.randn(8, 4, dtype=torch.float64)
    out = model(x)
    opt.backward(out.square().mean(), out)
    opt.step()
    for b in opt.blocks.values():
        assert b.A.dtype == b.G.dtype == torch.float64
        assert all(v.dtype == torch.float64 for v in b.inverse.values())
    assert "float64" in opt.describe()


def test_explicit_factor_dtype_is_kept():
    model = nn.Sequential(nn.Linear(4, 3))
    opt = kk.KFAC(model, factor_dtype=torch.float32)
    model.double()
    x = torch.randn(8, 4, dtype=torch.float64)
    out = model(x)
    opt.backward(out.square().mean(), out)
    opt.step()
    assert all(b.A.dtype == torch.float32 for b in opt.blocks.values())

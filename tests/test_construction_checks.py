"""What construction and add_param_group say about parameters without a block (issue 22): a
layer unfrozen after KFAC was built, the bias beside a tied weight, two optimisers on one model."""
import gc
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.health import KFACWarning


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def step(opt, model):
    x = torch.randn(16, 6)
    out = model(x)
    opt.zero_grad()
    opt.backward(F.cross_entropy(out, torch.randint(0, 3, (16,))), out)
    opt.step()


def test_layer_unfrozen_and_added_later_is_warned_with_the_true_reason():
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = kk.KFAC(model, lr=0.1)
    assert set(opt.blocks) == {"2"}
    for p in model[0].parameters():
        p.requires_grad_(True)
    with pytest.warns(KFACWarning, match=r"add_param_group: 1 weight parameter \(0.weight "
                                         r"\(8, 6\)\) takes a plain SGD step.*frozen"):
        opt.add_param_group({"params": list(model[0].parameters())})
    text = opt.describe()
    assert "0.weight: frozen (requires_grad=False) or not in the optimiser when KFAC was built" \
        in text and "0.bias: frozen" in text
    assert "not in a module of the model" not in text
    before = model[0].weight.detach().clone()
    step(opt, model)                                # it trains, by the plain rule
    assert not torch.equal(before, model[0].weight)


def test_add_param_group_outside_the_model_keeps_its_reason():
    model = mlp()
    opt = kk.KFAC(model, lr=0.1)
    extra = nn.Parameter(torch.randn(3, 3))
    with pytest.warns(KFACWarning, match=r"param \(3, 3\)"):
        opt.add_param_group({"params": [extra]})
    assert "param (3, 3): not in a module of the model given to KFAC" in opt.describe()


def test_bias_beside_a_tied_weight_is_not_called_shared():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Linear(5, 2))
    model[2].weight = model[0].weight                 # tied; both biases stay their own
    with pytest.warns(KFACWarning):
        opt = kk.KFAC(model, lr=0.1)
    reasons = {n: r for n, _, r in opt.engine.fallback}
    assert reasons["0.weight"] == "parameter shared with another module (tied weights)"
    for bias in ("0.bias", "2.bias"):
        assert reasons[bias] == ("its module's weight is shared with another module (tied "
                                 "weights), so the module has no block")
    assert "2.bias: parameter shared" not in opt.describe()


def test_two_live_optimisers_on_one_model_warn_and_close_is_the_remedy():
    model = mlp()
    first = kk.KFAC(model, lr=0.1)
    with pytest.warns(KFACWarning, match=r"modules '0', '2' already carry the hooks of another "
                                         r"live K-FAC optimiser.*Call close\(\) on the old"):
        second = kk.KFACPreconditioner(model)
    second.close()
    first.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KFACWarning)
        third = kk.KFAC(model, lr=0.1)                # the others are closed: nothing to say
        del third
        gc.collect()
        fourth = kk.KFAC(model, lr=0.1)               # the third was dropped: nothing either
        step(fourth, model)

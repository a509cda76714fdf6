"""kk.nn.recalibrate_batchnorm: BatchNorm running statistics recomputed for the current weights
(the exact average over the given batches), the model's mode and each layer's momentum kept, and
nothing captured by K-FAC."""
import pytest
import torch
import torch.nn as nn

import kfac_kernels as kk


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 8), nn.BatchNorm1d(8),
                         nn.Linear(8, 3)).double()


def test_statistics_are_the_exact_average_of_the_batches():
    model = _model()
    batches = [torch.randn(6, 2, 5, 5, dtype=torch.float64) for _ in range(3)]
    model.eval()
    assert kk.nn.recalibrate_batchnorm(model, batches) == 3
    assert not model.training
    bn = model[1]
    assert bn.momentum == 0.1 and model[5].momentum == 0.1
    # per batch, the batch mean and the unbiased batch variance of the conv output, averaged
    with torch.no_grad():
        h = [model[0](x) for x in batches]
    mean = torch.stack([t.mean((0, 2, 3)) for t in h]).mean(0)
    var = torch.stack([t.var((0, 2, 3), unbiased=True) for t in h]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == 3


def test_weights_unchanged_and_kfac_captures_nothing():
    model = _model()
    opt = kk.KFAC(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    kk.nn.recalibrate_batchnorm(model, [torch.randn(6, 2, 5, 5, dtype=torch.float64)])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(not opt.engine.capture.of(b).inputs for b in opt.blocks.values())
    opt.close()


def test_custom_forward_and_errors():
    model = _model()
    seen = []
    n = kk.nn.recalibrate_batchnorm(
        model, [(torch.randn(4, 2, 5, 5, dtype=torch.float64), None)],
        forward=lambda m, b: seen.append(m(b[0])))
    assert n == 1 and len(seen) == 1
    with pytest.raises(ValueError, match="no batches"):
        kk.nn.recalibrate_batchnorm(model, [])
    assert kk.nn.recalibrate_batchnorm(nn.Linear(2, 2), [torch.randn(1, 2)]) == 0

"""kfac_kernels/averaging.py: the guarded first-estimate running average (factors, arena, EKFAC)."""
import pytest
import torch

from kfac_kernels.averaging import blend_, first_estimate_weights, running_average_


def _reference(old, hats, oks, ema):
    """The rule in float64, one update at a time: F <- rho F + (1 - rho) F_hat with rho =
    min(1 - 1/k, ema), k the accepted updates so far; a rejected update changes nothing."""
    F, k = old.double().clone(), 0
    for hat, ok in zip(hats, oks):
        if not ok:
            continue
        k += 1
        rho = min(1.0 - 1.0 / k, ema)
        F = rho * F + (1.0 - rho) * hat.double()
    return F, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ema", [0.0, 0.5, 0.95])
def test_running_average_follows_the_rule(dtype, ema):
    g = torch.Generator().manual_seed(0)
    shape = (5, 7)
    old = torch.randn(shape, generator=g, dtype=dtype)
    hats = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(6)]
    oks = [True, False, True, True, False, True]
    hats[1][2, 3] = float("nan")          # a rejected estimate may hold anything
    hats[4][0, 0] = float("inf")
    F, count = old.clone(), torch.zeros((), dtype=dtype)
    for hat, ok in zip(hats, oks):
        before = count
        count = running_average_((F,), (hat.clone(),), torch.tensor(ok), count, ema)
        assert before is not count and float(before) == float(count) - ok   # not modified
    ref, k = _reference(old, hats, oks, ema)
    assert int(count) == k
    # a handful of roundings per update, each at most one unit roundoff of the dtype
    tol = 16 * torch.finfo(dtype).eps * float(ref.abs().max())
    assert float((F.double() - ref).abs().max()) <= tol


def test_first_estimate_replaces_and_rejection_keeps_bits():
    old = torch.randn(4, 3)
    hat = torch.randn(4, 3)
    F = old.clone()
    c = running_average_((F,), (hat.clone(),), torch.tensor(False), torch.zeros(()), 0.9)
    assert torch.equal(F, old) and float(c) == 0.0
    c = running_average_((F,), (hat.clone(),), torch.tensor(True), c, 0.9)
    assert torch.equal(F, hat) and float(c) == 1.0       # rho = 0: the estimate itself


def test_weights_vector_in_place_and_per_block():
    counts = torch.tensor([0.0, 1.0, 4.0, 9.0])
    ok = torch.tensor([True, True, False, True])
    view = counts[2]
    out, keep, fresh = first_estimate_weights(counts, ok, 0.85, in_place=True)
    assert out is counts and torch.equal(counts, torch.tensor([1.0, 2.0, 4.0, 10.0]))
    assert float(view) == 4.0                             # views of the entries follow
    expect = torch.tensor([0.0, 0.5, 1.0, 0.85])          # min(1 - 1/k, 0.85); 1: rejected
    assert torch.allclose(keep, expect, rtol=0, atol=1e-7)
    assert torch.equal(fresh, 1.0 - keep)


def test_blend_narrow_storage_rounds_once():
    """bf16 storage: averaged in the estimate's dtype (fp32) and rounded to bf16 once, so each
    entry is within half a bf16 unit (plus fp32 roundoff) of the exact average."""
    g = torch.Generator().manual_seed(1)
    old = torch.randn(256, generator=g).to(torch.bfloat16)
    hat = torch.randn(256, generator=g)
    before = old.double()
    exact = before * 0.75 + hat.double() * 0.25
    blend_(old, hat.clone(), torch.tensor(0.75), torch.tensor(0.25))
    assert old.dtype == torch.bfloat16
    bound = (0.5 * 2.0 ** -7 * exact.abs()
             + 4 * torch.finfo(torch.float32).eps * (before.abs() + hat.double().abs()))
    assert bool(((old.double() - exact).abs() <= bound).all())

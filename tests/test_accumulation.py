"""Gradient accumulation: k micro-batches (loss scaled so that the summed gradient is the big
batch's), then one ``step()``, give the factors and the update of one step on the concatenated
batch, for every curvature and inverse kind, uneven micro-batches included (float64, 1e-10)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
import kfac_kernels.capture as capture_mod
from dist_scenarios import MixedNet, global_batch

TOL = 1e-10


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _det_vectors(likelihood, out, mc_samples, gen):
    """Deterministic stand-in for the Fisher's sampled targets: a fixed function of each
    example's output, so a micro-batch draws exactly what its rows draw in the big batch."""
    o = out.detach()
    return [torch.tanh(o * (s + 1)) for s in range(mc_samples)]


def _train(model, opt, steps, splits, reduction="mean", idiom="weighted"):
    for step in range(steps):
        x, y = global_batch(step, sum(splits))
        opt.zero_grad()
        off = 0
        for n in splits:
            xb, yb = x[off:off + n], y[off:off + n]
            off += n
            out = model(xb)
            loss = F.cross_entropy(out, yb, reduction=reduction)
            if reduction == "mean":     # each micro-batch's mean, weighted to the big batch's
                loss = loss * (n / sum(splits)) if idiom == "weighted" else loss / len(splits)
            if opt.engine.opts.curvature == "empirical":
                loss.backward()
            else:
                opt.backward(loss, out)
        opt.step()


def _make(curvature, inverse, reduction="mean", **kw):
    torch.manual_seed(0)
    model = MixedNet(7).double()
    if curvature != "empirical":
        kw["likelihood"] = "categorical"
    opt = kk.KFAC(model, lr=0.1, momentum=0.5, weight_decay=1e-3, damping=1e-2,
                  curvature=curvature, inverse=inverse,
                  inverse_every=2, ema_decay=0.9, loss_reduction=reduction, seed=1, **kw)
    return model, opt


def _compare(splits, curvature, inverse, reduction="mean", idiom="weighted", steps=3):
    m1, big = _make(curvature, inverse, reduction)
    _train(m1, big, steps, [sum(splits)], reduction, idiom)
    m2, acc = _make(curvature, inverse, reduction)
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # accumulation is no longer something to warn about
        _train(m2, acc, steps, splits, reduction, idiom)
    ferr = max(max(_rel(acc.blocks[n].A, b.A), _rel(acc.blocks[n].G, b.G))
               for n, b in big.blocks.items())
    perr = max(_rel(p, q) for p, q in zip(m2.parameters(), m1.parameters()))
    serr = 0.0
    if inverse == "ekfac":
        serr = max(_rel(acc.blocks[n].inverse["S"], b.inverse["S"])
                   for n, b in big.blocks.items())
    return ferr, perr, serr


CURVATURES = ["empirical", "ggn", "fisher"]


@pytest.fixture
def deterministic_fisher(monkeypatch):
    monkeypatch.setattr(capture_mod, "sample_vectors", _det_vectors)


@pytest.mark.parametrize("inverse", ["eigh", "cholesky", "ekfac"])
@pytest.mark.parametrize("curvature", CURVATURES)
# more examples than any factor has rows: a rank-deficient factor leaves its null-space basis
# (and EKFAC's scalings in it) to rounding, which no two runs share
@pytest.mark.parametrize("splits", [[30, 30, 30, 30], [40, 40, 40, 17]], ids=["even", "uneven"])
def test_micro_batches_equal_one_step_on_the_concatenated_batch(
        splits, curvature, inverse, deterministic_fisher):
    ferr, perr, serr = _compare(splits, curvature, inverse)
    assert ferr <= TOL and perr <= TOL and serr <= TOL, (ferr, perr, serr)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_the_divide_by_k_idiom_with_even_micro_batches(curvature, deterministic_fisher):
    ferr, perr, _ = _compare([5, 5, 5, 5], curvature, "eigh", idiom="divide")
    assert ferr <= TOL and perr <= TOL, (ferr, perr)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_summed_loss(curvature, deterministic_fisher):
    ferr, perr, _ = _compare([6, 4, 6], curvature, "eigh", reduction="sum")
    assert ferr <= TOL and perr <= TOL, (ferr, perr)


def test_the_fisher_draws_are_real_and_the_scale_is_right():
    """With the real sampler (different draws than the big batch) the accumulated G is an
    estimate of the same matrix: its trace is near the big batch's, not k times or 1/k of it."""
    splits = [64, 64, 64, 64]
    torch.manual_seed(0)
    model_b = MixedNet(7).double()
    big = kk.KFAC(model_b, lr=0.0, curvature="fisher", likelihood="categorical", seed=1,
                  mc_samples=4)
    _train(model_b, big, 1, [256])
    torch.manual_seed(0)
    model_a = MixedNet(7).double()
    acc = kk.KFAC(model_a, lr=0.0, curvature="fisher", likelihood="categorical", seed=2,
                  mc_samples=4)
    _train(model_a, acc, 1, splits)
    for n, b in big.blocks.items():
        ratio = float(acc.blocks[n].G.diagonal(dim1=-2, dim2=-1).sum() / b.G.diagonal(dim1=-2, dim2=-1).sum())
        assert 0.7 < ratio < 1.4, (n, ratio)
        assert _rel(acc.blocks[n].A, b.A) <= TOL


def _one_plain_step(x, y):
    """The reference: the small MLP of the tests below (same seed), one step on (x, y)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = kk.KFAC(model, lr=0.1, curvature="empirical")
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return opt


def test_an_evaluation_pass_after_the_backward_is_left_out_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = kk.KFAC(model, lr=0.1, curvature="empirical")
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(UserWarning, match="without a backward pass"):
        model(torch.randn(3, 5, dtype=torch.float64))         # evaluation, gradients on
        opt.step()
    A = {n: b.A.clone() for n, b in opt.blocks.items()}
    # the factors are those of the training batch alone
    for n, b in _one_plain_step(x, y).blocks.items():
        assert _rel(A[n], b.A) <= TOL


def test_weight_sharing_within_a_micro_batch_stays_weight_sharing(deterministic_fisher):
    """A module called twice in one forward pass (shared weights) is not a micro-batch: only a
    forward pass after the step's backward pass starts one."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    def run(splits):
        torch.manual_seed(0)
        model = Twice().double()
        opt = kk.KFAC(model, lr=0.1, curvature="ggn", likelihood="categorical",
                      inverse_every=1)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(sum(splits), 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (sum(splits),), generator=g)
        opt.zero_grad()
        off = 0
        for n in splits:
            out = model(x[off:off + n])
            opt.backward(F.cross_entropy(out, y[off:off + n]) * (n / sum(splits)), out)
            off += n
        opt.step()
        return model, opt

    m1, big = run([12])
    m2, acc = run([5, 7])
    for n, b in big.blocks.items():
        assert _rel(acc.blocks[n].A, b.A) <= TOL and _rel(acc.blocks[n].G, b.G) <= TOL
    assert max(_rel(p, q) for p, q in zip(m2.parameters(), m1.parameters())) <= TOL


def test_zero_grad_between_micro_batches_drops_the_earlier_ones():
    """A zero_grad between micro-batches means the earlier ones were abandoned (stale)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = kk.KFAC(model, lr=0.1, curvature="empirical")
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x[:4]), y[:4]).backward()
    F.cross_entropy(model(x[4:]), y[4:]).backward()     # accumulated ...
    opt.zero_grad()                                     # ... then abandoned
    out = model(x)
    with pytest.warns(UserWarning, match="never ran"):
        F.cross_entropy(out, y).backward()
    opt.step()
    for n, b in _one_plain_step(x, y).blocks.items():
        assert _rel(opt.blocks[n].A, b.A) <= TOL and _rel(opt.blocks[n].G, b.G) <= TOL


@pytest.mark.parametrize("curvature", CURVATURES)
def test_forward_before_zero_grad_then_micro_batches(curvature, deterministic_fisher):
    """``out = model(x); opt.zero_grad(); backward`` ordering, then more micro-batches: the
    first forward pass belongs to the new step, not to the micro-batches of the last one."""
    splits = [40, 40, 40, 17]

    def run(accumulate):
        model, opt = _make(curvature, "eigh")
        for step in range(3):
            x, y = global_batch(step, sum(splits))
            parts = splits if accumulate else [sum(splits)]
            off = 0
            for i, n in enumerate(parts):
                out = model(x[off:off + n])
                if i == 0:
                    opt.zero_grad()
                loss = F.cross_entropy(out, y[off:off + n]) * (n / sum(splits))
                off += n
                if curvature == "empirical":
                    loss.backward()
                else:
                    opt.backward(loss, out)
            opt.step()
        return model, opt

    (m1, big), (m2, acc) = run(False), run(True)
    for n, b in big.blocks.items():
        assert _rel(acc.blocks[n].A, b.A) <= TOL and _rel(acc.blocks[n].G, b.G) <= TOL
    assert max(_rel(p, q) for p, q in zip(m2.parameters(), m1.parameters())) <= TOL


def test_the_capture_record_holds_the_micro_batch_state_and_is_reset_by_the_step():
    """The per-step buffers live in the block's record (``capture.of(block)``), which only the
    capture writes: after the second micro-batch's backward pass the first one is combined (its
    examples counted, its inputs freed), the second one's inputs are held; step() clears it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    opt = kk.KFAC(model, lr=0.1)
    cap = opt.engine.capture
    blocks = list(opt.blocks.values())
    assert not hasattr(blocks[0], "inputs") and not hasattr(blocks[0], "G_hat")
    opt.zero_grad()
    sizes = (4, 6)
    for n in sizes:
        F.cross_entropy(model(torch.randn(n, 5)), torch.randint(0, 3, (n,))).backward()
    for b in blocks:
        rec = cap.of(b)
        assert rec.examples == sizes[0] and rec.A_acc is not None and rec.G_acc is not None
        assert [x.shape[0] for x in rec.inputs] == [sizes[1]]
        assert rec.call_offset == 1 and rec.at_backward == 1 and rec.captured()
    assert cap.captured_blocks() == blocks
    opt.step()
    for b in blocks:
        rec = cap.of(b)
        assert not rec.captured() and rec.examples == 0 and rec.inputs == []
        assert rec.G_hat is None and rec.A_acc is None and rec.A_ready is None
        assert rec.call_offset == 0 and rec.per_call == {}
        assert b.A is not None and b.count is not None

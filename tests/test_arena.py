"""The flat factor buffers (kfac_kernels/arena.py) against the per-block running average.

From its second factor step on, a model's estimates are written into one buffer and its running
factors live in another; the guarded average is then a fixed number of calls. It must give
exactly what the per-block merge gives on the same estimates (same arithmetic, elementwise), in
every case the per-block path handles: first estimates, non-finite statistics of one block,
a step rejected as a whole, narrower factor storage, a module skipped on some steps (the layout
changes), a checkpoint loaded in the middle of a run, several passes ("ggn").
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.arena import CHUNK, Arena
from kfac_kernels.health import KFACWarning


class Net(nn.Module):
    """Linear layers of repeated shapes (they would share a batched syrk), a grouped conv (a
    stacked factor), a branch used only on some steps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.a = nn.Linear(4 * 5 * 5, 9)
        self.b = nn.Linear(9, 9)
        self.c = nn.Linear(9, 9)
        self.side = nn.Linear(9, 9)
        self.out = nn.Linear(9, 3)
        self.use_side = True

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.conv(x)).flatten(1)))
        h = torch.tanh(self.c(torch.tanh(self.b(h))))
        if self.use_side:
            h = h + self.side(h)
        return self.out(h)


def _run(flat: bool, steps=8, poison=None, reject_at=None, skip_side=(), reload_at=None,
         **kw):
    torch.manual_seed(0)
    model = Net().double()
    opts = dict(lr=0.05, momentum=0.9, damping=1e-2, factor_every=1, inverse_every=3, seed=0,
                curvature="ggn", likelihood="categorical", kl_clip=1e-2)
    opts.update(kw)
    opt = kk.KFAC(model, **opts)
    used = []

    def patch(o):
        eng = o.engine
        if not flat:
            eng.factors.arena.flat_layout = lambda stats: None
        else:
            flat_layout = eng.factors.arena.flat_layout

            def recorded(stats):
                lay = flat_layout(stats)
                used.append(lay is not None)
                return lay
            eng.factors.arena.flat_layout = recorded
        stats_of = eng.comm.factor_statistics

        def statistics(*a, **k):
            stats = stats_of(*a, **k)
            if poison is not None and eng.steps == poison[0]:
                for b, (a_hat, g_hat) in stats.items():
                    if b.name == poison[1]:
                        a_hat.view(-1)[0] = float("nan")       # in place: keeps the arena view
            return stats
        eng.comm.factor_statistics = statistics

    patch(opt)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        if reload_at is not None and step == reload_at:
            state = copy.deepcopy(opt.state_dict())
            opt.close()
            opt = kk.KFAC(model, **opts)
            opt.load_state_dict(state)
            patch(opt)
        x = torch.randn(10, 2, 5, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (10,), generator=g)
        model.use_side = step not in skip_side
        out = model(x)
        loss = F.cross_entropy(out, y)
        if reject_at == step:
            loss = loss * float("inf")
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
    blocks = {b.name: b for b in opt.engine.blocks.values()}
    return model, blocks, used, opt


def _same(flat, blocked):
    (m1, b1, _, _), (m2, b2, _, _) = flat, blocked
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n
    for name in b1:
        for f in ("A", "G", "count", "skipped"):
            x, y = getattr(b1[name], f), getattr(b2[name], f)
            assert (x is None and y is None) or torch.equal(x, y), (name, f)


def test_flat_merge_engages_and_equals_the_per_block_merge():
    flat = _run(True)
    _, blocks, used, opt = flat
    assert used[0] is False and all(used[1:]), used    # the layout is known from step 2 on
    lay = next(iter(opt.engine.factors.arena.layouts.values()))
    base = lay.factors.data_ptr()
    end = base + lay.factors.numel() * lay.factors.element_size()
    for b in blocks.values():        # the running factors are views of the flat buffer
        assert base <= b.A.data_ptr() < end and base <= b.G.data_ptr() < end
    assert lay.factors.shape[1] == CHUNK
    _same(flat, _run(False))


def test_non_finite_statistics_of_one_block_skip_only_that_block():
    with pytest.warns(KFACWarning, match="non-finite"):
        flat = _run(True, poison=(4, "b"))
    blocked = _run(False, poison=(4, "b"))
    _same(flat, blocked)
    blocks = flat[1]
    assert int(blocks["b"].skipped) == 1 and int(blocks["c"].skipped) == 0
    assert int(blocks["b"].count) == int(blocks["c"].count) - 1


def test_a_rejected_step_is_skipped_by_every_block():
    flat = _run(True, reject_at=3)
    _same(flat, _run(False, reject_at=3))
    assert all(int(b.skipped) == 1 for b in flat[1].values())


def test_narrower_storage():
    flat = _run(True, factor_storage_dtype=torch.bfloat16)
    _same(flat, _run(False, factor_storage_dtype=torch.bfloat16))
    assert all(b.A.dtype == torch.bfloat16 for b in flat[1].values())


def test_a_module_skipped_on_some_steps_changes_the_layout():
    flat = _run(True, steps=10, skip_side=(3, 4, 7))
    used = flat[2]
    # a step that asks for another set of regions than the step before falls back (3: without
    # the side branch, 5: with it again, 7, 8) and lays the buffers out anew for the next one
    assert used == [False, True, True, False, True, False, True, False, False, True], used
    _same(flat, _run(False, steps=10, skip_side=(3, 4, 7)))


def test_a_checkpoint_loaded_mid_run_is_copied_into_the_buffer():
    flat = _run(True, reload_at=4)
    _same(flat, _run(False, reload_at=4))
    _same(flat, _run(True))     # and the run continues as if never interrupted


def test_factors_every_few_steps_free_the_estimate_buffer_in_between():
    flat = _run(True, steps=9, factor_every=2)
    _, _, used, opt = flat
    assert len(used) == 5 and used[0] is False and all(used[1:]), used
    lay = next(iter(opt.engine.factors.arena.layouts.values()))
    assert lay.buffer is None and lay.factors is not None    # estimates freed, factors kept
    _same(flat, _run(False, steps=9, factor_every=2))


@pytest.mark.parametrize("curvature", ["fisher", "empirical"])
def test_other_metrics(curvature):
    kw = dict(curvature=curvature, likelihood=None if curvature == "empirical" else
              "categorical")
    flat = _run(True, **kw)
    assert all(flat[2][1:])
    _same(flat, _run(False, **kw))


def test_a_region_is_handed_out_once_per_step():
    arena = Arena()
    key, shape = ("A_hat", "blk"), torch.Size([3, 3])
    assert arena.take(key, shape, torch.float32, torch.device("cpu")) is None   # no layout yet
    arena.release()
    v = arena.take(key, shape, torch.float32, torch.device("cpu"))
    assert v is not None and v.shape == shape
    # a second request before the step ends gets nothing (the caller allocates): no aliasing
    assert arena.take(key, shape, torch.float32, torch.device("cpu")) is None
    arena.release()
    assert arena.take(key, shape, torch.float32, torch.device("cpu")) is v
    # another shape for the same key is not served from the old region
    assert arena.take(("G_hat", "blk"), torch.Size([2]), torch.float32,
                      torch.device("cpu")) is None

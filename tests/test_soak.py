"""Nothing leaks across steps: captured state, optimiser state and live tensors stay flat.

The default suite runs 200 steps; ``python -m pytest -m soak`` runs 10,000 and also watches the
process's resident memory. Every path that keeps state is exercised: factor and inverse updates,
the GradScaler (including overflowed steps), non-finite gradients, and steps the loop skips.
"""
import gc
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.engine import KFACWarning


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model: one intra-op thread avoids OpenMP spin-waits on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():    # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def captured_sizes(opt) -> dict:
    eng = opt.engine
    recs = [eng.capture.of(b) for b in eng.blocks.values()]
    return {"inputs": sum(len(r.inputs) for r in recs),
            "grads": sum(len(v) for v in eng.capture.grads.values()),
            "grad_keys": len(eng.capture.grads),
            "hats": sum((r.G_hat is not None) + (r.A_ready is not None)
                        + (r.A_acc is not None) + (r.G_acc is not None) for r in recs),
            "deferred": len(eng.health),
            "state": len(opt.state), "groups": len(eng.preconditioning.groups),
            "hooks": sum(len(m._forward_hooks) for m in opt.model_modules)}


def state_bytes(opt) -> int:
    eng = opt.engine
    n = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
            if isinstance(t, torch.Tensor))
    for b in eng.blocks.values():
        n += sum(t.numel() * t.element_size() for t in (b.A, b.G) if t is not None)
        n += sum(t.numel() * t.element_size() for t in b.inverse.values())
    return n


def run(steps, check_every, on_check):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=25)
    opt = kk.KFAC(model, lr=0.05, momentum=0.9, damping=1e-2, curvature="fisher",
                  likelihood="categorical", kl_clip=1e-2, inverse_every=10, grad_scaler=scaler,
                  seed=0)
    opt.model_modules = list(model.modules())
    x = torch.randn(32, 8)
    y = torch.randint(0, 4, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KFACWarning)
        for step in range(1, steps + 1):
            xb = x.clone()
            if step % 37 == 0:
                xb[3, 2] = float("nan")                 # non-finite activations and gradients
            out = model(xb)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            opt.backward(scaler.scale(loss), out)
            if step % 53 != 0:                          # the loop skips some steps
                scaler.step(opt)
                scaler.update()
            if step % check_every == 0:
                on_check(step, opt)
    assert opt.skipped_steps > 0
    return opt


def test_state_and_live_tensors_stay_flat_over_200_steps():
    seen = {}

    def check(step, opt):
        seen[step] = (captured_sizes(opt), state_bytes(opt), live_tensors())

    run(200, 50, check)
    first = seen[50]
    for step in (100, 150, 200):
        assert seen[step][0] == first[0], (step, seen[step][0], first[0])
        assert seen[step][1] == first[1]
        assert seen[step][2] <= first[2], (step, seen[step][2], first[2])
    assert first[0]["inputs"] == first[0]["grads"] == first[0]["hats"] == 0


@pytest.mark.soak
def test_memory_stays_flat_over_10000_steps():
    seen = {}

    def check(step, opt):
        seen[step] = (captured_sizes(opt), state_bytes(opt), live_tensors(), rss_bytes())

    run(10_000, 1000, check)
    base = seen[1000]
    for step, (sizes, nbytes, tensors, rss) in sorted(seen.items()):
        print(f"step {step}: live tensors {tensors}, optimiser state {nbytes} B, "
              f"RSS {rss / 2 ** 20:.1f} MiB")
        if step >= 1000:
            assert sizes == base[0] and nbytes == base[1] and tensors <= base[2], step
    growth = seen[10_000][3] - base[3]
    assert growth < 4 * 2 ** 20, f"RSS grew by {growth / 2 ** 20:.1f} MiB over 9000 steps"

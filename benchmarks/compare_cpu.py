"""Step time of kfac_kernels against the established PyTorch K-FAC implementations, on CPU.

Target (benchmarks/README.md, "Performance targets"): "On CPU, the reference path must beat the established PyTorch K-FAC implementations
on step time for the same model and settings." This script times one full training step
(forward, backward, factor update, amortised inverse update, preconditioning, SGD step) of:

* kfac_kernels.KFACPreconditioner + torch.optim.SGD (this package, reference backend);
* kfac-pytorch (KAISA, gpauloski/kfac-pytorch) KFACPreconditioner + SGD, if importable as ``kfac``;
* ASDL (``asdfghjkl`` on PyPI, imported as ``asdl``) KfacGradientMaker + SGD, if importable;
* plain SGD, for scale.

Settings shared by all K-FAC variants: empirical Fisher (the only curvature kfac-pytorch computes),
factor update every step and inverse update every 10 steps by default (``--factor-every``,
``--inverse-every``), damping 1e-3, running-average decay 0.95,
eigendecomposition-based inverse (ASDL: its default damped inverse), KL clip 1e-3 where supported.
The comparators are third-party packages installed separately (never vendored here), e.g.::

    pip install "git+https://github.com/gpauloski/kfac-pytorch" asdfghjkl

Usage: python benchmarks/compare_cpu.py [--rounds 5] [--threads 1] [--factor-every 1]
       [--inverse-every 10] [--out results.md]
"""
from __future__ import annotations

import argparse
import math
import datetime
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels._env import cpu_name

DAMPING, DECAY, KL, LR = 1e-3, 0.95, 1e-3, 0.05
# Update periods, set from --factor-every / --inverse-every in main().
FACTOR_EVERY, INV_EVERY = 1, 10


def mlp():
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


MODELS = {"mlp-256-512-512-256-10 (batch 512)": (mlp, (512, 256)),
          "cnn-3x32x32 3 convs (batch 128)": (cnn, (128, 3, 32, 32))}


def make_ours(model):
    pre = kk.KFACPreconditioner(model, lr=LR, kl_clip=KL, damping=DAMPING, ema_decay=DECAY,
                                factor_every=FACTOR_EVERY, inverse_every=INV_EVERY, curvature="empirical",
                                inverse="eigh", backend="torch")
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def step(x, y):
        out = model(x)
        loss = F.cross_entropy(out, y)
        sgd.zero_grad()
        loss.backward()
        pre.step()
        sgd.step()
        return loss
    return step


def make_kaisa(model):
    from kfac.preconditioner import KFACPreconditioner
    pre = KFACPreconditioner(model, factor_update_steps=FACTOR_EVERY, inv_update_steps=INV_EVERY,
                             damping=DAMPING, factor_decay=DECAY, kl_clip=KL, lr=LR)
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def step(x, y):
        out = model(x)
        loss = F.cross_entropy(out, y)
        sgd.zero_grad()
        loss.backward()
        pre.step()
        sgd.step()
        return loss
    return step


def make_asdl(model, batch):
    from asdl.precondition import KfacGradientMaker, PreconditioningConfig
    if not torch.cuda.is_available():
        # ASDL brackets its phases with NVTX ranges unconditionally; a CPU build of torch has no
        # NVTX, so make the markers no-ops (they do no work on GPU builds either when unprofiled).
        torch.cuda.nvtx.range_push = lambda msg: None
        torch.cuda.nvtx.range_pop = lambda: None
    cfg = PreconditioningConfig(data_size=batch, damping=DAMPING, ema_decay=1 - DECAY, curvature_upd_interval=FACTOR_EVERY,
                                preconditioner_upd_interval=INV_EVERY)
    gm = KfacGradientMaker(model, cfg, fisher_type="fisher_emp")
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def step(x, y):
        sgd.zero_grad()
        dummy = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, dummy, y)
        _, loss = gm.forward_and_backward()
        sgd.step()
        return loss
    return step


def make_sgd(model):
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        sgd.zero_grad()
        loss.backward()
        sgd.step()
        return loss
    return step


IMPLS = {"kfac_kernels": make_ours, "kfac-pytorch (KAISA)": make_kaisa,
         "ASDL": make_asdl, "SGD (no K-FAC)": make_sgd}


def _setup(make, build, shape):
    torch.manual_seed(0)
    model = build()
    return make(model, shape[0]) if make is make_asdl else make(model)


def batches(shape, start: int, n: int):
    """Batches ``start .. start + n - 1`` of a fresh, deterministic stream (random inputs and
    labels): every step a new batch, the same for every implementation. A few batches cycled get
    memorised within dozens of steps; the memorised model's subnormal gradients then slow its own
    backward GEMMs many times over, which times that regime, not the optimisers."""
    out = []
    for k in range(start, start + n):
        g = torch.Generator().manual_seed(1_000 + k)
        out.append((torch.randn(*shape, generator=g), torch.randint(0, 10, (shape[0],),
                                                                     generator=g)))
    return out


def period():
    """Steps in one round: the least common multiple of the two update periods, so that each
    round's mean includes the same number of factor and inverse updates for every implementation."""
    return math.lcm(FACTOR_EVERY, INV_EVERY)


def time_all(impls, build, shape, rounds):
    """Interleaved timing: every round runs each implementation for one whole update period
    (period() steps, so each round's mean includes the same inverse updates), in turn, so that drift in
    the machine's load hits all of them alike. Returns {name: (round means, losses)} or the
    exception an implementation raised."""
    state, out = {}, {}
    warm = batches(shape, 0, period())
    for name, make in impls.items():
        try:
            step = _setup(make, build, shape)
            for x, y in warm:                      # warm-up: one whole update period
                step(x, y)
            state[name] = (step, [], [])
        except Exception as exc:   # ImportError: not installed; anything else: it crashed
            out[name] = exc
    for r in range(rounds):
        todo = batches(shape, (r + 1) * period(), period())   # made before the round's timing
        for name, (step, means, losses) in state.items():
            if name in out:
                continue
            try:
                t0 = time.perf_counter()
                for x, y in todo:
                    loss = step(x, y)
                means.append((time.perf_counter() - t0) / period())
                losses.append(float(loss.detach()))
            except Exception as exc:
                out[name] = exc
    for name, (_, means, losses) in state.items():
        out.setdefault(name, (means, losses))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    global FACTOR_EVERY, INV_EVERY
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved rounds of lcm(factor-every, inverse-every) steps per implementation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--factor-every", type=int, default=1,
                    help="factor (curvature) update period in steps, for every K-FAC variant")
    ap.add_argument("--inverse-every", type=int, default=10,
                    help="inverse (eigendecomposition) update period in steps, for every K-FAC variant")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--append", action="store_true",
                    help="append to --out (one file for several settings) instead of overwriting it")
    a = ap.parse_args(argv)
    if a.factor_every < 1 or a.inverse_every < 1:
        ap.error("--factor-every and --inverse-every must be >= 1")
    FACTOR_EVERY, INV_EVERY = a.factor_every, a.inverse_every
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    versions = {"torch": torch.__version__, "kfac_kernels": kk.__version__}
    for mod, name in (("kfac", "kfac-pytorch"), ("asdl", "asdfghjkl")):
        try:
            m = __import__(mod)
            versions[name] = getattr(m, "__version__", "installed")
        except Exception as exc:
            versions[name] = f"absent ({type(exc).__name__})"
    rows = []
    for mname, (build, shape) in MODELS.items():
        res = time_all(IMPLS, build, shape, a.rounds)
        ours = statistics.median(res["kfac_kernels"][0])
        for iname in IMPLS:
            r = res[iname]
            if isinstance(r, ImportError):
                rows.append((mname, iname, "not installed", "", "", ""))
            elif isinstance(r, Exception):    # a comparator that crashes is reported, not hidden
                msg = str(r).splitlines()[0][:90]
                rows.append((mname, iname, "crashed", "", "", f"{type(r).__name__}: {msg}"))
            else:
                means, losses = r
                med = statistics.median(means)
                rows.append((mname, iname, f"{med * 1e3:.1f}", f"{min(means) * 1e3:.1f}",
                             f"{med / ours:.2f}x", f"{losses[0]:.3f} -> {losses[-1]:.3f}"))
    header = ("model", "implementation", "ms/step (median of rounds)", "ms/step (best round)",
              "time / kfac_kernels", "loss after round 1 -> last")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    prov = (f"{when}; {cpu_name()}, {a.threads} threads; "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
            + f"; factors every {FACTOR_EVERY} step(s), inverse every {INV_EVERY} steps; "
              f"{a.rounds} interleaved rounds of {period()} steps each after a {period()}-step "
              f"warm-up (each round's mean includes {period() // INV_EVERY} inverse update(s)); "
              f"every step a fresh batch (random inputs and labels), the same for every "
              f"implementation: nothing is memorised")
    md = [prov, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(md)
    print(text)
    if a.out:
        with open(a.out, "a" if a.append else "w") as fh:
            fh.write(("\n" if a.append and fh.tell() else "") + text + "\n")


if __name__ == "__main__":
    main()

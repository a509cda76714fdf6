"""Step time of kfac_kernels against the established PyTorch K-FAC implementations, on CPU.

DESIGN.md §5: "On CPU, the reference path must beat the established PyTorch K-FAC implementations
on step time for the same model and settings." This script times one full training step
(forward, backward, factor update, amortised inverse update, preconditioning, SGD step) of:

* kfac_kernels.KFACPreconditioner + torch.optim.SGD (this package, reference backend);
* kfac-pytorch (KAISA, gpauloski/kfac-pytorch) KFACPreconditioner + SGD, if importable as ``kfac``;
* ASDL (``asdfghjkl`` on PyPI, imported as ``asdl``) KfacGradientMaker + SGD, if importable;
* plain SGD, for scale.

Settings shared by all K-FAC variants: empirical Fisher (the only curvature kfac-pytorch computes),
factor update every step, inverse update every 10 steps, damping 1e-3, running-average decay 0.95,
eigendecomposition-based inverse (ASDL: its default damped inverse), KL clip 1e-3 where supported.
The comparators are third-party packages installed separately (never vendored here), e.g.::

    pip install "git+https://github.com/gpauloski/kfac-pytorch" asdfghjkl

Usage: python benchmarks/compare_cpu.py [--steps 20] [--threads 2] [--out results.md]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk

DAMPING, DECAY, INV_EVERY, KL, LR = 1e-3, 0.95, 10, 1e-3, 0.05


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
                                factor_every=1, inverse_every=INV_EVERY, curvature="empirical",
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
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=INV_EVERY,
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
    cfg = PreconditioningConfig(data_size=batch, damping=DAMPING, ema_decay=1 - DECAY, curvature_upd_interval=1,
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


def time_impl(make, build, shape, steps):
    torch.manual_seed(0)
    model = build()
    step = make(model, shape[0]) if make is make_asdl else make(model)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(*shape, generator=g) for _ in range(4)]
    ys = [torch.randint(0, 10, (shape[0],), generator=g) for _ in range(4)]
    for i in range(INV_EVERY):            # warm-up: one whole inverse period
        step(xs[i % 4], ys[i % 4])
    times, losses = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(xs[i % 4], ys[i % 4])
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return times, losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2 * INV_EVERY)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the markdown table here")
    a = ap.parse_args(argv)
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
        res = {}
        for iname, make in IMPLS.items():
            try:
                times, losses = time_impl(make, build, shape, a.steps)
            except ImportError:
                rows.append((mname, iname, "not installed", "", "", ""))
                continue
            except Exception as exc:   # a comparator that crashes is reported, not hidden
                msg = str(exc).splitlines()[0][:90]
                rows.append((mname, iname, "crashed", "", "", f"{type(exc).__name__}: {msg}"))
                continue
            mean = statistics.fmean(times)
            res[iname] = mean
            rows.append((mname, iname, f"{mean * 1e3:.1f}", f"{statistics.median(times) * 1e3:.1f}",
                         "", f"{losses[0]:.3f} -> {losses[-1]:.3f}"))
        ours = res.get("kfac_kernels")
        rows = [(r[0], r[1], r[2], r[3],
                 (f"{res[r[1]] / ours:.2f}x" if (r[0] == mname and r[1] in res and ours) else r[4]),
                 r[5]) for r in rows]
    header = ("model", "implementation", "mean ms/step", "median ms/step",
              "time / kfac_kernels", "loss first -> last")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    prov = (f"{when}; {platform.processor() or platform.machine()}, {a.threads} threads; "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
            + f"; {a.steps} timed steps after a {INV_EVERY}-step warm-up, inverse every "
              f"{INV_EVERY} steps (mean includes the amortised inverse updates)")
    md = [prov, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(md)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

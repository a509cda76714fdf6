"""Step time of a K-FAC training step, eager against torch.compile, on this machine.

Variants (same model, data and settings; steps interleaved so that machine noise hits all alike):

* eager: model and KFAC.step in eager mode;
* compiled model: ``torch.compile(model)`` (forward + backward), KFAC.step eager;
* compiled model + ``opt.compile(force=True)   # measured here on CPU too``: also the gradient matrices, batched preconditioning, KL clip
  and parameter update compiled (inductor).

The capture hooks split the compiled forward on factor steps (dynamo cannot trace tensor hooks
with side effects), so ``--factor-every`` matters: the script reports both every-step factors and
factors every 10 steps. Parameters of the compiled runs are checked against eager at the end.

Usage: python benchmarks/robust_compile.py [--steps 40] [--threads 1] [--out FILE]
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


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
                         nn.Linear(512, 10))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(args.batch, 256, generator=g), None) for _ in range(8)]
    w = torch.randn(256, 10, generator=g)
    data = [(x, (x @ w).argmax(1)) for x, _ in data]
    lines = []
    for factor_every in (1, 10):
        kw = dict(lr=0.05, momentum=0.9, damping=1e-2, curvature="empirical", kl_clip=1e-2,
                  factor_every=factor_every, inverse_every=10)
        runs = {}
        for name in ("eager", "compiled model", "compiled model + opt.compile()"):
            net = mlp()
            opt = kk.KFAC(net, **kw)
            fwd = net
            if name != "eager":
                fwd = torch.compile(net)
            if name.endswith("opt.compile()"):
                opt.compile()
            runs[name] = (net, fwd, opt, [])
        t_compile = {}
        for step in range(args.warmup + args.steps):
            x, y = data[step % len(data)]
            for name, (net, fwd, opt, times) in runs.items():
                t0 = time.process_time()     # CPU time (one thread): steadier on a busy machine
                w0 = time.perf_counter()
                out = fwd(x)
                loss = F.cross_entropy(out, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                dt = time.process_time() - t0
                if step < args.warmup:      # compilation runs partly in worker processes: wall
                    t_compile[name] = t_compile.get(name, 0.0) + time.perf_counter() - w0
                else:
                    times.append(dt)
        base = statistics.median(runs["eager"][3])
        ref = runs["eager"][0]
        for name, (net, fwd, opt, times) in runs.items():
            err = max(float((p - q).norm() / q.norm()) for p, q in zip(net.parameters(),
                                                                        ref.parameters()))
            med = statistics.median(times)
            lines.append(f"| {factor_every} | {name} | {1e3 * med:.2f} | {med / base:.2f} | "
                         f"{t_compile[name]:.1f} | {err:.1e} |")
    head = (f"K-FAC step time, eager vs torch.compile: MLP 256-512-512-10, batch {args.batch}, "
            f"empirical Fisher, inverse every 10, KL clip; median of {args.steps} steps after "
            f"{args.warmup} warm-up steps, {args.threads} thread(s). "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{datetime.date.today()}.")
    cols = ("| factor_every | variant | CPU ms/step | vs eager | warm-up wall s (compilation) "
            "| param. rel. diff. vs eager |")
    text = "\n".join([head, "", cols, "|---|---|---|---|---|---|"] + lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

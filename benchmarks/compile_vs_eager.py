"""torch.compile on CPU: eager K-FAC step vs ``torch.compile(model)`` vs compiled model +
``opt.compile(force=True)``, on an MLP 64-128-128-10 (batch 128, kl_clip 1e-3), one thread.

Every variant is warmed up (25 steps: compiles and recompiles happen there), then timed in
interleaved rounds of 20 steps; medians of the per-round ms/step. This is the measurement behind
``opt.compile()`` not engaging on CPU.

    python benchmarks/compile_vs_eager.py --curvature fisher --factor-every 10
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--curvature", default="empirical")
    ap.add_argument("--factor-every", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    fe = a.factor_every

    def make(mode):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
        kw = dict(likelihood="categorical") if a.curvature != "empirical" else {}
        opt = kk.KFAC(m, lr=0.05, curvature=a.curvature, factor_every=fe, inverse_every=10 * fe,
                      kl_clip=1e-3, **kw)
        fwd = torch.compile(m) if mode != "eager" else m
        if mode == "model + opt.compile":
            opt.compile(force=True)
        return fwd, opt

    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))

    def step(fwd, opt):
        opt.zero_grad()
        out = fwd(x)
        loss = F.cross_entropy(out, y)
        if a.curvature == "empirical":
            loss.backward()
        else:
            opt.backward(loss, out)
        opt.step()

    runs = {k: make(k) for k in ("eager", "compiled model", "model + opt.compile")}
    for fwd, opt in runs.values():
        for _ in range(25):
            step(fwd, opt)
    res = {k: [] for k in runs}
    for _ in range(a.rounds):
        for k, (fwd, opt) in runs.items():
            t = time.perf_counter()
            for _ in range(20):
                step(fwd, opt)
            res[k].append((time.perf_counter() - t) / 20 * 1e3)
    for k, v in res.items():
        print(f"{a.curvature} factor_every={fe} {k}: {statistics.median(v):.2f} ms/step")


if __name__ == "__main__":
    main()

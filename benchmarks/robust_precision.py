"""Accuracy of K-FAC factors and updates in reduced precision, against a float64 run.

A fixed model (its weights are not trained: lr 0) sees the same batches in every variant; after
``--steps`` factor updates (running average, decay 0.95) each variant's factors A, G and its
preconditioned update U of one fixed float64 gradient are compared with the float64 run:
relative Frobenius error ||X - X64|| / ||X64||, worst block. Variants:

* fp32 model, fp32 factors (the default);
* bf16 autocast (fp32 weights, bf16 matmuls), fp32 factors;
* bf16 model (bf16 weights and activations), fp32 factors;
* fp16 model, fp32 factors;
* fp32 model with factors *stored* in bf16 (``factor_storage_dtype=torch.bfloat16``: averaged in
  fp32 and rounded once per running-average update, decomposed in fp32).

Usage: python benchmarks/robust_precision.py [--steps 20] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk

DIMS = (64, 256, 128, 10)


def model(dtype):
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(DIMS[:-1], DIMS[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(DIMS) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def batches(steps, n=512):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(DIMS[0], DIMS[-1], generator=g, dtype=torch.float64)
    for _ in range(steps):
        x = torch.randn(n, DIMS[0], generator=g, dtype=torch.float64)
        yield x, (x @ w).argmax(1)


def run(variant, steps, damping):
    dtype = {"bf16 model": torch.bfloat16, "fp16 model": torch.float16,
             "fp64": torch.float64}.get(variant, torch.float32)
    net = model(dtype)
    storage = torch.bfloat16 if variant == "bf16 factor storage" else None
    opt = kk.KFAC(net, lr=0.0, momentum=0.0, damping=damping, curvature="empirical",
                  inverse_every=1, skip_nonfinite=False, factor_storage_dtype=storage)
    for x, y in batches(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16 autocast"):
            out = net(x.to(dtype))
            loss = F.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    variants = ["fp32 (default)", "bf16 autocast", "bf16 model", "fp16 model",
                "bf16 factor storage"]
    g = torch.Generator().manual_seed(7)
    rows = []
    for damping in (1e-3, 1e-2):
        ref = run("fp64", args.steps, damping)
        V = {n: torch.randn(b.shape, generator=g, dtype=torch.float64)
             for n, b in ref.blocks.items()}
        U_ref, _ = ref.pipeline.precondition({b: V[n] for n, b in ref.blocks.items()})
        U_ref = {b.name: u for b, u in U_ref.items()}
        for v in variants:
            opt = run(v if v != "fp32 (default)" else "fp32", args.steps, damping)
            U, _ = opt.pipeline.precondition({b: V[n].to(b.factor_dtype)
                                              for n, b in opt.blocks.items()})
            U = {b.name: u for b, u in U.items()}
            eA = max(rel(opt.blocks[n].A, ref.blocks[n].A) for n in ref.blocks)
            eG = max(rel(opt.blocks[n].G, ref.blocks[n].G) for n in ref.blocks)
            eU = max(rel(U[n], U_ref[n]) for n in ref.blocks)
            rows.append((damping, v, eA, eG, eU))
    head = (f"K-FAC factor / update accuracy vs float64, MLP {'-'.join(map(str, DIMS))}, "
            f"{args.steps} factor updates of 512 examples (decay 0.95), empirical Fisher, "
            f"eigen damping; worst block. {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {datetime.date.today()}.")
    lines = [head, "", "| damping | variant | rel. err. A | rel. err. G | rel. err. update U |",
             "|---|---|---|---|---|"]
    lines += [f"| {d:g} | {v} | {a:.1e} | {gg:.1e} | {u:.1e} |" for d, v, a, gg, u in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

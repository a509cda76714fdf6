"""Does step control from the quadratic model pay off? Steps-to-loss with and without it.

Two demo-like problems on scikit-learn's 8x8 digits (1437 training images, full batch):

* the deep autoencoder of the demo, 64-256-128-64-16-64-128-256-64 (tanh, linear code layer),
  Bernoulli negative log-likelihood summed over the 64 pixels (nats/image), Fisher curvature with
  the Bernoulli likelihood;
* an MLP classifier 64-128-64-10 (tanh), cross-entropy, Fisher curvature (categorical).

K-FAC variants, all with heavy-ball momentum 0.9 where it is fixed, factors every 5 steps and
eigendecompositions every 10 (the demo's schedule):

* fixed: the demo's tuned settings (lr 0.1, damping 1e-2, KL clip 1e-2);
* fixed, no KL clip: the same without the clip (lr 0.1) -- what untuned settings look like;
* LM damping: fixed + ``adaptive_damping`` (Levenberg-Marquardt every 5 steps);
* adaptive lr+mom: ``adaptive_lr`` + ``adaptive_momentum``, damping 1e-2 fixed, no KL clip;
* adaptive lr+mom+LM: the three options together (M&G 2015's full scheme), damping from 1e-2.

Reported: training loss after each budget, steps to reach the thresholds, CPU time per step
(process time with one thread: wall time on a shared machine is too noisy to compare).

Usage: python benchmarks/robust_adaptive.py [--steps 200] [--threads 1] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk


def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    b = load_digits()
    x = torch.tensor(b.data, dtype=torch.float32) / 16.0
    y = torch.tensor(b.target)
    idx, _ = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2,
                              stratify=y.numpy(), random_state=0)
    return x[idx], y[idx]


def tanh_net(dims, linear_at=()):
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        lin = nn.Linear(a, b)
        hidden = i + 1 < len(dims) - 1 and (i + 1) not in linear_at
        nn.init.xavier_normal_(lin.weight, gain=nn.init.calculate_gain("tanh") if hidden else 1.0)
        nn.init.zeros_(lin.bias)
        layers += [lin] + ([nn.Tanh()] if hidden else [])
    return nn.Sequential(*layers)


PROBLEMS = {
    "autoencoder": dict(dims=(64, 256, 128, 64, 16, 64, 128, 256, 64), linear_at=(4,),
                        likelihood="bernoulli", thresholds=(22.0, 18.0, 15.0)),
    "classifier": dict(dims=(64, 128, 64, 10), linear_at=(), likelihood="categorical",
                       thresholds=(0.1, 0.01, 0.001)),
}

BASE = dict(curvature="fisher", factor_every=5, inverse_every=10, seed=0)
VARIANTS = {
    "fixed (demo settings)": dict(lr=0.1, momentum=0.9, damping=1e-2, kl_clip=1e-2),
    "fixed, no KL clip": dict(lr=0.1, momentum=0.9, damping=1e-2),
    "fixed + LM damping": dict(lr=0.1, momentum=0.9, damping=1e-2, kl_clip=1e-2,
                               adaptive_damping=True),
    "adaptive lr+mom": dict(damping=1e-2, adaptive_lr=True, adaptive_momentum=True),
    "adaptive lr+mom + LM damping": dict(damping=1e-2, adaptive_lr=True, adaptive_momentum=True,
                                         adaptive_damping=True),
}


def train(problem, variant, steps, x, y):
    spec = PROBLEMS[problem]
    net = tanh_net(spec["dims"], spec["linear_at"])
    opt = kk.KFAC(net, likelihood=spec["likelihood"], **BASE, **VARIANTS[variant])

    def closure():
        out = net(x)
        if problem == "autoencoder":
            loss = F.binary_cross_entropy_with_logits(out, x, reduction="sum") / x.shape[0]
        else:
            loss = F.cross_entropy(out, y)
        return loss, out

    losses, t = [], 0.0
    for _ in range(steps):
        t0 = time.process_time()      # CPU time: steadier than wall time on a shared machine
        loss = opt.step(closure)
        t += time.process_time() - t0
        losses.append(float(loss))
    return losses, 1e3 * t / steps, opt


def reach(losses, thr):
    for i, v in enumerate(losses):
        if v <= thr:
            return str(i + 1)
    return "-"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--problems", default="autoencoder,classifier")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    x, y = digits()
    out = [f"Steps-to-loss of K-FAC with and without step control from the quadratic model; "
           f"digits, full batch ({x.shape[0]} images), {args.steps} steps, Fisher curvature, "
           f"factors every 5 / inverses every 10 steps, {args.threads} thread(s). "
           f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
           f"{datetime.date.today()}.", ""]
    for problem in args.problems.split(","):
        thr = PROBLEMS[problem]["thresholds"]
        out += [f"**{problem}** {'-'.join(map(str, PROBLEMS[problem]['dims']))}", "",
                "| variant | loss @50 | @100 | @" + str(args.steps) + " | "
                + " | ".join(f"steps to {t:g}" for t in thr) + " | CPU ms/step | final damping |",
                "|---|---|---|---|" + "---|" * len(thr) + "---|---|"]
        for variant in VARIANTS:
            losses, ms, opt = train(problem, variant, args.steps, x, y)
            at = lambda k: f"{losses[min(k, len(losses)) - 1]:.4g}"    # noqa: E731
            out.append(f"| {variant} | {at(50)} | {at(100)} | {at(args.steps)} | "
                       + " | ".join(reach(losses, t) for t in thr)
                       + f" | {ms:.1f} | {opt.damping:.3g} |")
            print(out[-1], flush=True)
        out.append("")
    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

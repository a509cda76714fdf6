"""A small ResNet with BatchNorm and residual connections on scikit-learn's digits upsampled to
16x16 (batch 128): K-FAC against SGD-momentum and AdamW, interleaved in one process.

    python benchmarks/resnet_bn.py [--steps 300] [--opt family:key=value,...] [--quick]

Each optimizer trains its own copy of one initialisation on the same batches, in interleaved
rounds (``--round`` steps each, round-robin), each timed on its own training steps. Every
``--eval-every`` steps (not timed): eval-mode accuracy (BatchNorm's running statistics) on the
whole training split and on the held-out split. Reported: time and steps to ``--target`` eval-mode
training accuracy, the spread of held-out eval-mode accuracy over the second half of the run
(steady or swinging), ms/step. Optimizer specs: ``sgd``, ``adamw``, ``kfac`` (kk.KFAC keywords),
``label=`` names a run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.demo.data import load_digits
from kfac_kernels.examples.lm_realtext import machine, median, parse_spec


class Res(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout)) if stride != 1 or cin != cout
                      else nn.Identity())

    def forward(self, x):
        return F.relu(self.short(x) + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResNet(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(Res(width, width, 1), Res(width, 2 * width, 2),
                                    Res(2 * width, 4 * width, 2))
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def images(x, mean, std):
    x = ((x - mean) / std).reshape(-1, 1, 8, 8)
    return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    was = model.training
    model.eval()
    acc = float((model(x).argmax(-1) == y).float().mean())
    model.train(was)
    return acc


class Runner:
    def __init__(self, spec, model):
        family, kw = parse_spec(spec, 1)
        self.label = str(kw.pop("label", spec))
        # bn_recal=N: BatchNorm statistics recomputed on N training batches before each
        # evaluation (kk.nn.recalibrate_batchnorm); not counted in the training clock
        self.bn_recal = int(kw.pop("bn_recal", 0))
        self.model, self.kfac = model, None
        if family == "sgd":
            kw.setdefault("momentum", 0.9)
            self.opt = torch.optim.SGD(model.parameters(), **kw)
        elif family == "adamw":
            self.opt = torch.optim.AdamW(model.parameters(), **kw)
        elif family == "kfac":
            kw.setdefault("seed", 0)
            self.opt = self.kfac = kk.KFAC(model, **kw)
        else:
            raise ValueError(f"--opt {spec!r}: family must be sgd, adamw or kfac")
        self.times, self.elapsed, self.steps = [], 0.0, 0
        self.hist = {"label": self.label, "eval_step": [], "eval_time": [], "train_acc": [],
                     "test_acc": [], "train_loss": []}

    def step(self, x, y):
        t0 = time.perf_counter()
        out = self.model(x)
        loss = F.cross_entropy(out, y)
        self.opt.zero_grad(set_to_none=True)
        if self.kfac is not None:
            self.kfac.backward(loss, out)
        else:
            loss.backward()
        self.opt.step()
        dt = time.perf_counter() - t0
        self.times.append(dt)
        self.elapsed += dt
        self.steps += 1
        self.hist["train_loss"].append(float(loss.detach()))

    def evaluate(self, d, batch):
        if self.bn_recal:
            g = torch.Generator().manual_seed(7)
            n = len(d["ytr"])
            kk.nn.recalibrate_batchnorm(self.model, [
                d["xtr"][torch.randint(0, n, (batch,), generator=g)]
                for _ in range(self.bn_recal)])
        self.hist["eval_step"].append(self.steps)
        self.hist["eval_time"].append(self.elapsed)
        self.hist["train_acc"].append(accuracy(self.model, d["xtr"], d["ytr"]))
        self.hist["test_acc"].append(accuracy(self.model, d["xte"], d["yte"]))


DEFAULT_OPTS = [
    "sgd:lr=0.05,label=SGD-momentum lr 0.05",
    "adamw:lr=3e-3,label=AdamW lr 3e-3",
    "kfac:lr=0.1,damping=0.1,kl_clip=1e-3,label=K-FAC (issue 23 settings)",
    "kfac:lr=0.1,damping=0.1,kl_clip=1e-3,factor_every=5,label=K-FAC factor_every=5",
    "kfac:lr=0.1,damping=0.1,kl_clip=1e-3,factor_every=5,bn_recal=4,"
    "label=K-FAC factor_every=5 + BN recalibrated (4 batches)",
]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--round", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--target", type=float, default=0.98)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--opt", action="append", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="6 steps, width 4: seconds")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"))
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.width, args.round, args.eval_every, args.batch = 6, 4, 2, 3, 32
    torch.set_num_threads(args.threads)
    dg = load_digits(seed=args.seed)
    d = {"xtr": images(dg.x_train, dg.mean, dg.std), "ytr": dg.y_train,
         "xte": images(dg.x_test, dg.mean, dg.std), "yte": dg.y_test}
    torch.manual_seed(args.seed)
    init = ResNet(args.width)
    runners = []
    for spec in args.opt or DEFAULT_OPTS:
        m = ResNet(args.width)
        m.load_state_dict(init.state_dict())
        runners.append(Runner(spec, m))
    gens = [torch.Generator().manual_seed(args.seed) for _ in runners]
    n = len(d["ytr"])
    done = 0
    while done < args.steps:
        k = min(args.round, args.steps - done)
        for r, g in zip(runners, gens):
            for _ in range(k):
                idx = torch.randint(0, n, (args.batch,), generator=g)
                r.step(d["xtr"][idx], d["ytr"][idx])
                if r.steps % args.eval_every == 0:
                    r.evaluate(d, args.batch)
        done += k
    ref_ms = 1e3 * median(runners[0].times)
    lines = [f"# ResNet-BN on digits 16x16: {args.steps} steps, batch {args.batch}", "",
             f"- date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"machine: {machine()}; torch {torch.__version__}, Python "
             f"{platform.python_version()}; {torch.get_num_threads()} thread(s); load average "
             f"{os.getloadavg()[0]:.1f}",
             f"- ResNet width {args.width} (3 residual blocks, BatchNorm), "
             f"{sum(p.numel() for p in init.parameters()):,} parameters; interleaved rounds of "
             f"{args.round} steps; accuracies in eval mode (running BN statistics)", "",
             f"| optimizer | ms/step (median) | x first | steps to {args.target:.0%} train acc (eval "
             f"mode) | seconds | held-out acc, 2nd half: min / max | final train / held-out |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runners:
        h = r.hist
        hit = next((i for i, a in enumerate(h["train_acc"]) if a >= args.target), None)
        half = h["test_acc"][len(h["test_acc"]) // 2:] or h["test_acc"]
        ms = 1e3 * median(r.times)
        steps_hit = "-" if hit is None else str(h["eval_step"][hit])
        secs_hit = "-" if hit is None else f"{h['eval_time'][hit]:.1f}"
        lines.append(f"| {r.label} | {ms:.1f} | {ms / ref_ms:.2f} | {steps_hit} | {secs_hit} | "
                     f"{min(half):.3f} / {max(half):.3f} | "
                     f"{h['train_acc'][-1]:.3f} / {h['test_acc'][-1]:.3f} |")
    md = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    stem = args.name or f"resnet_bn_{datetime.date.today():%Y-%m-%d}"
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"args": vars(args), "runs": [r.hist for r in runners]}, f)
    print(md)
    return md


if __name__ == "__main__":
    main()

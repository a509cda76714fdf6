"""Log K-FAC's statistics for TensorBoard: ``python -m kfac_kernels.examples.log_stats --logdir runs/kfac``.

Trains a small MLP classifier on a synthetic task and writes ``opt.stats()`` every
``--log-every`` steps: the KL-clip factor, damping, counters, the last inverse update's seconds,
and per block the gradient and update norms and the factors' eigenvalue ranges. With the
``tensorboard`` package installed it uses ``torch.utils.tensorboard.SummaryWriter``
(``tensorboard --logdir runs``); without it, it writes the same scalars as JSON lines to
``<logdir>/stats.jsonl`` (any logger — wandb's ``wandb.log(opt.stats(sync=True), step=s)`` — takes
the same dict). It also shows a damping schedule driven through ``param_groups``, the way a
scheduler drives ``lr``.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk


class JsonLines:
    """A SummaryWriter stand-in: one JSON object per (step, tag, value)."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.fh = open(os.path.join(logdir, "stats.jsonl"), "w")

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.fh.write(json.dumps({"step": step, "tag": tag, "value": value}) + "\n")

    def close(self) -> None:
        self.fh.close()


def writer_for(logdir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(logdir), "tensorboard"
    except ImportError:             # torch.utils.tensorboard needs the tensorboard package
        return JsonLines(logdir), "jsonl"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logdir", default="runs/kfac")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
    opt = kk.KFAC(model, lr=0.1, momentum=0.0, damping=1e-1, curvature="fisher",
                  likelihood="categorical", inverse_every=10, kl_clip=1e-3, seed=0)
    writer, kind = writer_for(args.logdir)
    for step in range(args.steps):
        for g in opt.param_groups:              # damping decays from 0.1 to 1e-3
            g["damping"] = max(1e-3, 1e-1 * 0.95 ** step)
        x = torch.randn(128, 20)
        with torch.no_grad():
            y = teacher(x).argmax(1)
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            stats = opt.stats(sync=True)        # one host transfer for all of them
            stats["loss"] = float(loss)
            for tag, value in stats.items():
                writer.add_scalar(tag, value, step)
            print(f"step {step:4d}  loss {stats['loss']:.4f}  damping {stats['damping']:.4f}  "
                  f"kl factor {stats['kl_clip/factor']:.3f}", flush=True)
    writer.close()
    print(f"wrote {len(stats)} scalars per log step ({kind}) to {args.logdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

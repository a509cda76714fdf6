"""Shared parts of the language-model examples: a generated corpus, batching, training loops for
K-FAC and AdamW, evaluation, plots and the results table.

The corpus is generated, so nothing is downloaded: lines ``a+b=c`` and ``a-b=c`` (a >= b) with
operands below 10**digits (default 1 digit), one problem per line, e.g. ``7+8=15``. A character model must learn the format
(cheap), and the arithmetic: the answer characters are deterministic given the problem, while the
operand digits are random (they carry log 10 nats each and bound the loss from below). Besides the
loss the examples report ``answer accuracy``: the fraction of answer characters (after ``=``,
newline included) predicted correctly by argmax under teacher forcing on held-out problems.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

VOCAB = "0123456789+-=\n"
STOI = {c: i for i, c in enumerate(VOCAB)}


def make_corpus(n_problems: int, seed: int, digits: int = 1) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_problems):
        a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
        if rng.random() < 0.5:
            lines.append(f"{a}+{b}={a + b}\n")
        else:
            a, b = max(a, b), min(a, b)
            lines.append(f"{a}-{b}={a - b}\n")
    return "".join(lines)


def encode(text: str) -> torch.Tensor:
    return torch.tensor([STOI[c] for c in text], dtype=torch.long)


def answer_mask(data: torch.Tensor) -> torch.Tensor:
    """True at positions whose TARGET character belongs to an answer (after '=' up to newline)."""
    eq, nl = STOI["="], STOI["\n"]
    inside = torch.zeros_like(data, dtype=torch.bool)
    state = False
    for i, c in enumerate(data.tolist()):
        if c == eq:
            state = True
            continue
        inside[i] = state
        if c == nl:
            state = False
    return inside


class Data:
    def __init__(self, n_train: int, n_val: int, seed: int, ctx: int, digits: int = 1):
        self.ctx = ctx
        self.train = encode(make_corpus(n_train, seed, digits))
        self.val = encode(make_corpus(n_val, seed + 1, digits))
        self.val_answer = answer_mask(self.val)
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, n: int):
        idx = torch.randint(0, len(self.train) - self.ctx - 1, (n,), generator=self.gen)
        x = torch.stack([self.train[i:i + self.ctx] for i in idx.tolist()])
        y = torch.stack([self.train[i + 1:i + self.ctx + 1] for i in idx.tolist()])
        return x, y

    def val_windows(self):
        """Non-overlapping held-out windows (inputs, targets, answer mask of the targets)."""
        n = (len(self.val) - 1) // self.ctx
        x = self.val[:n * self.ctx].reshape(n, self.ctx)
        y = self.val[1:n * self.ctx + 1].reshape(n, self.ctx)
        m = self.val_answer[1:n * self.ctx + 1].reshape(n, self.ctx)
        return x, y, m


@torch.no_grad()
def evaluate(model, data: Data) -> Dict[str, float]:
    was = model.training
    model.eval()
    x, y, m = data.val_windows()
    logits = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    correct = (logits.argmax(-1) == y)
    model.train(was)
    return {"val_loss": float(loss), "answer_acc": float(correct[m].float().mean())}


def run(name: str, make_model: Callable[[], torch.nn.Module], make_opt, data: Data, steps: int,
        batch: int, eval_every: int, seed: int, log=print) -> Dict:
    """Train one model with one optimiser; returns its history. Every run starts from the same
    initialisation and sees the same batches (both seeded here)."""
    torch.manual_seed(seed)
    data.gen.manual_seed(seed)
    model = make_model()
    opt = make_opt(model)
    kfac = hasattr(opt, "engine")
    # gradient-norm clipping at 1: AdamW's usual setting and the transformer recipe's
    # (eigen_adam); the classic K-FAC runs bound their step with the KL clip instead
    clip = not kfac or opt.opts.inverse == "eigen_adam"
    hist = {"name": name, "step": [], "time": [], "train_loss": [], "eval_step": [],
            "eval_time": [], "val_loss": [], "answer_acc": []}
    if kfac:
        hist["describe"] = opt.describe()
    elapsed = 0.0
    for step in range(1, steps + 1):
        x, y = data.batch(batch)
        t0 = time.perf_counter()
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        if kfac:
            opt.backward(loss, out)
        else:
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed += time.perf_counter() - t0
        hist["step"].append(step)
        hist["time"].append(elapsed)
        hist["train_loss"].append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            ev = evaluate(model, data)
            hist["eval_step"].append(step)
            hist["eval_time"].append(elapsed)
            hist["val_loss"].append(ev["val_loss"])
            hist["answer_acc"].append(ev["answer_acc"])
            log(f"  [{name}] step {step:4d}  {elapsed:6.1f}s  train {hist['train_loss'][-1]:.3f}"
                f"  val {ev['val_loss']:.3f}  answer acc {ev['answer_acc']:.3f}")
    hist["params"] = sum(p.numel() for p in model.parameters())
    return hist


def table(hists: List[Dict]) -> str:
    """Markdown: the end of each run and an early checkpoint (the first evaluation at or after a
    quarter of the steps), where the per-step speed of the optimisers differs most."""
    k = next(s for s in hists[0]["eval_step"] if s >= hists[0]["step"][-1] / 4)
    rows = [f"| optimiser | steps | train time (s) | val loss @ step {k} | answer acc @ step {k} | "
            f"final train loss | final val loss | final answer acc |",
            "|---|---|---|---|---|---|---|---|"]
    for h in hists:
        i = h["eval_step"].index(k)
        tail = h["train_loss"][-20:]
        rows.append(f"| {h['name']} | {h['step'][-1]} | {h['time'][-1]:.1f} | "
                    f"{h['val_loss'][i]:.3f} | {h['answer_acc'][i]:.3f} | "
                    f"{sum(tail) / len(tail):.3f} | {h['val_loss'][-1]:.3f} | "
                    f"{h['answer_acc'][-1]:.3f} |")
    return "\n".join(rows)


def plot(hists: List[Dict], path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False

    def smooth(v, k=10):
        out, acc = [], []
        for x in v:
            acc.append(x)
            acc = acc[-k:]
            out.append(sum(acc) / len(acc))
        return out

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.0), dpi=80)
    for h in hists:
        axes[0].plot(h["step"], smooth(h["train_loss"]), label=h["name"])
        axes[1].plot(h["eval_time"], h["val_loss"], marker=".", label=h["name"])
        axes[2].plot(h["eval_step"], h["answer_acc"], marker=".", label=h["name"])
    axes[0].set(xlabel="step", ylabel="train loss (nats/char, smoothed)")
    axes[1].set(xlabel="training time (s)", ylabel="val loss (nats/char)")
    axes[2].set(xlabel="step", ylabel="answer accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def parser(desc: str, steps: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=desc)
    ap.add_argument("--steps", type=int, default=steps, help="optimiser steps per run")
    ap.add_argument("--batch", type=int, default=32, help="sequences per batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--train-problems", type=int, default=20000,
                    help="problems in the generated training corpus")
    ap.add_argument("--val-problems", type=int, default=400, help="held-out problems")
    ap.add_argument("--digits", type=int, default=1, help="operands below 10**digits")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: the matrices are small, and extra "
                         "intra-op threads cost more than they save, badly so on a busy machine)")
    ap.add_argument("--out", default=os.path.join("out", "examples"),
                    help="directory for the PNG, the table (.md) and the histories (.json)")
    ap.add_argument("--only", choices=["kfac", "adamw"], default=None,
                    help="run one optimiser only")
    return ap


def finish(hists: List[Dict], out: str, stem: str, title: str, args) -> str:
    os.makedirs(out, exist_ok=True)
    md = table(hists)
    header = (f"{title}\n\n{args.steps} steps, batch {args.batch}, seed {args.seed}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n")
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write(header + md + "\n")
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump({"args": vars(args), "runs": hists}, f)
    png = os.path.join(out, stem + ".png")
    if plot(hists, png, title):
        print(f"wrote {png}")
    print(md)
    return md

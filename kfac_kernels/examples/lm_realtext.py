"""A byte-level GPT on real text (the Python standard library's source): K-FAC against AdamW,
SOAP, Shampoo, KFACPreconditioner+AdamW (and Muon where kfac_kernels.optim has it).

    python -m kfac_kernels lm-realtext [--mb 5] [--steps 600] [--d 128] [--layers 2] ...
    python benchmarks/lm_realtext.py ...      (the same, results under benchmarks/results/)
    python -m kfac_kernels lm-realtext --quick          (seconds; what the smoke test runs)

Text: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (sorted walk, site-packages
and __pycache__ left out), concatenated as bytes up to the first ``--mb`` MB, split 90/10 into
training and validation text. Nothing is downloaded; the same Python version gives the same text.

Model: kfac_kernels.examples.transformer_lm.GPT (pre-LayerNorm blocks, causal attention, GELU MLP,
GPT-style init: normal(0, 0.02) weights, zero biases) with a 256-byte vocabulary.

Fairness: ALL optimizers run in ONE process. Each has its own model copy from the same
initialisation and sees the same batches; they advance in interleaved rounds (``--round`` steps
each, round-robin), so load on the machine hits all alike. Each optimizer's clock counts only its
own training steps (forward, backward, step); evaluation is not timed. The results file gives
validation loss against steps and seconds, the time to reach targets, median ms per step, aten
calls per step (torch.profiler, every ``aten::`` event, nested included; averaged over
``--aten-steps`` steps after the run) and the machine. The mean ms/step (own clock / steps)
includes amortised factor and inverse steps; the median shows a typical plain step.

Optimizers are given as ``family:key=value,...`` (``--opt``, repeatable); families: ``adamw``
(``sched=cos`` for linear warmup + cosine decay), ``soap``, ``shampoo``, ``kfac`` (kk.KFAC
keywords; ``recipe=1`` starts from :func:`kfac_kernels.recipes.transformer`), ``kfacpre``
(KFACPreconditioner + AdamW; ``adam_lr=``), ``muon`` (kfac_kernels.optim.Muon on the hidden
Linear weights, AdamW with ``adam_lr=`` on the rest),
``sgd``. A value written ``x/T`` is divided by the context length (per-token damping and KL clip
under ``loss_reduction="token_mean"``); ``a|b`` is a list (``skip=``, ``only=``); ``label=`` names
the run; ``clip=`` the gradient-norm clip before the step (default 1 for the first-order families
and for K-FAC with the recipe or ``inverse=eigen_adam``, none for the other K-FAC runs, which
bound their step with ``kl_clip``; ``clip=None`` turns it off).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import kfac_kernels as kk
import kfac_kernels.optim  # noqa: F401  (kk.optim)
from .transformer_lm import GPT

VOCAB = 256


# ----------------------------------------------------------------------------- data
def stdlib_text(mb: float) -> bytes:
    """The first ``mb`` MB of the standard library's ``*.py`` source (sorted walk)."""
    root = sysconfig.get_paths()["stdlib"]
    limit = int(mb * 1_000_000)
    chunks, total = [], 0
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages",
                                                      "__pycache__"))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            with open(os.path.join(dirpath, f), "rb") as fh:
                b = fh.read()
            chunks.append(b[:limit - total])
            total += len(chunks[-1])
            if total >= limit:
                return b"".join(chunks)
    if total == 0:
        raise RuntimeError(f"no *.py files under {root!r} (sysconfig's stdlib path): this "
                           f"benchmark needs the standard library's source")
    return b"".join(chunks)


class Text:
    """Training and validation bytes; seeded batches; fixed validation windows."""

    def __init__(self, mb: float, ctx: int, val_windows: int, seed: int):
        data = torch.frombuffer(bytearray(stdlib_text(mb)), dtype=torch.uint8).long()
        n = int(0.9 * len(data))
        self.train, self.val, self.ctx = data[:n], data[n:], ctx
        if len(self.val) < 2 * ctx + 2:
            raise ValueError(f"--mb {mb} leaves {len(self.val)} validation bytes, too few for "
                             f"context {ctx}: raise --mb")
        # evenly spaced validation windows (deterministic), evaluated whole every time
        m = min(val_windows, (len(self.val) - 1) // ctx)
        starts = torch.linspace(0, len(self.val) - ctx - 1, m).long()
        self.vx = torch.stack([self.val[s:s + ctx] for s in starts.tolist()])
        self.vy = torch.stack([self.val[s + 1:s + ctx + 1] for s in starts.tolist()])
        self.seed = seed

    def batches(self, batch: int):
        """An endless, seeded stream of (x, y): every optimizer gets the same sequence."""
        g = torch.Generator().manual_seed(self.seed)
        off = torch.arange(self.ctx + 1)
        while True:
            idx = torch.randint(0, len(self.train) - self.ctx - 1, (batch, 1), generator=g)
            w = self.train[idx + off]
            yield w[:, :-1], w[:, 1:]


@torch.no_grad()
def val_loss(model, text: Text) -> float:
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(text.vx), 64):
        out = model(text.vx[i:i + 64])
        tot += float(F.cross_entropy(out.reshape(-1, VOCAB), text.vy[i:i + 64].reshape(-1),
                                     reduction="sum"))
        n += text.vy[i:i + 64].numel()
    model.train(was)
    return tot / n


# ----------------------------------------------------------------------------- optimizers
def parse_value(v: str, T: int):
    if "|" in v:
        return [parse_value(x, T) for x in v.split("|") if x]
    if v.endswith("/T"):
        return float(v[:-2]) / T
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"None": None, "True": True, "False": False}.get(v, v)


def parse_spec(spec: str, T: int):
    """``family:key=value,...`` -> (family, {key: value})."""
    family, _, rest = spec.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"--opt {spec!r}: {item!r} is not key=value")
        k = k.strip()
        kw[k] = parse_value(v.strip(), T)
        if k in ("skip", "only") and not isinstance(kw[k], list):
            kw[k] = [kw[k]]
    return family.strip(), kw


class Runner:
    """One optimizer on its own model copy: ``step(x, y)`` trains one step (timed)."""

    def __init__(self, spec: str, model: torch.nn.Module, T: int, total_steps: int):
        self.spec = spec
        family, kw = parse_spec(spec, T)
        self.family = family
        self.label = str(kw.pop("label", spec))
        self.model = model
        # gradient-norm clipping at 1 (clip=None: none): the first-order optimizers' usual
        # setting and the transformer recipe's (eigen_adam); the classic K-FAC runs bound their
        # step with the KL clip instead
        self.clip = kw.pop("clip", 1.0 if family in ("adamw", "soap", "shampoo", "muon", "sgd")
                           or kw.get("recipe") or kw.get("inverse") == "eigen_adam" else None)
        sched = kw.pop("sched", None)
        warmup = kw.pop("warmup", max(1, total_steps // 20))
        self.kfac = None        # the KFAC or KFACPreconditioner (K-FAC's backward)
        self.opts: List[torch.optim.Optimizer] = []
        params = [p for p in model.parameters() if p.requires_grad]
        if family == "adamw":
            kw.setdefault("betas", (kw.pop("b1", 0.9), kw.pop("b2", 0.99)))
            kw.setdefault("weight_decay", 0.01)
            self.opts.append(torch.optim.AdamW(params, **kw))
        elif family == "sgd":
            kw.setdefault("momentum", 0.9)
            self.opts.append(torch.optim.SGD(params, **kw))
        elif family == "soap":
            kw.setdefault("betas", (kw.pop("b1", 0.9), kw.pop("b2", 0.95)))
            kw.setdefault("precondition_frequency", 10)
            self.opts.append(kk.optim.SOAP(params, **kw))
        elif family == "shampoo":
            self.opts.append(kk.optim.Shampoo(params, **kw))
        elif family == "muon":
            if not hasattr(kk.optim, "Muon"):
                raise ValueError("--opt muon: kfac_kernels.optim has no Muon in this version")
            # Muon on the hidden Linear weights, AdamW (adam_lr, AdamW's tuned 1e-3 by default)
            # on the embeddings, head, norms and biases: the usual split
            groups = kk.optim.muon_param_groups(model, adamw_lr=kw.pop("adam_lr", 1e-3))
            self.opts.append(kk.optim.Muon(groups, **kw))
        elif family == "kfac":
            if kw.pop("recipe", False):
                from kfac_kernels import recipes
                kw = recipes.transformer(**kw)
            kw.setdefault("seed", 0)
            self.kfac = kk.KFAC(model, **kw)
            self.opts.append(self.kfac)
        elif family == "kfacpre":
            adam_lr = kw.pop("adam_lr", 1e-3)
            kw.setdefault("seed", 0)
            self.kfac = kk.KFACPreconditioner(model, **kw)
            self.opts.append(torch.optim.AdamW(params, lr=adam_lr, betas=(0.9, 0.99),
                                               weight_decay=0.01))
        else:
            raise ValueError(f"--opt {spec!r}: unknown family {family!r}; expected adamw, sgd, "
                             f"soap, shampoo, kfac, kfacpre or muon")
        self.scheds = []
        if sched == "cos":
            def lam(s, w=warmup, n=total_steps):
                if s < w:
                    return (s + 1) / w
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - w) / max(1, n - w))))
            for o in self.opts:
                if isinstance(o, torch.optim.Optimizer):
                    self.scheds.append(torch.optim.lr_scheduler.LambdaLR(o, lam))
        elif sched is not None:
            raise ValueError(f"--opt {spec!r}: sched must be 'cos', got {sched!r}")
        self.hist = {"label": self.label, "spec": spec, "step": [], "time": [],
                     "train_loss": [], "eval_step": [], "eval_time": [], "val_loss": []}
        self.elapsed = 0.0
        self.step_times: List[float] = []
        self.steps = 0
        self.diverged = False

    def step(self, x, y) -> None:
        t0 = time.perf_counter()
        out = self.model(x)
        loss = F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        if self.kfac is not None:
            self.kfac.backward(loss, out)
        else:
            loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if self.kfac is not None and self.kfac not in self.opts:
            self.kfac.step()         # KFACPreconditioner: directions into .grad
        for o in self.opts:
            o.step()
        for s in self.scheds:
            s.step()
        dt = time.perf_counter() - t0
        self.elapsed += dt
        self.step_times.append(dt)
        self.steps += 1
        lv = float(loss.detach())
        if not math.isfinite(lv):
            self.diverged = True
        self.hist["step"].append(self.steps)
        self.hist["time"].append(self.elapsed)
        self.hist["train_loss"].append(lv)

    def evaluate(self, text: Text) -> float:
        v = val_loss(self.model, text) if not self.diverged else float("nan")
        self.hist["eval_step"].append(self.steps)
        self.hist["eval_time"].append(self.elapsed)
        self.hist["val_loss"].append(v)
        return v


def count_aten(r: Runner, batches, steps: int) -> float:
    """aten calls per training step (every ``aten::`` event, nested ones included), over
    ``steps`` extra steps after the run (its histories and clock are restored afterwards)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            x, y = next(batches)
            r.step(x, y)
    return sum(1 for e in prof.events() if e.name.startswith("aten::")) / steps


# ----------------------------------------------------------------------------- results
def first_reach(h: Dict, target: float, key: str = "eval_time") -> Optional[float]:
    for v, t in zip(h["val_loss"], h[key]):
        if v <= target:
            return t
    return None


def value_at(h: Dict, seconds: float) -> float:
    """Validation loss of the last evaluation at or before ``seconds`` of training."""
    best = float("nan")
    for v, t in zip(h["val_loss"], h["eval_time"]):
        if t <= seconds:
            best = v
    return best


def median(v: List[float]) -> float:
    s = sorted(v)
    return s[len(s) // 2] if s else float("nan")


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                     if ln.startswith("Model name")), platform.processor())
    except (OSError, subprocess.SubprocessError):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} logical CPUs"


def report(runners: List[Runner], args, ref: Runner, wall: float) -> str:
    """Markdown: setup, per-optimizer table, time-to-target table."""
    hists = [r.hist for r in runners]
    # target: the reference's validation loss at the end of its run (or at --target-seconds)
    tsec = args.target_seconds if args.target_seconds else ref.hist["eval_time"][-1]
    target = value_at(ref.hist, tsec)
    ref_t = first_reach(ref.hist, target)
    ref_mean = 1e3 * ref.elapsed / max(1, ref.steps)   # mean: amortised work included
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    lines = [
        (f"# Byte-level GPT on the standard library's source: {args.seconds:g} s of "
         f"training per optimizer" if args.seconds else
         f"# Byte-level GPT on the standard library's source: {args.steps} steps"),
        "",
        f"- date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
        f"{machine()}; torch {torch.__version__}, Python {platform.python_version()}, "
        f"kfac_kernels {kk.__version__}; {torch.get_num_threads()} torch thread(s); load "
        f"average at the end {', '.join(f'{x:.1f}' for x in load)}",
        f"- text: first {args.mb} MB of `*.py` under {sysconfig.get_paths()['stdlib']!r} "
        f"(90/10 split); validation: {len(runners[0].hist['val_loss']) and args.val_windows} "
        f"windows x {args.ctx} bytes",
        f"- model: {args.layers} blocks, d={args.d}, {args.heads} heads, context {args.ctx}, "
        f"batch {args.batch} ({args.batch * args.ctx} tokens/step), "
        f"{sum(p.numel() for p in runners[0].model.parameters()):,} parameters",
        f"- all optimizers in one process, interleaved rounds of {args.round} steps; each clock "
        f"counts its own training steps only; wall-clock of the whole run {wall:.0f} s",
        f"- target: {ref.label}'s validation loss at {tsec:.0f} s of its training = "
        f"{target:.4f}",
        "",
        "| optimizer | ms/step (mean) | x ref | ms/step (median) | aten calls/step | val @ 1/4 | "
        "val @ 1/2 | final val | time to target (s) | x ref | steps to target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runners:
        h = r.hist
        ev = h["eval_step"]
        q = lambda f: h["val_loss"][min(range(len(ev)), key=lambda i: abs(ev[i] - f * ev[-1]))]
        t = first_reach(h, target)
        s = first_reach(h, target, "eval_step")
        ms = 1e3 * median(r.step_times)
        mean = 1e3 * r.elapsed / max(1, r.steps)
        lines.append(
            f"| {r.label} | {mean:.1f} | {mean / ref_mean:.2f} | {ms:.1f} | "
            f"{r.aten if r.aten is not None else '-'} | {q(0.25):.4f} | {q(0.5):.4f} | "
            f"{h['val_loss'][-1]:.4f} | {'-' if t is None else f'{t:.1f}'} | "
            f"{'-' if t is None or not ref_t else f'{t / ref_t:.2f}'} | "
            f"{'-' if s is None else s} |")
    lines += ["", "Validation loss at fixed training seconds (each optimizer's own clock):", ""]
    marks = sorted({round(f * min(h["eval_time"][-1] for h in hists), 1)
                    for f in (0.25, 0.5, 0.75, 1.0)})
    lines.append("| optimizer | " + " | ".join(f"{m:.3g} s" for m in marks) + " |")
    lines.append("|---|" + "---:|" * len(marks))
    for r in runners:
        lines.append(f"| {r.label} | " + " | ".join(f"{value_at(r.hist, m):.4f}"
                                                    for m in marks) + " |")
    return "\n".join(lines) + "\n"


def plot(runners: List[Runner], path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), dpi=80)
    for r in runners:
        h = r.hist
        axes[0].plot(h["eval_step"], h["val_loss"], marker=".", label=r.label)
        axes[1].plot(h["eval_time"], h["val_loss"], marker=".", label=r.label)
    axes[0].set(xlabel="step", ylabel="validation loss (nats/byte)")
    axes[1].set(xlabel="training seconds (own clock)", ylabel="validation loss (nats/byte)")
    finite = [v for r in runners for v in r.hist["val_loss"][1:] if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), sorted(finite)[int(0.9 * (len(finite) - 1))]
        for ax in axes:
            ax.set_ylim(lo - 0.05, hi + 0.1)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main
DEFAULT_OPTS = [
    "adamw:lr=1e-3,label=AdamW lr 1e-3",
    "adamw:lr=3e-3,label=AdamW lr 3e-3",
    "adamw:lr=3e-3,sched=cos,label=AdamW lr 3e-3 warmup+cosine",
    "soap:lr=3e-3,label=SOAP lr 3e-3",
    "shampoo:lr=1e-3,label=Shampoo lr 1e-3",
    "kfac:lr=3,curvature=fisher,likelihood=categorical,loss_reduction=token_mean,"
    "damping=1.0/T,kl_clip=0.03/T,factor_every=1,inverse_every=10,label=K-FAC (issue 23 settings)",
    "kfacpre:curvature=fisher,likelihood=categorical,loss_reduction=token_mean,damping=1.0/T,"
    "adam_lr=1e-3,label=KFACPreconditioner+AdamW",
    "kfac:recipe=1,label=K-FAC recipe",
]
QUICK_OPTS = [
    "adamw:lr=3e-3,label=AdamW",
    "adamw:lr=3e-3,sched=cos,label=AdamW cos",
    "soap:lr=3e-3,label=SOAP",
    "shampoo:lr=1e-3,label=Shampoo",
    "kfac:lr=1,curvature=fisher,likelihood=categorical,loss_reduction=token_mean,"
    "damping=1.0/T,kl_clip=0.03/T,label=K-FAC",
    "kfacpre:curvature=fisher,likelihood=categorical,loss_reduction=token_mean,"
    "damping=1.0/T,label=KFACPre+AdamW",
    "kfac:recipe=1,label=K-FAC recipe",
]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true",
                    help="a tiny model, 0.2 MB of text and 8 steps: runs in seconds")
    ap.add_argument("--mb", type=float, default=5.0, help="MB of source text")
    ap.add_argument("--d", type=int, default=128, help="model width")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=128, help="context length T")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=600,
                    help="training steps per optimizer (with --seconds: the most; also the "
                         "horizon of sched=cos)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="train each optimizer until its own clock reaches this many seconds "
                         "(interleaved as with --steps; e.g. 300 for a 5-minute comparison)")
    ap.add_argument("--round", type=int, default=10, help="steps per optimizer per round")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--val-windows", type=int, default=256,
                    help="validation windows of ctx bytes (evenly spaced)")
    ap.add_argument("--opt", action="append", default=None,
                    help="optimizer spec family:key=value,... (repeatable; default: the sweep)")
    ap.add_argument("--muon", default="muon:lr=0.02,label=Muon",
                    help="spec added when kfac_kernels.optim.Muon exists ('' for none)")
    ap.add_argument("--ref", default=None,
                    help="label of the reference optimizer for ratios and the target "
                         "(default: the first)")
    ap.add_argument("--target-seconds", type=float, default=None,
                    help="target = the reference's validation loss at this many seconds of its "
                         "training (default: at its end)")
    ap.add_argument("--aten-steps", type=int, default=10,
                    help="profiled steps per optimizer after training, averaged (0: none; a "
                         "multiple of K-FAC's inverse_every averages over its amortisation)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join("out", "lm_realtext"),
                    help="directory for the .md, .json and .png")
    ap.add_argument("--name", default=None, help="file stem (default lm_realtext_<date>)")
    return ap


def main(argv=None) -> str:
    args = parser().parse_args(argv)
    if args.quick:
        args.mb, args.d, args.layers, args.heads, args.ctx = 0.2, 32, 1, 2, 16
        args.batch, args.steps, args.round, args.eval_every = 8, 8, 2, 4
        args.val_windows, args.aten_steps = 16, 1
        if args.opt is None:
            args.opt = list(QUICK_OPTS)
    specs = list(args.opt or DEFAULT_OPTS)
    if args.muon and hasattr(kk.optim, "Muon") and not any(s.startswith("muon")
                                                            for s in specs):
        specs.append(args.muon)
    torch.set_num_threads(args.threads)
    text = Text(args.mb, args.ctx, args.val_windows, args.seed)
    torch.manual_seed(args.seed)
    init = GPT(VOCAB, args.ctx, d=args.d, heads=args.heads, layers=args.layers)
    runners, streams = [], []
    for spec in specs:
        m = GPT(VOCAB, args.ctx, d=args.d, heads=args.heads, layers=args.layers)
        m.load_state_dict(init.state_dict())
        runners.append(Runner(spec, m, args.ctx, args.steps))
        streams.append(text.batches(args.batch))
    labels = [r.label for r in runners]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two optimizers share a label: {labels}; give label= to each")
    ref = runners[0] if args.ref is None else next(
        (r for r in runners if r.label == args.ref), None)
    if ref is None:
        raise ValueError(f"--ref {args.ref!r} is not one of {labels}")
    for r in runners:
        r.evaluate(text)
    t0 = time.perf_counter()

    def active(r: Runner) -> bool:
        return (not r.diverged and r.steps < args.steps
                and (args.seconds is None or r.elapsed < args.seconds))

    while any(active(r) for r in runners):
        for r, s in zip(runners, streams):
            for i in range(args.round):
                if not active(r):
                    break
                r.step(*next(s))
                if r.steps % args.eval_every == 0 or not active(r):
                    r.evaluate(text)
        print(f"step {max(r.steps for r in runners):5d}  "
              + "  ".join(f"{r.label}: {r.hist['val_loss'][-1]:.3f} ({r.elapsed:.0f} s)"
                          for r in runners), flush=True)
    wall = time.perf_counter() - t0
    for r, s in zip(runners, streams):
        r.aten = None
        if args.aten_steps and not r.diverged:
            keep = (r.elapsed, list(r.step_times), r.steps, {k: list(v) for k, v in r.hist.items()
                                                             if isinstance(v, list)})
            r.aten = round(count_aten(r, s, args.aten_steps))
            r.elapsed, r.step_times, r.steps = keep[0], keep[1], keep[2]
            r.hist.update(keep[3])
    md = report(runners, args, ref, wall)
    os.makedirs(args.out, exist_ok=True)
    stem = args.name or f"lm_realtext_{datetime.date.today():%Y-%m-%d}"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"args": vars(args), "runs": [r.hist for r in runners],
                   "ms_per_step": {r.label: 1e3 * median(r.step_times) for r in runners},
                   "aten_per_step": {r.label: r.aten for r in runners}}, f)
    png = os.path.join(args.out, stem + ".png")
    if plot(runners, png, f"byte-level GPT ({args.layers}x{args.d}, ctx {args.ctx}) on stdlib "
                          f"source: validation loss"):
        md += f"\n![validation loss]({stem}.png)\n"
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(md)
    print(md)
    return md


if __name__ == "__main__":
    main()

"""K-FAC's per-step overhead against Adam/AdamW: step time, aten calls per phase, bytes allocated.

For each model and each (factor_every, inverse_every):

* **step time**: K-FAC and the first-order baseline alternate round by round (one round = one
  inverse period of steps for both, so every round holds the same mix of factor, inverse and
  plain steps); the ratio K-FAC / baseline is the median of the per-round ratios, taken in one
  run (a shared machine's drift hits both alike);
* **aten calls per step** (torch.profiler, every ``aten::`` event, nested ones included, the same
  count for both optimisers; deterministic), split by phase: ``forward+backward`` (for K-FAC
  with its capture hooks and the curvature passes of "fisher"/"ggn"), ``guard``, ``factor
  update``, ``inverse update`` (amortised over the period), ``preconditioning`` (gradient
  matrices, batched preconditioning, KL clip), ``update`` (parameter update, step end);
  and the same split of the calls that do work (``compute``: no view, metadata or allocation
  op and calling none but those; about one kernel launch each on a GPU);
* **bytes allocated per step** (profiler memory events on CPU; the CUDA allocator's counter on a
  GPU).

Models: the demo's autoencoder and CNN (curvature "fisher", the demo's settings), an MLP
784-512-512-10 ("empirical", kl_clip 1e-3) and the transformer LM example (AdamW baseline).
Under pytest this is a smoke test (tiny models, a short period, no timing); as a script it
writes the tables::

    python benchmarks/bench_overhead.py [--rounds 7] [--threads 2] [--device cuda] [--out FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import time
from collections import defaultdict
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels._env import cpu_name
from kfac_kernels.demo.models import autoencoder, cnn

PHASES = ("forward+backward", "guard", "factor update", "inverse update", "preconditioning",
          "update")


# ----------------------------------------------------------------------------- workloads
class Workload:
    """A model, its batches, its loss, and how to build each optimiser. ``make(k)`` is batch k
    of a fresh, deterministic stream: every step sees a new batch (a few batches cycled get
    memorised within dozens of steps, and a memorised model's subnormal gradients then slow its
    own backward pass: that would time the regime, not the optimiser)."""

    def __init__(self, name, build, make, loss, kfac_kw, baseline):
        self.name, self.build, self.make, self.loss = name, build, make, loss
        self.kfac_kw, self.baseline = kfac_kw, baseline

    def batches(self, start: int, n: int, device: str = "cpu"):
        """Batches ``start .. start + n - 1``, made before any timing starts."""
        return [tuple(t.to(device) for t in self.make(k)) for k in range(start, start + n)]


def _stream(fn):
    """``make(k)``: ``fn(generator)`` with a generator seeded by ``k``."""
    return lambda k: fn(torch.Generator().manual_seed(1_000 + k))


def _bernoulli(out, x, y):
    return F.binary_cross_entropy_with_logits(out, x, reduction="sum") / x.shape[0]


def _xent(out, x, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def workloads(small: bool):
    n = 32 if small else 256
    images = _stream(lambda g: (lambda x: (x, x))(torch.rand(n, 64, generator=g)))
    classes = _stream(lambda g: (torch.rand(n, 64, generator=g),
                                 torch.randint(0, 10, (n,), generator=g)))
    mnist = _stream(lambda g: (torch.randn(n, 784, generator=g),
                               torch.randint(0, 10, (n,), generator=g)))
    fisher = dict(curvature="fisher", momentum=0.9)
    out = [
        Workload("autoencoder", autoencoder, images, _bernoulli,
                 dict(fisher, lr=0.1, damping=1e-2, kl_clip=1e-2, likelihood="bernoulli"),
                 lambda p: torch.optim.Adam(p, lr=3e-3)),
        Workload("cnn", cnn, classes, _xent,
                 dict(fisher, lr=0.3, damping=1e-1, kl_clip=1e-3, likelihood="categorical"),
                 lambda p: torch.optim.Adam(p, lr=3e-2)),
        Workload("mlp 784-512-512-10",
                 lambda: nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                                       nn.ReLU(), nn.Linear(512, 10)),
                 mnist, _xent,
                 dict(curvature="empirical", lr=0.1, momentum=0.9, damping=1e-3, kl_clip=1e-3),
                 lambda p: torch.optim.Adam(p, lr=1e-3)),
    ]
    from kfac_kernels.examples.transformer_lm import GPT
    vocab, seq, bs = (32, 8, 2) if small else (64, 32, 8)
    tokens = _stream(lambda g: (lambda t: (t[:, :-1], t[:, 1:]))(
        torch.randint(0, vocab, (bs, seq + 1), generator=g)))
    out.append(Workload(
        "transformer LM", lambda: GPT(vocab, seq, d=32 if small else 64, heads=4, layers=2),
        tokens, _xent,
        dict(curvature="fisher", likelihood="categorical", lr=0.1, momentum=0.9, damping=1e-3,
             kl_clip=1e-3, skip=["head"]),
        lambda p: torch.optim.AdamW(p, lr=3e-4, weight_decay=0.01)))
    return out


# ----------------------------------------------------------------------------- runners
class Runner:
    """One optimiser on one workload; ``step(batch, phase)`` runs a training step on ``batch``,
    calling ``phase(name)`` (a context manager) around each phase."""

    def __init__(self, w: Workload, kind: str, fe: int, ie: int, device: str = "cpu"):
        torch.manual_seed(0)
        self.model = w.build().to(device)
        self.w, self.kind, self.device = w, kind, device
        if kind == "kfac":
            self.opt = kk.KFAC(self.model, factor_every=fe, inverse_every=ie, seed=0,
                               **w.kfac_kw)
        else:
            self.opt = w.baseline(self.model.parameters())

    def step(self, batch, phase: Callable = lambda name: contextlib.nullcontext()):
        opt = self.opt
        x, y = batch
        with phase("forward+backward"):
            out = self.model(x)
            loss = self.w.loss(out, x, y)
            opt.zero_grad()
            if self.kind == "kfac":
                opt.backward(loss, out)
            else:
                loss.backward()
        with torch.no_grad():
            if self.kind != "kfac":
                with phase("update"):
                    opt.step()
                return
            eng = opt.engine
            with phase("guard"):
                ok = _guard_only(opt)
            with phase("factor update"):
                opt.pipeline.engine.finish_factor_update(reject=None if ok is None else ~ok)
            with phase("inverse update"):
                if eng.inverse_due():
                    eng.update_inverses()
            with phase("preconditioning"):
                d, ok = opt.directions(ok)
            with phase("update"):
                opt.apply_update(d, ok)
                opt.end_step(ok)


def _guard_only(opt):
    """KFAC.begin_step's guard (no GradScaler here): the ok flag of the step."""
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    return opt.pipeline.guard(grads) if opt.skip_nonfinite else None


# ops that only make a view, read metadata or allocate: no kernel of their own on a GPU
VIEW_OPS = frozenset("aten::" + n for n in (
    "view", "as_strided", "slice", "select", "narrow", "transpose", "t", "unsqueeze", "squeeze",
    "expand", "reshape", "_reshape_alias", "alias", "detach", "resolve_conj", "resolve_neg",
    "permute", "numpy_T", "unbind", "split", "split_with_sizes", "_unsafe_view", "flatten",
    "unflatten", "empty", "empty_strided", "empty_like", "lift_fresh", "to", "contiguous"))


def _computes(e) -> bool:
    """A leaf of the work: not a view/allocation, and everything it calls is one (so a
    composite such as ``linear`` counts once, through its ``addmm``)."""
    return e.name not in VIEW_OPS and all(c.name in VIEW_OPS for c in e.cpu_children
                                          if c.name.startswith("aten::"))


def count_phases(r: Runner, batches) -> Dict[str, float]:
    """aten calls per step by phase (every ``aten::`` event, nested ones included; and, under
    ``compute:<phase>``, only the calls that do work: see :func:`_computes`), and bytes allocated
    per step."""
    from torch.profiler import ProfilerActivity, profile, record_function
    cuda = next(r.model.parameters()).is_cuda
    steps = len(batches)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=not cuda) as prof:
        before = torch.cuda.memory_stats().get("allocated_bytes.all.allocated", 0) if cuda else 0
        for batch in batches:
            r.step(batch, lambda name: record_function("phase:" + name))
        after = torch.cuda.memory_stats().get("allocated_bytes.all.allocated", 0) if cuda else 0
    counts: Dict[str, float] = defaultdict(float)
    alloc = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith("phase:"):
            p = p.cpu_parent
        phase = p.name[6:] if p is not None else "other"
        counts[phase] += 1.0 / steps
        if _computes(e):
            counts["compute:" + phase] += 1.0 / steps
        if not cuda and e.cpu_memory_usage > 0 and (e.cpu_parent is None or not
                                                    e.cpu_parent.name.startswith("aten::")):
            alloc += e.cpu_memory_usage
    counts["total"] = sum(v for k, v in counts.items() if not k.startswith("compute:"))
    counts["compute"] = sum(v for k, v in counts.items() if k.startswith("compute:"))
    counts["bytes"] = (after - before if cuda else alloc) / steps
    return dict(counts)


def time_rounds(a: Runner, b: Runner, steps: int, rounds: int, start: int = 0):
    """Median per-step seconds of ``a`` and ``b`` and the median ratio a / b, alternating; each
    round's ``steps`` fresh batches (from ``start`` on) are made before it and are the same for
    both."""
    ta, tb, ratios = [], [], []
    sync = torch.cuda.synchronize if next(a.model.parameters()).is_cuda else (lambda: None)
    for i in range(rounds):
        res = []
        batches = a.w.batches(start + i * steps, steps, a.device)
        for r in (a, b):
            sync()
            t0 = time.perf_counter()
            for batch in batches:
                r.step(batch)
            sync()
            res.append((time.perf_counter() - t0) / steps)
        ta.append(res[0])
        tb.append(res[1])
        ratios.append(res[0] / res[1])
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios), ratios


def measure(w: Workload, fe: int, ie: int, rounds: int, timing: bool = True,
            device: str = "cpu") -> dict:
    k, base = Runner(w, "kfac", fe, ie, device), Runner(w, "base", fe, ie, device)
    for batch in w.batches(0, 2 * ie, device):     # warm-up: two periods
        k.step(batch)
        base.step(batch)
    counted = w.batches(2 * ie, ie, device)
    row = {"kfac": count_phases(k, counted), "base": count_phases(base, counted)}
    if timing:
        row["t_kfac"], row["t_base"], row["ratio"], row["ratios"] = time_rounds(
            k, base, ie, rounds, start=3 * ie)
    return row


# ----------------------------------------------------------------------------- pytest smoke
def test_overhead_smoke():
    """The harness runs and its counts add up (tiny models, a 2-step period, no timing)."""
    for w in workloads(small=True):
        row = measure(w, 1, 2, rounds=1, timing=False)
        for who in ("kfac", "base"):
            c = row[who]
            assert c["total"] > 0
            assert abs(sum(v for key, v in c.items() if key not in ("total", "bytes", "compute")
                           and not key.startswith("compute:")) - c["total"]) < 1e-9
            assert 0 < c["compute"] < c["total"]
            assert abs(sum(v for key, v in c.items() if key.startswith("compute:"))
                       - c["compute"]) < 1e-9
        assert row["kfac"]["preconditioning"] > 0 and row["kfac"]["factor update"] > 0
        assert row["kfac"]["inverse update"] > 0 and row["base"].get("preconditioning", 0) == 0


# ----------------------------------------------------------------------------- script
def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="autoencoder,cnn,mlp,transformer")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", help="markdown page (rewritten after each row, so a timeout keeps "
                    "the rows done)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = (f"GPU {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, "
           if args.device == "cuda" else "")
    wanted = args.models.split(",")
    lines = [f"# K-FAC step overhead against Adam/AdamW ({datetime.date.today().isoformat()})", "",
             f"{dev}{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, {args.threads} threads, Python "
             f"{platform.python_version()}, torch {torch.__version__}, kfac_kernels "
             f"{kk.__version__}; `benchmarks/bench_overhead.py --rounds {args.rounds}`. Step time: "
             "median of per-round ratios (K-FAC and the baseline alternate, one inverse period "
             "per round; every step a fresh batch, the same for both, made before the round: no "
             "optimiser has memorised anything). aten calls: torch.profiler `aten::` events per step (nested included), "
             "amortised over one period; compute calls: those that do work (no view, metadata or "
             "allocation op, and calling none but those: about one kernel each on a GPU). The "
             "all-calls count depends on the thread count (e.g. `cat` adds view calls per input "
             "when it runs in parallel).", ""]
    for w in workloads(small=False):
        if not any(w.name.startswith(m) for m in wanted):
            continue
        for fe, ie in ((1, 10), (10, 100)):
            row = measure(w, fe, ie, args.rounds, device=args.device)
            k, b = row["kfac"], row["base"]
            lines += [f"## {w.name}, factor_every={fe}, inverse_every={ie}", "",
                      f"step: K-FAC {row['t_kfac'] * 1e3:.2f} ms, baseline "
                      f"{row['t_base'] * 1e3:.2f} ms, ratio **{row['ratio']:.2f}x** (rounds: "
                      + ", ".join(f"{r:.2f}" for r in row["ratios"]) + ")", "",
                      "| phase | K-FAC aten/step | baseline aten/step | K-FAC compute/step | "
                      "baseline compute/step |", "|---|---|---|---|---|"]
            for ph in PHASES:
                lines.append(f"| {ph} | {k.get(ph, 0):.1f} | {b.get(ph, 0):.1f} | "
                             f"{k.get('compute:' + ph, 0):.1f} | {b.get('compute:' + ph, 0):.1f} |")
            lines += [f"| **total** | **{k['total']:.1f}** | **{b['total']:.1f}** "
                      f"(extra {k['total'] - b['total']:+.1f}) | **{k['compute']:.1f}** | "
                      f"**{b['compute']:.1f}** (extra {k['compute'] - b['compute']:+.1f}) |",
                      f"| bytes allocated/step | {k['bytes'] / 1e6:.2f} MB | "
                      f"{b['bytes'] / 1e6:.2f} MB | | |", ""]
            print("\n".join(lines[-14:]), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    f.write("\n".join(lines) + "\n")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

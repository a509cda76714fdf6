"""Step time and aten calls per step of two source trees of kfac_kernels, side by side.

For refactors and per-step work: does revision NEW keep the speed of revision BASE? Each tree
runs in its own worker process (its ``kfac_kernels`` first on ``sys.path``), both kept alive, and
the timed rounds alternate between them (base, new, base, new, ...), so drift of a shared
machine hits both alike; the report gives the median of the per-round ratios new / base. One
round is one whole inverse period (``inverse_every`` steps: the same mix of factor, inverse and
plain steps every round). The aten count is torch.profiler's number of ``aten::`` events over
one period, divided by its steps (each is a kernel launch or more on a GPU).

Workload: the demo's autoencoder (64-256-128-64-16-64-128-256-64, tanh) on random images in
[0, 1], Bernoulli loss summed over pixels, mean over a batch of 256, K-FAC with the demo's
settings (curvature="fisher", damping 1e-2, kl_clip 1e-2, momentum 0.9) at several
(factor_every, inverse_every). ``--workload lm``: the transformer LM example's GPT instead
(classic K-FAC: sampled Fisher, token_mean, KL clip). One thread.

    python benchmarks/compare_revisions.py --base /path/to/old/checkout --new . \\
        [--rounds 7] [--workload autoencoder|lm] [--out benchmarks/results/x.md]

(``git worktree add /tmp/base <commit>`` makes a checkout of an older revision.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap

CONFIGS = [(1, 10), (5, 10), (10, 100)]

WORKER = textwrap.dedent(r'''
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    import torch
    torch.set_num_threads(1)
    import torch.nn.functional as F
    import kfac_kernels as kk
    from kfac_kernels.demo.models import autoencoder
    assert kk.__file__.startswith(sys.argv[1]), kk.__file__

    WORKLOAD = sys.argv[2]

    def setup(fe, ie):
        torch.manual_seed(0)
        if WORKLOAD == "lm":
            # the transformer LM example's GPT (ctx 32) with its classic K-FAC settings, which
            # every revision since issue 22 has: sampled Fisher, token_mean, KL clip
            from kfac_kernels.examples.transformer_lm import make_model, CTX
            model = make_model()
            opt = kk.KFAC(model, lr=10.0, momentum=0.9, damping=0.3 / CTX, kl_clip=0.03 / CTX,
                          curvature="fisher", likelihood="categorical",
                          loss_reduction="token_mean", factor_every=fe, inverse_every=ie,
                          ema_decay=0.95, seed=0)
            g = torch.Generator().manual_seed(1)
            vocab = model.head.out_features
            x = torch.randint(0, vocab, (32, CTX), generator=g)
            y = torch.randint(0, vocab, (32, CTX), generator=g)
            return model, opt, (x, y)
        model = autoencoder()
        opt = kk.KFAC(model, lr=0.1, momentum=0.9, damping=1e-2, kl_clip=1e-2,
                      curvature="fisher", likelihood="bernoulli", factor_every=fe,
                      inverse_every=ie, seed=0)
        x = torch.rand(256, 64, generator=torch.Generator().manual_seed(1))
        return model, opt, x

    def step(model, opt, x):
        if WORKLOAD == "lm":
            x, y = x
            out = model(x)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        else:
            out = model(x)
            loss = F.binary_cross_entropy_with_logits(out, x, reduction="sum") / x.shape[0]
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()

    runs = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        key = (cmd["fe"], cmd["ie"])
        if key not in runs:
            runs[key] = setup(*key)
            for _ in range(2 * key[1]):       # warm-up: two periods
                step(*runs[key])
        model, opt, x = runs[key]
        if cmd["what"] == "time":
            t0 = time.perf_counter()
            for _ in range(key[1]):
                step(model, opt, x)
            res = (time.perf_counter() - t0) / key[1]
        else:
            from torch.profiler import profile, ProfilerActivity
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(key[1]):
                    step(model, opt, x)
            res = sum(1 for e in prof.events() if e.name.startswith("aten::")) / key[1]
        print(json.dumps(res), flush=True)
''')


class Worker:
    def __init__(self, tree: str, workload: str = "autoencoder"):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        self.p = subprocess.Popen([sys.executable, "-c", WORKER, os.path.abspath(tree), workload],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env)

    def ask(self, **cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("worker died")
        return json.loads(line)

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def _rev(tree: str) -> str:
    try:
        return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip() + (
            "+changes" if subprocess.run(["git", "-C", tree, "status", "--porcelain",
                                          "kfac_kernels"], capture_output=True,
                                         text=True).stdout.strip() else "")
    except Exception:
        return "?"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out")
    ap.add_argument("--workload", choices=["autoencoder", "lm"], default="autoencoder",
                    help="autoencoder: the demo's; lm: the transformer LM example's GPT (ctx 32, "
                         "batch 32) with classic K-FAC (fisher, token_mean, KL clip)")
    args = ap.parse_args(argv)
    import torch
    base, new = Worker(args.base, args.workload), Worker(args.new, args.workload)
    rows = []
    try:
        for fe, ie in CONFIGS:
            ratios, tb, tn = [], [], []
            for _ in range(args.rounds):
                b = base.ask(what="time", fe=fe, ie=ie)
                n = new.ask(what="time", fe=fe, ie=ie)
                tb.append(b)
                tn.append(n)
                ratios.append(n / b)
            cb = base.ask(what="count", fe=fe, ie=ie)
            cn = new.ask(what="count", fe=fe, ie=ie)
            rows.append((fe, ie, statistics.median(tb) * 1e3, statistics.median(tn) * 1e3,
                         statistics.median(ratios), min(ratios), max(ratios), cb, cn))
            print(rows[-1], flush=True)
    finally:
        base.close()
        new.close()
    lines = [
        f"# Step time and aten calls per step: {_rev(args.base)} (base) vs {_rev(args.new)} (new)",
        "",
        f"{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (1 thread used), Python {platform.python_version()}, torch "
        f"{torch.__version__}. `benchmarks/compare_revisions.py --rounds {args.rounds} "
        f"--workload {args.workload}`: "
        + ("the demo autoencoder, batch 256, curvature='fisher' (bernoulli), kl_clip 1e-2"
           if args.workload == "autoencoder" else
           "the transformer LM example's GPT (ctx 32, batch 32), curvature='fisher' "
           "(categorical), token_mean, kl_clip 0.03/T")
        + "; each round is one inverse period; base and new alternate round by round.",
        "",
        "| factor_every, inverse_every | base ms/step | new ms/step | ratio new/base (median; "
        "min-max) | aten calls/step base | new |",
        "|---|---|---|---|---|---|",
    ]
    for fe, ie, mb, mn, r, lo, hi, cb, cn in rows:
        lines.append(f"| {fe}, {ie} | {mb:.2f} | {mn:.2f} | {r:.3f} ({lo:.3f}-{hi:.3f}) | "
                     f"{cb:.1f} | {cn:.1f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()

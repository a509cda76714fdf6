"""``python -m kfac_kernels demo``: K-FAC against Adam and SGD with momentum on real models
(and, with ``--optimizers ...,soap,shampoo,muon``, against kfac_kernels.optim's SOAP, Shampoo and
Muon).

Trains a deep autoencoder (the K-FAC benchmark of Martens & Grosse 2015, scaled to 8x8 digits) and
a small CNN classifier on scikit-learn's handwritten digits, with the same initial weights and the
same data order for every optimiser; prints a table (steps and seconds to reach train-loss
thresholds, final train/test loss, test metric) and writes it as markdown, the results as JSON and
the loss curves as a PNG to ``--out``. See docs/demo.md for what the numbers mean and how the
hyperparameters were chosen.

This subpackage is the only part of kfac_kernels that uses scikit-learn, matplotlib and tqdm; they
are imported when the demo runs, never by ``import kfac_kernels``.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

__all__ = ["main"]

_DEPS = (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"), ("tqdm", "tqdm"))
QUICK_STEPS = 12
QUICK_TRAIN_EXAMPLES = 400


def missing_dependencies() -> List[str]:
    """pip names of the demo's dependencies that cannot be imported here."""
    import importlib.util
    return [pip for mod, pip in _DEPS if importlib.util.find_spec(mod) is None]


def _parser() -> argparse.ArgumentParser:
    from .settings import CHOICES, OPTIMIZERS
    ap = argparse.ArgumentParser(
        prog="python -m kfac_kernels demo",
        description="Train a deep autoencoder and a CNN on scikit-learn's handwritten digits with "
                    "K-FAC, Adam and SGD+momentum (same initial weights, same data order); print "
                    "a table and write results (markdown, JSON) and loss curves (PNG) to --out.")
    ap.add_argument("--models", choices=("autoencoder", "cnn", "all"), default="all")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help=f"comma-separated list from {', '.join(CHOICES)} (soap, shampoo and "
                         f"muon: kfac_kernels.optim, built on the kernel ops; muon with an AdamW "
                         f"group for all but the hidden Linear weights; default: %(default)s)")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimiser steps per run (default: per model, 200 for both)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="minibatch size (default: per model; 0 = full batch)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CUDA when available, else CPU")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: half the usable cores, at least 1 and at "
                         "most 4: these models are small, and OpenMP threads that compete with "
                         "other processes for cores spin-wait and slow every step down)")
    ap.add_argument("--out", default=os.path.join("out", "demo"),
                    help="directory for demo_loss_curves.png, results.md and results.json "
                         "(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds the split, the initial weights, the data order and K-FAC's "
                         "Fisher sampling")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="evaluate train/test loss every N steps (default: steps/200, at least 1)")
    ap.add_argument("--tune", action="store_true",
                    help="first sweep each optimiser's step size over a small grid "
                         "(settings.GRIDS: lr for Adam and SGD, lr and kl_clip for K-FAC), keep "
                         "the setting with the lowest mean log train loss per model, then run "
                         "the demo with it")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run in seconds: {QUICK_STEPS} steps on {QUICK_TRAIN_EXAMPLES} "
                         f"training examples")
    ap.add_argument("--set", action="append", default=[], metavar="OPT.KEY=VALUE",
                    help="override one setting of one optimiser for every model, e.g. "
                         "kfac.damping=0.1, kfac.kl_clip=none, kfac.curvature=ggn, adam.lr=1e-3 "
                         "(repeatable; the keys are the optimiser's constructor arguments)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # pragma: no cover
        return None


def _value(text: str):
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if low.removeprefix("torch.") in ("float32", "float64", "bfloat16", "float16"):
        import torch
        return getattr(torch, low.removeprefix("torch."))
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_overrides(items: Sequence[str]) -> Dict[str, Dict[str, object]]:
    """``["kfac.damping=0.1", ...]`` -> ``{"kfac": {"damping": 0.1}}`` (numbers, none, true/false
    and torch dtypes such as bfloat16 are parsed; anything else stays a string)."""
    from .settings import CHOICES
    out: Dict[str, Dict[str, object]] = {}
    for item in items:
        key, sep, val = item.partition("=")
        opt, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"expected OPT.KEY=VALUE, got {item!r}")
        if opt not in CHOICES:
            raise ValueError(f"unknown optimiser {opt!r} in {item!r}; choose from "
                             f"{', '.join(CHOICES)}")
        out.setdefault(opt, {})[name] = _value(val)
    return out


def unknown_override_keys(overrides: Dict[str, Dict[str, object]]) -> List[str]:
    import inspect

    import torch
    from ..optim import SOAP, Muon, Shampoo
    from ..optimizer import KFAC
    from .train import MUON_EXTRA_KEYS
    ctor = {"kfac": KFAC, "adam": torch.optim.Adam, "sgd": torch.optim.SGD, "soap": SOAP,
            "shampoo": Shampoo, "muon": Muon}
    bad = []
    for opt, kv in overrides.items():
        params = set(inspect.signature(ctor[opt]).parameters)
        if opt == "muon":
            params |= set(MUON_EXTRA_KEYS)
        bad += [f"{opt}.{k}" for k in kv if k not in params or k in ("model", "params", "seed")]
    return bad


def default_threads() -> int:
    """Half the usable cores, in [1, 4].

    The largest product in the demo is 1437x256 by 256x256, too small for many threads to pay
    off, and on a busy machine OpenMP threads that have to share cores spin-wait: on the 2-core
    machine the documented run used, the default run took 79 s with one thread and had not
    finished after 10 minutes with two (the machine was shared with other jobs).
    """
    return max(1, min(4, _usable_cpus() // 2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    missing = missing_dependencies()
    if missing:
        print(f"the demo needs {', '.join(missing)}, which cannot be imported here; install the "
              f"demo extras with:\n    pip install 'kfac_kernels[demo]'\nor:\n    pip install "
              f"{' '.join(missing)}", file=sys.stderr)
        return 1
    from .settings import CHOICES
    opts = [o.strip().lower() for o in args.optimizers.split(",") if o.strip()]
    bad = [o for o in opts if o not in CHOICES]
    if bad or not opts:
        print(f"--optimizers: unknown {bad or 'empty list'}; choose from {', '.join(CHOICES)}",
              file=sys.stderr)
        return 2
    for name in ("steps", "eval_every", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            print(f"--{name.replace('_', '-')} must be >= 1, got {v}", file=sys.stderr)
            return 2
    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        print(f"--set: {exc}", file=sys.stderr)
        return 2
    args.overrides = overrides
    if args.batch_size is not None and args.batch_size < 0:
        print(f"--batch-size must be >= 0, got {args.batch_size}", file=sys.stderr)
        return 2

    import torch
    bad_keys = unknown_override_keys(overrides)
    if bad_keys:
        print(f"--set: {', '.join(bad_keys)} not accepted by that optimiser's constructor",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here (use --device auto or cpu)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    threads_before = torch.get_num_threads()
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    try:
        return _run(args, opts, device, threads)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, opts: List[str], device, threads: int) -> int:
    import torch
    from tqdm import tqdm

    from . import models, report
    from .data import load_digits
    from .settings import DEFAULTS, GRIDS
    from .train import TASKS, batch_schedule, train

    t_start = time.perf_counter()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_before = _loadavg()
    task_names = ["autoencoder", "cnn"] if args.models == "all" else [args.models]
    data = load_digits(seed=args.seed, limit=QUICK_TRAIN_EXAMPLES if args.quick else 0).to(device)
    n = data.n_train

    def plan(task):
        steps = args.steps or (QUICK_STEPS if args.quick else task.steps)
        bs = task.batch_size if args.batch_size is None else args.batch_size
        bs = 0 if bs >= n else bs
        eval_every = args.eval_every or max(1, steps // 200)
        desc = f"full batch ({n} examples)" if bs == 0 else f"minibatches of {bs} of {n} examples"
        return steps, bs, eval_every, desc

    def run_one(task, spec, init, steps, batches, eval_every, tag=""):
        bar = tqdm(total=steps, desc=f"{task.name:<11} {spec.label:<12}{tag}", file=sys.stderr,
                   disable=args.no_progress, leave=True, dynamic_ncols=True)
        last = [0]

        def progress(step, loss):
            bar.update(step - last[0])
            last[0] = step
            bar.set_postfix_str(f"train loss {loss:.4g}")
        try:
            return train(task, spec, init, data, steps, args.seed, device, eval_every, batches,
                         progress)
        finally:
            bar.close()

    tasks = [TASKS[t] for t in task_names]
    specs = {t: {o: DEFAULTS[t][o].with_(**args.overrides.get(o, {})) for o in opts}
             for t in task_names}
    runs_by_task: Dict[str, list] = {}
    tune_md: List[str] = []
    tune_json: Dict[str, dict] = {}
    for task in tasks:
        steps, bs, eval_every, desc = plan(task)
        init = {k: v.to(device) for k, v in models.build(task.name, args.seed).state_dict().items()}
        batches = batch_schedule(n, bs, steps, args.seed)
        if args.tune:
            text, md, chosen, record = _tune(task, specs[task.name], GRIDS, init, steps, batches,
                                             eval_every, run_one, desc)
            print(text, flush=True)
            tune_md.append(md)
            tune_json[task.name] = record
            specs[task.name].update(chosen)
        runs_by_task[task.name] = [run_one(task, specs[task.name][o], init, steps, batches,
                                           eval_every) for o in opts]

    total = time.perf_counter() - t_start
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{_cpu_name()}, {threads} torch threads")
    meta = dict(date=started,
                device=str(device), device_name=dev_name, torch=torch.__version__,
                python=platform.python_version(), threads=threads, usable_cpus=_usable_cpus(),
                loadavg_before=load_before, loadavg_after=_loadavg(), seed=args.seed,
                quick=args.quick, tuned=args.tune, wall_seconds=round(total, 2),
                argv=list(sys.argv[1:]),
                plans={t.name: dict(zip(("steps", "batch_size", "eval_every", "batches"),
                                        plan(t))) for t in tasks})
    report.ensure_dir(args.out)
    png = os.path.join(args.out, "demo_loss_curves.png")
    md_path = os.path.join(args.out, "results.md")
    json_path = os.path.join(args.out, "results.json")
    header = (f"kfac_kernels demo on {dev_name} ({meta['device']}), torch {meta['torch']}, seed "
              f"{args.seed}{', quick' if args.quick else ''}; {meta['date']}")
    texts = [report.text_table(t, runs_by_task[t.name], plan(t)[3]) for t in tasks]
    print("\n" + header + "\n\n" + "\n\n".join(texts))
    report.plot(png, tasks, runs_by_task, header)
    all_runs = [r for t in tasks for r in runs_by_task[t.name]]
    report.write_json(json_path, dict(meta, tuning=tune_json), all_runs)
    with open(md_path, "w") as fh:
        fh.write(f"# kfac_kernels demo results\n\n{header}; {total:.1f} s wall in all; "
                 f"training steps {sum(r.seconds[-1] for r in all_runs):.1f} s wall, "
                 f"{sum(r.cpu_seconds for r in all_runs):.1f} s CPU (load average "
                 f"{load_before} before, {meta['loadavg_after']} after)\n\n")
        fh.write("\n\n".join(report.markdown_table(t, runs_by_task[t.name], plan(t)[3])
                             for t in tasks) + "\n")
        if tune_md:
            fh.write("\n## step-size sweeps (--tune)\n\n" + "\n\n".join(tune_md) + "\n")
    wall = sum(r.seconds[-1] for r in all_runs)
    cpu = sum(r.cpu_seconds for r in all_runs)
    print(f"\ntraining steps took {wall:.1f} s wall-clock and {cpu:.1f} s of CPU time with "
          f"{threads} thread(s); load average {load_before} before, {meta['loadavg_after']} "
          f"after (a CPU/wall ratio well below the thread count means other processes took "
          f"the cores)" if device.type == "cpu" else "")
    diverged = [f"{r.task}/{r.label}" for r in all_runs if r.diverged_at is not None]
    if diverged:
        print(f"\ndiverged (non-finite train loss): {', '.join(diverged)}")
    print(f"\nwrote {png}, {md_path}, {json_path}; {total:.1f} s in all")
    return 0


# tune scores this close (0.23% in geometric-mean loss) tie; the first in grid order wins
TUNE_TIE = 1e-3


def tune_score(run) -> float:
    """What --tune minimises: the mean over the run's evaluations of log10(train loss), i.e. the
    area under the loss curve on the plot's log axis. It rewards getting low early and staying low;
    the final loss alone would be decided by differences at 1e-5 nats once every setting has
    memorised the CNN's training set. A run that diverged scores +inf."""
    if run.diverged_at is not None or not all(math.isfinite(v) for v in run.train_loss):
        return math.inf
    return sum(math.log10(max(v, 1e-12)) for v in run.train_loss) / len(run.train_loss)


def _tune(task, specs, grids, init, steps, batches, eval_every, run_one, desc):
    """Run each optimiser's grid of settings; keep the best tune_score. Settings within TUNE_TIE
    of the best tie, and the first of them in grid order (the smallest step size) wins."""
    chosen, record = {}, {}
    thr = task.thresholds[-1]
    text = [f"sweep for {task.name} ({desc}, {steps} steps): score = mean log10 train loss "
            f"(lower is better), final train loss, steps to loss<={thr:g}; * = chosen"]
    md = [f"**{task.name}** ({desc}, {steps} steps); score = mean of log10(train loss) over the "
          f"run, lower is better; **bold** = chosen", "",
          f"| optimiser | setting | score | final train loss | steps to loss<={thr:g} | "
          f"final test loss |", "|---|---|---:|---:|---:|---:|"]
    for o, spec in specs.items():
        results = []
        for setting in grids[o]:
            label = ", ".join(f"{k}={v:g}" for k, v in setting.items())
            r = run_one(task, spec.with_(**setting), init, steps, batches, eval_every,
                        tag=f" {label}")
            hit = r.reach(thr)
            results.append(dict(setting=setting, label=label, score=tune_score(r),
                                train=r.final["train_loss"], test=r.final["test_loss"],
                                reach=hit[0] if hit else None))
        low = min(t["score"] for t in results)
        best = next(t for t in results if t["score"] <= low + TUNE_TIE)   # first of the ties
        chosen[o] = spec.with_(**best["setting"])
        record[o] = [dict(t["setting"], score=t["score"], final_train_loss=t["train"],
                          final_test_loss=t["test"], **{f"steps_to_{thr:g}": t["reach"]})
                     for t in results]
        text.append(f"  {spec.label}")
        for t in results:
            mark = "*" if t is best else " "
            text.append(f"   {mark}{t['label']:<22} score {t['score']:8.4f}  final "
                        f"{t['train']:<10.4g} steps to {thr:g}: {t['reach'] or '-'}")
            b = "**" if t is best else ""
            md.append(f"| {spec.label} | {b}{t['label']}{b} | {b}{t['score']:.4f}{b} | "
                      f"{t['train']:.4g} | {t['reach'] or 'not reached'} | {t['test']:.4g} |")
    return "\n".join(text), "\n".join(md), chosen, record

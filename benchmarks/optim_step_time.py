"""Optimizer step time (CPU, or a GPU with --device cuda): kfac_kernels SOAP / Shampoo against
heavyball SOAP, kfac_kernels Muon against torch.optim.Muon, and batched (one op call per shape
group) against looped (one call per parameter).

Only ``optimizer.step()`` is timed, on fixed random gradients (benchmarks/_optim_bench.py has the
parameter sets and settings). Every optimizer is warmed up first (one period; heavyball's
compiled variant compiles there), then timed in interleaved rounds of ``--period`` steps (a period
of 10 holds one preconditioner refresh at precondition_frequency=10), so load drift hits all
alike; ratios are the median over rounds of the per-round ratio. Writes
``benchmarks/results/optim_step_time_<cpu|cuda>_<date>.md``, rewritten after every case (so a run
stopped by a time limit keeps the cases it finished).

    python benchmarks/optim_step_time.py --threads 1                  # about 7 min on 2 cores
    python benchmarks/optim_step_time.py --device cuda --cases autoencoder,gpt2 --blocks 12
    python benchmarks/optim_step_time.py --cases gpt2 --optimizers kk-muon,kk-muon-looped,torch-muon
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import _optim_bench as B  # noqa: E402

ROUNDS = {"autoencoder": 7, "gpt2-d64": 5, "gpt2": 3}


def bench_case(case, names, period, rounds, blocks, device="cpu"):
    runs = {}
    for name in names:
        params = B.make_params(case, device=device, blocks=blocks)
        try:
            opt = B.make(name, params)
            t0 = time.perf_counter()
            B.steps(opt, params, period + 1, device)   # warm-up (and compile)
            runs[name] = dict(opt=opt, params=params, warm=time.perf_counter() - t0, times=[])
        except Exception as exc:                        # report, do not hide
            runs[name] = dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        print(f"  {case} {name}: warm-up {runs[name].get('warm', float('nan')):.1f} s "
              f"{runs[name].get('error', '')}", flush=True)
    for r in range(rounds):
        for name in names:
            run = runs[name]
            if "error" in run:
                continue
            t0 = time.perf_counter()
            B.steps(run["opt"], run["params"], period, device)
            run["times"].append(1e3 * (time.perf_counter() - t0) / period)
        print(f"  {case} round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {runs[n]['times'][-1]:.1f}" for n in names if "times" in runs[n]), flush=True)
    return runs


def ratio(runs, a, b):
    """Median over rounds of time(a) / time(b)."""
    if "times" not in runs.get(a, {}) or "times" not in runs.get(b, {}):
        return None
    return statistics.median(x / y for x, y in zip(runs[a]["times"], runs[b]["times"]))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            return next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="autoencoder,gpt2-d64,gpt2")
    ap.add_argument("--optimizers", default=",".join(B.OPTIMIZERS))
    ap.add_argument("--period", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=None, help="default: per case")
    ap.add_argument("--blocks", type=int, default=2, help="GPT-2 blocks of the 'gpt2' case")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--hb-compile-mode", default="default",
                    help="torch.compile mode of heavyball-soap-compiled (heavyball's own default, "
                         "max-autotune-no-cudagraphs, autotunes every GEMM on CPU: 140 s of "
                         "warm-up on the 'tiny' set alone on a 2-core EPYC)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    B.HB_COMPILE_MODE = a.hb_compile_mode
    names = [n for n in a.optimizers.split(",") if n]
    if B.heavyball_module() is None:
        print("heavyball not installed: its rows are skipped")
        names = [n for n in names if not n.startswith("heavyball")]
    dev = torch.device(a.device)
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    out = a.out or os.path.join(HERE, "results",
                                f"optim_step_time_{dev.type}_{started.date().isoformat()}.md")
    results = {}
    for case in a.cases.split(","):
        results[case] = bench_case(case, names, a.period, a.rounds or ROUNDS.get(case, 3),
                                   a.blocks if case == "gpt2" else 12, dev)
        write(out, results, names, a, started, time.perf_counter() - t_start)
        print(f"wrote {out}", flush=True)
    return 0


def device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"


def write(path, results, names, a, started, wall):
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "absent"

    import kfac_kernels
    dev = torch.device(a.device)
    lines = [f"# Optimizer step time on {'CPU' if dev.type == 'cpu' else 'GPU'}: kfac_kernels "
             f"SOAP / Shampoo vs heavyball SOAP, Muon vs torch.optim.Muon", "",
             f"{started.strftime('%Y-%m-%d %H:%M UTC')}; {device_name(dev)}; python "
             f"{platform.python_version()}, torch "
             f"{torch.__version__}, kfac_kernels {kfac_kernels.__version__}, heavyball "
             f"{ver('heavyball')}. `python benchmarks/optim_step_time.py --device {a.device} "
             f"--threads {a.threads} --period {a.period} --blocks {a.blocks} --hb-compile-mode "
             f"{a.hb_compile_mode}` (cases {a.cases}); {wall:.0f} s wall for the cases below.",
             "",
             "`optimizer.step()` only, on fixed random gradients; one warm-up period, then "
             f"interleaved rounds of {a.period} steps per optimizer (each round holds one "
             "preconditioner refresh: precondition_frequency=10 for all; heavyball's float "
             "schedule refreshes at steps 11, 20, 30, ...). ms/step: median and best round; "
             "ratios: median over rounds of the per-round ratio. Settings "
             "(benchmarks/_optim_bench.py): SOAP " + ", ".join(
                 f"{k}={v}" for k, v in B.SOAP_KW.items()) + "; Shampoo " + ", ".join(
                 f"{k}={v}" for k, v in B.SHAMPOO_KW.items()) + "; Muon " + ", ".join(
                 f"{k}={v}" for k, v in B.MUON_KW.items()) + " (bf16 iteration, as torch's; "
             "every 2-D parameter, the rest AdamW " + ", ".join(
                 f"{k}={v}" for k, v in B.ADAMW_KW.items()) + ": torch-muon is "
             "torch.optim.Muon + torch.optim.AdamW). kfac_kernels runs its ops "
             "with backend='auto' (the torch reference on CPU; Triton / CUDA kernels where "
             "they apply on a GPU); heavyball-soap is eager "
             "(`heavyball.utils.compile_mode = None`, as TORCHDYNAMO_DISABLE=1), "
             f"heavyball-soap-compiled its torch.compile path (its own inductor backend, C++ "
             f"on CPU, Triton on GPUs) with mode `{a.hb_compile_mode}` (heavyball's default "
             f"`max-autotune-no-cudagraphs` autotunes every GEMM shape: minutes of warm-up on "
             f"CPU); compile time is in the warm-up column (it depends on the inductor cache: "
             f"a second run is faster), not in the timings.", ""]
    desc = {"autoencoder": "demo autoencoder 64-256-128-64-16-64-128-256-64 (16 parameters, "
                           "all shapes distinct)",
            "gpt2-d64": "GPT-2 layout at width 64, 12 blocks (wpe, ln, c_attn, c_proj, c_fc, "
                        "mlp c_proj and biases: 12 of each shape)",
            "gpt2": f"GPT-2 small shapes (d=768), {a.blocks} of the 12 blocks plus wpe and "
                    f"ln_f, no wte (see _optim_bench.py): c_attn 768x2304, c_proj 768x768, "
                    f"c_fc 768x3072, mlp c_proj 3072x768"}
    for case, runs in results.items():
        lines += [f"## {case}: {desc.get(case, case)}", "",
                  "| optimizer | ms/step (median) | ms/step (best) | / kk-soap | / heavyball-soap "
                  "(eager) | warm-up s |", "|---|---:|---:|---:|---:|---:|"]
        for n in names:
            r = runs[n]
            if "error" in r:
                lines.append(f"| {n} | failed: {r['error']} | | | | |")
                continue
            r1, r2 = ratio(runs, n, "kk-soap"), ratio(runs, n, "heavyball-soap")
            lines.append(f"| {n} | {statistics.median(r['times']):.1f} | {min(r['times']):.1f} | "
                         f"{'' if r1 is None else f'{r1:.2f}x'} | "
                         f"{'' if r2 is None else f'{r2:.2f}x'} | {r['warm']:.1f} |")
        lb = [(opt, ratio(runs, f"kk-{opt}-looped", f"kk-{opt}"))
              for opt in ("soap", "shampoo", "muon")]
        lines += ["", "Batched (one op call per parameter batch) against looped (one call per "
                  "parameter, `batch_shapes=False`): looped time / batched time = " + ", ".join(
                      f"{o} {v:.2f}x" for o, v in lb if v is not None) + "."]
        mt = [(n, ratio(runs, n, "torch-muon")) for n in ("kk-muon", "kk-muon-looped")]
        if any(v is not None for _, v in mt):
            lines.append("Muon against torch.optim.Muon (+ AdamW): time / torch-muon's time = "
                         + ", ".join(f"{n} {v:.2f}x" for n, v in mt if v is not None) + ".")
        lines.append("")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""Ahead-of-time compile check of every Triton kernel configuration, no GPU needed.

Each op module lists representative launches (``aot_cases()``: the same ``Launch`` objects its
host launcher runs, planned on meta tensors), so what is compiled here is what runs: same
kernels, constexprs, warps and stages, and arguments specialised exactly as Triton's launcher
specialises them (16-byte aligned pointers, integers equal to 1 or divisible by 16). Every launch
is compiled with ``triton.compile`` for each ``GPUTarget`` (sm_80, sm_90 by default); the
registers, spills, stack and shared memory come from the log of the ptxas run that built the
cubin (``TRITON_DUMP_PTXAS_LOG``), with a fresh cache so every kernel really is compiled.

Run as ``python -m kfac_kernels.ops.triton._aot --report <file.md>`` (``--core`` for the
register-heaviest variants only, ``--append`` to add a second triton version's results)
(TRITON_INTERPRET must be off: the interpreter replaces the kernels by Python functions). The exit
status is 1 when a kernel spills or needs more shared memory than the target has, 2 when ptxas is
absent, 3 on a compile error.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# max dynamic shared memory per block (opt-in) on the reference parts: A100 (sm_80), H100 (sm_90)
SMEM_LIMIT = {80: 166912, 90: 232448}


def ptxas_path(arch: int):
    """Path of the ptxas triton uses for ``arch``, or None when it is absent."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
        if path and os.path.exists(path):
            return path
    except Exception:
        pass
    return shutil.which("ptxas")


def cases(core_only: bool = False):
    """[(op, label, Launch)] for every configuration the launchers can pick (``core_only``: the
    register-heaviest variant of each kernel and configuration)."""
    import importlib

    out = []
    for name in ("syrk", "conv_factor", "kron", "gradient_factors", "newton_schulz"):
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError:
            continue
        out.extend((op, label, launch) for op, label, launch, core in mod.aot_cases()
                   if core or not core_only)
    return out


def _specialise(kernel, launch, arch):
    """(signature, constexprs, attrs) as the runtime launcher would build them."""
    import triton  # noqa: F401
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    try:
        from triton.runtime.jit import native_specialize_impl

        def spec(v):
            return native_specialize_impl(type(backend), v, False, True, True)
    except ImportError:  # pragma: no cover - older/newer triton: same rules, written out
        def spec(v):
            import torch

            if isinstance(v, torch.Tensor):
                name = str(v.dtype).replace("torch.", "")
                ty = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32",
                      "float64": "fp64"}.get(name, name)
                return "*" + ty, "D" if v.data_ptr() % 16 == 0 else ""
            if isinstance(v, bool):
                return "u1", None
            if isinstance(v, int):
                if v == 1:
                    return "constexpr", 1
                return ("i32" if -2**31 <= v < 2**31 else "i64"), ("D" if v % 16 == 0 else "")
            return "fp32", None
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in launch.constexprs:
            sig[name] = "constexpr"
            const[name] = launch.constexprs[name]
            continue
        ty, key = spec(launch.args[name])
        sig[name] = ty
        if ty == "constexpr":
            const[name] = key
        elif isinstance(key, str) and key:
            attrs[(i,)] = backend.parse_attr(key)
    return sig, const, attrs



def _parse_ptxas(log: str):
    m = re.search(r"Used (\d+) registers", log)
    sp = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                   r"(\d+) bytes spill loads", log)
    sm = re.search(r"(\d+) bytes smem", log)
    if not (m and sp):
        return None
    return dict(regs=int(m.group(1)), stack=int(sp.group(1)), spill_stores=int(sp.group(2)),
                spill_loads=int(sp.group(3)), static_smem=int(sm.group(1)) if sm else 0)


def compile_one(index: int, arch: int, core_only: bool = False):
    """Compile case ``index`` for ``arch``; returns a result row (dict)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    op, label, launch = cases(core_only)[index]
    kernel = launch.kernel
    row = dict(op=op, case=label, kernel=kernel.__name__ if hasattr(kernel, "__name__")
               else kernel.fn.__name__, arch=arch, warps=launch.num_warps,
               stages=launch.num_stages,
               constexprs=", ".join(f"{k}={_fmt(v)}" for k, v in launch.constexprs.items()))
    t0 = time.time()
    try:
        sig, const, attrs = _specialise(kernel, launch, arch)
        src = ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)
        buf = io.StringIO()
        triton.knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=launch.num_warps,
                                             num_stages=launch.num_stages))
        stats = _parse_ptxas(buf.getvalue())
        if stats is None:  # log not captured: run ptxas -v on the PTX ourselves
            stats = _ptxas_v(ck.asm["ptx"], arch)
        row.update(stats)
        row["smem"] = int(ck.metadata.shared)
        row["ok"] = True
    except Exception as exc:
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    row["seconds"] = round(time.time() - t0, 2)
    return row


def _ptxas_v(ptx: str, arch: int):
    import subprocess

    target = re.search(r"\.target\s+(\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={target}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    stats = _parse_ptxas(res.stderr)
    if stats is None:
        raise RuntimeError(f"could not parse ptxas -v output: {res.stderr[-500:]}")
    return stats


def _fmt(v):
    s = str(v)
    return s.replace("triton.language.", "").replace("tl.", "")


def problems(row):
    """Reasons this row fails the check (empty when it passes)."""
    if not row.get("ok"):
        return [f"compile error: {row.get('error')}"]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if row["smem"] > SMEM_LIMIT.get(row["arch"], 1 << 30):
        out.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[row['arch']]} B")
    return out


def _worker_init(cache_dir):
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def run(archs=(80, 90), jobs=None, only=None, core_only=False):
    """Compile every case for every arch; returns the rows."""
    import triton  # noqa: F401

    from . import interpreting

    if interpreting():
        raise RuntimeError("TRITON_INTERPRET is on: compile the kernels in a process without it")
    all_cases = cases(core_only)
    work, seen = [], set()
    for i, (op, label, launch) in enumerate(all_cases):
        if only is not None and not re.search(only, f"{op} {label}"):
            continue
        for a in archs:
            # identical compiles (same kernel, specialisation and options) are done once
            sig, const, attrs = _specialise(launch.kernel, launch, a)
            key = (launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else
                   launch.kernel.__name__, repr(sorted(sig.items())), repr(sorted(
                       (k, str(v)) for k, v in const.items())), repr(sorted(attrs.items())),
                   launch.num_warps, launch.num_stages, a)
            if key not in seen:
                seen.add(key)
                work.append((i, a))
    jobs = jobs or min(len(work), os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="kfac_aot_cache_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if jobs <= 1:
            return [compile_one(i, a, core_only) for i, a in work]
        import multiprocessing as mp

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(cache,)) as pool:
            futs = [pool.submit(compile_one, i, a, core_only) for i, a in work]
            return [f.result() for f in futs]


def report(rows) -> str:
    import torch
    import triton

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    arches = sorted({r["arch"] for r in rows})
    lines = [
        f"# Triton kernels: ahead-of-time compile report (triton {triton.__version__})",
        "",
        f"Generated {now} by `python -m kfac_kernels.ops.triton._aot` (no GPU: `triton.compile` "
        f"with `GPUTarget`); triton {triton.__version__}, torch {torch.__version__}, ptxas "
        + ", ".join(f"{_ptxas_version(a)} (sm_{a})" for a in arches) + ".",
        "Registers, spills and stack come from the ptxas log of each cubin build; shared memory "
        "is the dynamic shared memory Triton allocates (`metadata.shared`); limits checked: "
        + ", ".join(f"sm_{a} {SMEM_LIMIT[a]} B" for a in arches) + ".",
        "",
        "| op | case | kernel | arch | warps | stages | regs | spill st/ld (B) | stack (B) | "
        "smem (B) | compile s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bad = problems(r)
        if r.get("ok"):
            lines.append(f"| {r['op']} | {r['case']} | {r['kernel']} | sm_{r['arch']} | "
                         f"{r['warps']} | {r['stages']} | {r['regs']} | {r['spill_stores']}/"
                         f"{r['spill_loads']} | {r['stack']} | {r['smem']} | {r['seconds']} | "
                         f"{'; '.join(bad) or 'ok'} |")
        else:
            lines.append(f"| {r['op']} | {r['case']} | {r['kernel']} | sm_{r['arch']} | "
                         f"{r['warps']} | {r['stages']} | | | | | {r['seconds']} | "
                         f"{'; '.join(bad)} |")
    lines += ["", "Constexprs of each case:", ""]
    seen = set()
    for r in rows:
        key = (r["op"], r["case"], r["kernel"])
        if key not in seen:
            seen.add(key)
            lines.append(f"- {r['op']} / {r['case']} / `{r['kernel']}`: {r['constexprs']}")
    ok = [r for r in rows if r.get("ok")]
    if ok:
        lines += ["", "Summary per kernel (max over cases and targets): "]
        by = {}
        for r in ok:
            k = r["kernel"]
            cur = by.setdefault(k, dict(regs=0, spill=0, smem=0, n=0))
            cur["regs"] = max(cur["regs"], r["regs"])
            cur["spill"] = max(cur["spill"], r["spill_stores"] + r["spill_loads"])
            cur["smem"] = max(cur["smem"], r["smem"])
            cur["n"] += 1
        lines += ["", "| kernel | compiles | max regs | max spill (B) | max smem (B) |",
                  "|---|---|---|---|---|"]
        for k, v in by.items():
            lines.append(f"| {k} | {v['n']} | {v['regs']} | {v['spill']} | {v['smem']} |")
    failing = [r for r in rows if problems(r)]
    lines += ["", f"{len(rows)} compiles, {len(failing)} failing the check."]
    return "\n".join(lines) + "\n"


def _ptxas_version(arch):
    import subprocess

    path = ptxas_path(arch)
    if not path:
        return "absent"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+)", out)
        return m.group(1) if m else out.strip().splitlines()[-1]
    except Exception as exc:  # pragma: no cover
        return f"? ({exc})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", help="write the markdown report here")
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--only", help="regex on 'op case' to compile a subset")
    ap.add_argument("--append", action="store_true",
                    help="append to the report (e.g. a second triton version's results)")
    ap.add_argument("--core", action="store_true",
                    help="only the register-heaviest variant of each kernel and configuration")
    a = ap.parse_args(argv)
    archs = tuple(int(x) for x in a.archs.split(","))
    missing = [x for x in archs if not ptxas_path(x)]
    if missing:
        print(f"ptxas not found for sm_{missing} (neither triton's bundled ptxas nor one on PATH)")
        return 2
    rows = run(archs, a.jobs, a.only, a.core)
    text = report(rows)
    if a.report:
        os.makedirs(os.path.dirname(os.path.abspath(a.report)), exist_ok=True)
        with open(a.report, "a" if a.append else "w") as fh:
            fh.write(("\n" if a.append else "") + text)
    print(text)
    if any(not r.get("ok") for r in rows):
        return 3
    return 1 if any(problems(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

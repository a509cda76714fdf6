"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, without a GPU.

Runs ``python -m kfac_kernels.ops.triton._aot`` in a subprocess (the interpreter must be off for
``triton.compile``), which compiles the launchers' own configurations, reads registers, spills and
shared memory from ptxas, and fails on any spill, shared-memory overflow or compile error.

The default test compiles the register-heaviest variant of every kernel and configuration; the
full sweep (every configuration the launchers can pick, as in the committed
benchmarks/results/compile_report_triton.md) runs with ``-m slow``.
"""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

from kfac_kernels.ops.triton import _aot  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ARCHS = (80, 90)
KERNELS = ("_syrk_kernel", "sym_finalize_kernel", "_conv_factor_kernel", "_kron_mm_kernel",
           "_gram_pair_kernel", "_ns_sym_kernel", "_ns_update_kernel")


def _need_ptxas():
    missing = [a for a in ARCHS if not _aot.ptxas_path(a)]
    if missing:
        pytest.skip(f"ptxas not found for sm_{missing}: neither triton's bundled ptxas "
                    "(triton/backends/nvidia/bin) nor a ptxas on PATH")


def _run_aot(tmp_path, *extra, timeout=1500):
    report = os.environ.get("KFAC_COMPILE_REPORT") or str(tmp_path / "compile_report_triton.md")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "kfac_kernels.ops.triton._aot", "--report",
                           report, "--archs", ",".join(map(str, ARCHS)), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, open(report).read() if os.path.exists(report) else ""


def _assert_clean(proc, text):
    failing = [line for line in text.splitlines()
               if line.startswith("| ") and ("spills" in line or "compile error" in line
                                             or "shared memory" in line)]
    assert proc.returncode == 0, (f"compile check failed (exit {proc.returncode}):\n"
                                  + "\n".join(failing) + "\n" + proc.stdout[-3000:]
                                  + proc.stderr[-3000:])
    for kernel in KERNELS:
        for arch in ARCHS:
            assert f"| {kernel} | sm_{arch} |" in text, f"{kernel} not compiled for sm_{arch}"


def test_core_configurations_compile_without_spills(tmp_path):
    _need_ptxas()
    proc, text = _run_aot(tmp_path, "--core")
    _assert_clean(proc, text)


@pytest.mark.slow
def test_every_configuration_compiles_without_spills(tmp_path, request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("full compile sweep (312 compiles, ~10 min on two cores): run with -m slow")
    _need_ptxas()
    proc, text = _run_aot(tmp_path)
    _assert_clean(proc, text)


def test_report_parser_flags_spills():
    """The check can fail: a ptxas log with spills, and too much shared memory, are reported."""
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    440 bytes stack frame, 488 bytes spill stores, 692 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 440 bytes cumulative stack size\n")
    stats = _aot._parse_ptxas(log)
    assert stats == dict(regs=255, stack=440, spill_stores=488, spill_loads=692, static_smem=0)
    row = dict(ok=True, arch=90, smem=300000, **stats)
    problems = _aot.problems(row)
    assert any("spills" in p for p in problems) and any("shared memory" in p for p in problems)
    clean = dict(row, spill_stores=0, spill_loads=0, smem=1024)
    assert _aot.problems(clean) == []
    assert _aot.problems(dict(ok=False, error="boom")) == ["compile error: boom"]


def test_every_kernel_has_an_aot_case():
    """Each kernel the launchers use appears among the cases compiled (core and full)."""
    for core in (True, False):
        names = {getattr(launch.kernel, "fn", launch.kernel).__name__
                 for _, _, launch in _aot.cases(core)}
        assert set(KERNELS) <= names, names


def test_import_stays_lean():
    """Importing kfac_kernels (and its ops) must not import triton."""
    code = ("import sys, kfac_kernels, kfac_kernels.ops; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr

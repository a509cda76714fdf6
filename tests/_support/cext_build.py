"""Builds ``kfac_kernels._C`` for the tests (CMake + ninja, ptxas -v for sm_80 and sm_90) and parses
the ptxas resource report.

The build tree is cached per source state under ``$TMPDIR/kfac_kernels_cbuild/<hash>`` (the hash
covers CMakeLists.txt, csrc/, python/, the nvcc version and the architectures), so only the first
test session after a kernel change pays for the compilation.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
ARCHS = "80;90"


class BuildSkipped(Exception):
    """The build cannot be attempted here; the message is the precise reason."""


class BuildFailed(Exception):
    """The build was attempted and failed; the message carries the log's tail."""


def find_nvcc() -> Optional[str]:
    from kfac_kernels._cext import _find_nvcc     # the same search the package reports with
    return _find_nvcc()


def _source_hash(nvcc: str) -> str:
    h = hashlib.sha256()
    files = [ROOT / "CMakeLists.txt"] + sorted((ROOT / "csrc").iterdir()) + sorted(
        (ROOT / "python").glob("*.cpp"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    h.update(ARCHS.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


@dataclass
class Build:
    directory: Path
    module_file: Path
    log: str
    nvcc_version: str
    cached: bool
    _module: object = field(default=None, repr=False)

    def load(self):
        """Import the built module from the cache directory (not as kfac_kernels._C)."""
        if self._module is None:
            spec = importlib.util.spec_from_file_location("kfac_kernels_testbuild._C",
                                                          self.module_file)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            self._module = mod
        return self._module


def build() -> Build:
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildSkipped("nvcc not found")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise BuildSkipped("cmake not found")
    try:
        import pybind11
    except ImportError:
        raise BuildSkipped("pybind11 not importable") from None
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    rel = [ln for ln in version.splitlines() if "release" in ln]
    version = "nvcc " + (rel[0].split("release", 1)[1].strip() if rel else "?")
    cache = Path(tempfile.gettempdir()) / "kfac_kernels_cbuild" / _source_hash(nvcc)
    out_dir = cache / "out"
    done = cache / "build.ok"
    log_file = cache / "build.log"

    def module_file() -> Optional[Path]:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if (out_dir / f"_C{suffix}").exists():
                return out_dir / f"_C{suffix}"
        return None

    if done.exists() and module_file() is not None:
        return Build(cache, module_file(), log_file.read_text(), version, cached=True)
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    args = [cmake, "-S", str(ROOT), "-B", str(cache / "tree"), "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DKFAC_KERNELS_CUDA_ARCHS={ARCHS}",
            "-DKFAC_KERNELS_PTXAS_VERBOSE=ON", f"-DKFAC_KERNELS_OUTPUT_DIR={out_dir}"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    log: List[str] = []
    for cmd in (args, [cmake, "--build", str(cache / "tree"), "--parallel",
                       str(os.cpu_count() or 2)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log.append(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            log_file.write_text("".join(log))
            raise BuildFailed(f"{' '.join(cmd[:3])} ... failed (rc {proc.returncode}):\n"
                              + "".join(log)[-4000:])
    log_file.write_text("".join(log))
    if module_file() is None:
        raise BuildFailed(f"the build produced no module in {out_dir}")
    done.write_text("ok\n")
    return Build(cache, module_file(), "".join(log), version, cached=False)


# ----------------------------------------------------------------------------- ptxas -v report
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class KernelUsage:
    mangled: str
    arch: str
    registers: int = -1
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    static_smem: int = 0
    barriers: int = 0
    name: str = ""


def parse_ptxas(log: str) -> List[KernelUsage]:
    """Per (kernel, arch) resource usage from ``ptxas -v`` output."""
    out: List[KernelUsage] = []
    cur: Optional[KernelUsage] = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = KernelUsage(m.group(1), m.group(2))
            out.append(cur)
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m and cur.stack < 0:
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m and cur.registers < 0:
            cur.registers = int(m.group(1))
            b = _BARRIERS.search(line)
            s = _SMEM.search(line)
            cur.barriers = int(b.group(1)) if b else 0
            cur.static_smem = int(s.group(1)) if s else 0
    names = demangle([k.mangled for k in out])
    for k, n in zip(out, names):
        k.name = n
    return out


def demangle(names: List[str]) -> List[str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return list(names)
    proc = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    res = proc.stdout.splitlines()
    return res if len(res) == len(names) else list(names)


def short_name(demangled: str) -> str:
    """'void kk::jacobi_eigh_kernel<float>(kk::EighParams<float>)' -> 'jacobi_eigh_kernel<float>'."""
    m = re.search(r"kk::(\w+<[^>]*>)", demangled)
    return m.group(1).replace(" ", "") if m else demangled


def group_usage(usage: List[KernelUsage]) -> Dict[str, Dict[str, KernelUsage]]:
    table: Dict[str, Dict[str, KernelUsage]] = {}
    for k in usage:
        table.setdefault(short_name(k.name), {})[k.arch] = k
    return table

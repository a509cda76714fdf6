"""Build script: pure Python everywhere; the optional CUDA extension ``kfac_kernels._C`` is built by
CMake (+ ninja when available) when nvcc is found.

Environment switches:
  KFAC_KERNELS_CUDA=0      never build _C (pure-Python install)
  KFAC_KERNELS_CUDA=1      build _C and fail loudly if that is impossible (no nvcc, no cmake, ...)
  (unset / "auto")         build _C when nvcc is found; if that build fails, warn and install pure Python
  KFAC_KERNELS_CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES for _C (default "80;90")
  MAX_JOBS                 parallel compile jobs (default: CPU count, at most 4)
  CUDACXX / CUDA_HOME      where to look for nvcc besides PATH

``python setup.py build_ext --inplace`` puts _C next to the sources; ``pip install .`` puts it in
the wheel. _C does not link against torch, so one build serves any torch version.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


def find_nvcc(env=None):
    """Path of nvcc (CUDACXX, PATH, CUDA_HOME/CUDA_PATH, /usr/local/cuda) or None."""
    env = os.environ if env is None else env
    cudacxx = env.get("CUDACXX")
    if cudacxx and Path(cudacxx).exists():
        return cudacxx
    found = shutil.which("nvcc", path=env.get("PATH"))
    if found:
        return found
    for home in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def cuda_build_decision(env=None, nvcc=None):
    """(build, required, reason) from KFAC_KERNELS_CUDA and the nvcc found (``nvcc`` given)."""
    env = os.environ if env is None else env
    mode = env.get("KFAC_KERNELS_CUDA", "").strip().lower()
    if mode in _FALSE:
        return False, False, "KFAC_KERNELS_CUDA=0: pure-Python build"
    if mode not in _TRUE + ("", "auto"):
        raise SystemExit(f"KFAC_KERNELS_CUDA must be 0, 1 or auto, got {mode!r}")
    required = mode in _TRUE
    if nvcc is None:
        if required:
            raise SystemExit("KFAC_KERNELS_CUDA=1 but nvcc was not found (looked at CUDACXX, PATH, "
                             "CUDA_HOME, CUDA_PATH, /usr/local/cuda)")
        return False, False, "nvcc not found: pure-Python build"
    return True, required, f"nvcc at {nvcc}"


def _tool(name, module):
    found = shutil.which(name)
    if found:
        return found
    try:  # the PyPI packages `cmake` / `ninja` ship the binaries
        mod = __import__(module)
        path = Path(mod.BIN_DIR) / name
        return str(path) if path.exists() else None
    except Exception:
        return None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Builds CMakeExtensions with CMake; under KFAC_KERNELS_CUDA=auto a failure is a warning."""

    def run(self):
        _, required, _ = cuda_build_decision(nvcc=find_nvcc())
        try:
            super().run()
        except Exception as exc:
            if required:
                raise
            print(f"\n*** kfac_kernels: building the optional CUDA module _C failed ({exc}); "
                  f"installing the pure-Python package. Set KFAC_KERNELS_CUDA=1 to make this an "
                  f"error. ***\n", file=sys.stderr)
            self.extensions = []

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        nvcc = find_nvcc()
        cmake = _tool("cmake", "cmake")
        if cmake is None:
            raise RuntimeError("cmake not found (apt install cmake, or pip install cmake)")
        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError("pybind11 is not importable in the build environment "
                               "(pip install pybind11, or build with --no-build-isolation)") from exc
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "kfac_kernels_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("KFAC_KERNELS_CUDA_ARCHS", "80;90")
        args = [cmake, "-S", str(ROOT), "-B", str(build_dir),
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                f"-DKFAC_KERNELS_CUDA_ARCHS={archs}",
                f"-DKFAC_KERNELS_OUTPUT_DIR={out_dir}"]
        ninja = _tool("ninja", "ninja")
        if ninja is not None and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("MAX_JOBS") or str(min(os.cpu_count() or 1, 4))
        print(f"kfac_kernels: building _C for sm {archs} with {nvcc}, {jobs} jobs")
        subprocess.run(args, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        built = Path(self.get_ext_fullpath(ext.name))
        if not built.exists():
            raise RuntimeError(f"the CMake build did not produce {built}")


if __name__ == "__main__":  # pip / `python setup.py` run it as __main__; tests import the helpers
    _build, _, _reason = cuda_build_decision(nvcc=find_nvcc())
    print(f"kfac_kernels: CUDA module _C: {'building' if _build else 'skipped'} ({_reason})")
    setup(ext_modules=[CMakeExtension("kfac_kernels._C")] if _build else [],
          cmdclass={"build_ext": CMakeBuild})

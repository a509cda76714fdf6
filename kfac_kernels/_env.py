"""Environment report for ``python -m kfac_kernels env``: versions and, per backend, whether it
works here and why not. Probing never initialises CUDA unless a CUDA device is present."""
from __future__ import annotations

import platform
import sys


def report() -> str:
    import torch

    from . import __version__
    from .ops import available_backends

    lines = [f"kfac_kernels {__version__}",
             f"python {sys.version.split()[0]} ({platform.machine()})",
             f"torch {torch.__version__} (cuda {torch.version.cuda}); "
             f"CUDA device: {'yes' if torch.cuda.is_available() else 'no'}"]
    for mod in ("triton", "cupy", "numpy"):
        try:
            m = __import__(mod)
            lines.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as exc:  # report, never fail
            lines.append(f"{mod}: not importable ({type(exc).__name__}: {exc})")
    lines.extend(_decomposition_lines())
    lines.append("backends:")
    for name, (ok, why) in available_backends().items():
        lines.append(f"  {name:7s} {'available' if ok else 'unavailable'}: {why}")
    return "\n".join(lines)


def _decomposition_lines():
    """The compiled module and CuPy, with the reason when one cannot be used."""
    from . import _cext

    ok, why = _cext.status()
    lines = [f"kfac_kernels._C (cuda backend): {'importable' if ok else 'unavailable'}: {why}"]
    try:
        from .ops.cupy import probe

        ok, why = probe()
        lines.append(f"cupy backend (cuSOLVER syevjBatched): {'usable' if ok else 'unusable'}: {why}")
    except Exception as exc:  # report, never fail
        lines.append(f"cupy backend: probe failed ({type(exc).__name__}: {exc})")
    return lines


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for benchmark provenance: timings and even
    rounding differ between CPUs (AMD EPYC and Intel Xeon runs of one script disagree)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()

"""Late, optional loading of the compiled CUDA module ``kfac_kernels._C``.

``import kfac_kernels`` never imports ``_C``: the first op that needs it calls :func:`load`,
which returns the module or raises :class:`ImportError` saying why it is not there (not built
because nvcc was absent, built but failing to import, ...). Importing ``_C`` does not touch a GPU
(it links the CUDA runtime statically and initialises it at its first device call), so the module
can be loaded, inspected and its argument checks exercised on machines without one.

Build it with ``python setup.py build_ext --inplace`` or ``pip install .`` where nvcc is present
(``KFAC_KERNELS_CUDA=1`` makes a failed build an error, ``=0`` skips it; see docs/cuda.md).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import os
import shutil
import threading
from pathlib import Path
from typing import Optional, Tuple

__all__ = ["load", "status", "module_path"]

_NAME = "kfac_kernels._C"
_lock = threading.Lock()
_result: Optional[Tuple[object, str]] = None  # (module or None, reason)


def module_path() -> Optional[Path]:
    """Path of the built extension file inside the package, or None."""
    pkg = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = pkg / f"_C{suffix}"
        if p.exists():
            return p
    return None


def _find_nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _not_built_reason() -> str:
    mode = os.environ.get("KFAC_KERNELS_CUDA", "").strip()
    if mode == "0":
        return "not built: KFAC_KERNELS_CUDA=0 is set (pure-Python install)"
    nvcc = _find_nvcc()
    if nvcc is None:
        return "not built: nvcc not found (install the CUDA toolkit, then rebuild)"
    return (f"not built: nvcc is at {nvcc}; build it with `python setup.py build_ext --inplace` "
            f"or `KFAC_KERNELS_CUDA=1 pip install .`")


def _try_load() -> Tuple[object, str]:
    try:
        mod = importlib.import_module(_NAME)
    except ImportError as exc:
        if module_path() is None and getattr(exc, "name", None) == _NAME:
            return None, _not_built_reason()
        return None, f"import failed: {type(exc).__name__}: {exc}"
    except Exception as exc:  # a broken binary must not take the caller down
        return None, f"import failed: {type(exc).__name__}: {exc}"
    try:
        info = mod.build_info()
    except Exception as exc:
        return None, f"imported but unusable: {type(exc).__name__}: {exc}"
    return mod, f"built ({info}) at {getattr(mod, '__file__', '?')}"


def status(*, refresh: bool = False) -> Tuple[bool, str]:
    """(loadable, reason) for ``_C``; never raises. Cached unless ``refresh``."""
    global _result
    with _lock:
        if _result is None or refresh:
            _result = _try_load()
        mod, reason = _result
    return mod is not None, reason


def load():
    """The ``kfac_kernels._C`` module, or ImportError with the reason it cannot be used."""
    ok, reason = status()
    if not ok:
        raise ImportError(f"kfac_kernels._C is unavailable: {reason}")
    return _result[0]

"""Backend registry for the kernel ops.

Each op is declared once (in its family's module of :mod:`kfac_kernels.ops`, which also
registers its implementations here) with a pure-torch default
(:mod:`kfac_kernels.ops.reference`) and may be overridden per backend. Implementations are
registered by *import path*, so nothing is imported, compiled or initialised until an op is
actually called with that backend.

Selection rule (see ``resolve``):

* an explicit backend (``"torch"``, ``"triton"``, ``"cuda"``, ``"cupy"``) is used or raises
  :class:`BackendUnavailable` naming the reason;
* ``"auto"`` walks the preference list of the tensor's device type (``_DEFAULT_AUTO``, among
  the backends the op has) and takes the first backend that loads and accepts the inputs; a backend that cannot load is skipped with one log
  line (once per backend and reason) and the reference is always last.

An implementation may raise :class:`NotSupported` for inputs it does not handle (a dtype, a
shape); under ``"auto"`` the next backend is tried, under an explicit backend the error is
re-raised as :class:`BackendUnavailable` with the reason.
"""
from __future__ import annotations

import importlib
import logging
import threading
from typing import Callable, Dict, List, Tuple

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "NotSupported",
    "register",
    "register_backend",
    "resolve",
    "call",
    "backend_status",
    "implementations",
]

log = logging.getLogger("kfac_kernels")

BACKENDS = ("torch", "triton", "cuda", "cupy")


class BackendUnavailable(RuntimeError):
    """A backend that was asked for by name cannot run here; the message says why."""


class NotSupported(Exception):
    """Raised by an implementation for inputs it does not handle (the message says which)."""


# op name -> backend -> "module:attr"
_IMPLS: Dict[str, Dict[str, str]] = {}
# backend -> "module:attr" of a zero-argument probe returning (ok: bool, reason: str)
_PROBES: Dict[str, str] = {}
# device type -> preference order for "auto" (ops without an implementation are left out)
_DEFAULT_AUTO = {"cuda": ("triton", "cuda", "cupy", "torch"), "cpu": ("torch",)}

_lock = threading.Lock()
_loaded: Dict[Tuple[str, str], Callable] = {}
_probe_cache: Dict[str, Tuple[bool, str]] = {}
_logged: set = set()


def _import(target: str):
    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)


def register(op: str, backend: str, target: str) -> None:
    """Register ``target`` ("package.module:function") as ``op``'s implementation for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _IMPLS.setdefault(op, {})[backend] = target


def register_backend(backend: str, probe: str) -> None:
    """Register the availability probe of a backend ("module:function" -> (ok, reason))."""
    _PROBES[backend] = probe


# The fast backends' availability probes (names only; a backend package provides
# ``probe() -> (ok, reason)`` and one function per op it implements, with the reference's
# signature, inputs already checked by the op's wrapper).
# Triton (kfac_kernels/ops/triton): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
register_backend("triton", "kfac_kernels.ops.triton:probe")
# CUDA C++ kernels (kfac_kernels._C) and cuSOLVER through CuPy.
register_backend("cuda", "kfac_kernels.ops.cuda:probe")
register_backend("cupy", "kfac_kernels.ops.cupy:probe")


def implementations(op: str) -> Dict[str, str]:
    return dict(_IMPLS.get(op, {}))


def backend_status(backend: str, *, refresh: bool = False) -> Tuple[bool, str]:
    """(usable, reason) for a backend, probed lazily and cached."""
    if backend == "torch":
        return True, "pure-torch reference"
    if backend not in BACKENDS:
        return False, f"unknown backend {backend!r}"
    with _lock:
        if not refresh and backend in _probe_cache:
            return _probe_cache[backend]
    probe = _PROBES.get(backend)
    if probe is None:
        res = (False, f"backend {backend!r} is not implemented in this build")
    else:
        try:
            res = _import(probe)()
        except Exception as exc:  # a probe must never break a caller
            res = (False, f"probe failed: {type(exc).__name__}: {exc}")
    with _lock:
        _probe_cache[backend] = res
    return res


def _load(op: str, backend: str) -> Callable:
    key = (op, backend)
    fn = _loaded.get(key)
    if fn is not None:
        return fn
    target = _IMPLS.get(op, {}).get(backend)
    if target is None:
        raise BackendUnavailable(f"op {op!r} has no {backend!r} implementation")
    ok, reason = backend_status(backend)
    if not ok:
        raise BackendUnavailable(f"backend {backend!r} is unavailable for {op!r}: {reason}")
    try:
        fn = _import(target)
    except Exception as exc:
        raise BackendUnavailable(
            f"backend {backend!r} failed to load {op!r}: {type(exc).__name__}: {exc}") from exc
    _loaded[key] = fn
    return fn


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.warning(msg)


def _device_type(device) -> str:
    return getattr(device, "type", str(device))


def candidates(op: str, backend: str, device) -> List[str]:
    if backend == "auto":
        dt = _device_type(device)
        order = _DEFAULT_AUTO.get(dt, ("torch",))
        return [b for b in order if b in _IMPLS.get(op, {})]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    return [backend]


def call(op: str, backend: str, device, *args, **kwargs):
    """Run ``op`` on the chosen backend (see the module docstring for the rule)."""
    names = candidates(op, backend, device)
    if not names:
        raise BackendUnavailable(f"op {op!r} has no implementation for backend {backend!r}")
    last_reason = None
    for name in names:
        try:
            fn = _load(op, name)
        except BackendUnavailable as exc:
            if backend != "auto":
                raise
            _log_once(f"kfac_kernels: {op}: backend {name!r} skipped ({exc}); trying the next")
            last_reason = str(exc)
            continue
        try:
            return fn(*args, **kwargs)
        except NotSupported as exc:
            if backend != "auto":
                raise BackendUnavailable(f"backend {name!r} cannot run {op!r} here: {exc}") from None
            last_reason = str(exc)
            continue
    raise BackendUnavailable(f"no backend could run {op!r}: {last_reason}")


def resolve(op: str, backend: str, device) -> str:
    """Name of the backend ``call`` would try first for ``op`` on ``device`` (loads it)."""
    for name in candidates(op, backend, device):
        try:
            _load(op, name)
            return name
        except BackendUnavailable:
            if backend != "auto":
                raise
    raise BackendUnavailable(f"no backend can run {op!r} on {device}")


def op_backend(choice: str, op: str) -> str:
    """The backend to ask for when running ``op`` under the user's ``backend=`` choice: the
    choice itself where it implements ``op`` (or is "auto"/"torch"), else "auto" (so an explicit
    backend="triton" still decomposes with whatever implements symeig)."""
    if choice in ("auto", "torch") or choice in implementations(op):
        return choice
    return "auto"

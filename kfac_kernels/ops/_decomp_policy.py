"""Which backend computes ``symeig`` / ``damped_inverse`` for CUDA tensors, per size bucket.

Why a second "auto" rule: the registry's rule (:mod:`._registry`) is one preference order per
device type, the same for every input. For the decompositions on CUDA the fastest backend depends
on the matrix size, the batch size and the method (a warm start changes it), so these ops need a
size-dependent choice; every other op keeps the registry's rule. Called only from
``_run_symeig`` and ``_run_damped_inverse`` in :mod:`.decompositions` (``inverse_root``
decomposes through ``_run_symeig``; the custom ops call the same two functions), when
``backend="auto"`` and the matrices live on a CUDA device (on other devices the registry's rule,
i.e. the pure-torch reference, runs). Each list of candidates is ordered:
``(backend, method)``; the first entry whose backend is available and accepts the inputs runs,
and the pure-torch path is always last. A backend that cannot load is skipped with one log line
per reason; a backend that declines the inputs (``NotSupported``: a size beyond its shared-memory
limit, say) is skipped silently.

THE THRESHOLDS BELOW ARE GUESSES, NOT MEASUREMENTS: no GPU was available when they were written.
They encode the expected shape of the trade-offs (cuSOLVER's batched Jacobi is tuned for n <= 32;
the one-block-per-matrix Jacobi kernel does ~10 sweeps of O(n^3) work, which beats
``torch.linalg.eigh`` only while n is small and the batch large enough to fill the GPU; the
shared-memory Cholesky kernel replaces three cuSOLVER/cuBLAS calls per matrix with one launch for
the whole stack; the tiled Cholesky kernel needs many launches and only pays off on batches of
moderate size). Re-tune them from ``benchmarks/bench_symeig.py`` and ``bench_inverse.py`` on the
target GPU (see benchmarks/README.md).
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

from . import _registry
from ._registry import BackendUnavailable

log = logging.getLogger("kfac_kernels")

# --- symeig ---------------------------------------------------------------------------------
#: cuSOLVER syevjBatched (CuPy backend) handles n <= 32 only.
CUPY_SYEVJ_MAX_N = 32
#: guess: largest n for which the Jacobi kernel is preferred over torch.linalg.eigh (cold start).
#: Reasoning: ~8 sweeps x (n - 1) rounds of ~n^2 / 2 shared-memory updates is a few ms per matrix
#: at n = 128, but every matrix of a stack runs at once on its own SM, while a batched eigh of
#: n > 32 runs one cuSOLVER syevd per matrix, one after the other.
JACOBI_AUTO_MAX_N = 128
#: guess: a warm start (prev_eigenvectors) converges in 1-3 sweeps instead of ~8, so Jacobi is
#: preferred up to its shared-memory limit (168 fp32 on an H100; the backend declines beyond).
JACOBI_WARM_AUTO_MAX_N = 168
#: guess: below this many matrices a single eigh per matrix is as fast (too few blocks for the GPU).
JACOBI_AUTO_MIN_BATCH = 2

# --- damped_inverse -------------------------------------------------------------------------
#: guess: largest n for the one-block-per-matrix Cholesky kernel (also bounded by the device's
#: shared memory, which the backend checks: 239 fp32 / 169 fp64 on an H100).
INVERSE_SMEM_AUTO_MAX_N = 160
#: guess: the tiled kernel is tried for n up to this ...
INVERSE_BLOCKED_AUTO_MAX_N = 1024
#: ... and only for stacks of at least this many matrices.
INVERSE_BLOCKED_AUTO_MIN_BATCH = 4

#: ordered (backend, method-or-variant) candidates; the first that can run the inputs runs
Candidates = List[Tuple[str, Optional[str]]]


def symeig_candidates(n: int, batch: int, method: str, warm: bool) -> Candidates:
    """Ordered (backend, method) candidates for ``symeig`` on CUDA."""
    if method == "eigh":
        return [("torch", "eigh")]
    if method == "refresh":
        return [("cuda", "refresh"), ("torch", "refresh")]
    if method == "jacobi":
        cands = [("cupy", "jacobi")] if n <= CUPY_SYEVJ_MAX_N and not warm else []
        return cands + [("cuda", "jacobi")]  # no torch fallback: torch has no Jacobi
    # method == "auto"
    cands: Candidates = []
    if batch >= JACOBI_AUTO_MIN_BATCH:
        if warm and n <= JACOBI_WARM_AUTO_MAX_N:
            cands.append(("cuda", "jacobi"))
        elif n <= CUPY_SYEVJ_MAX_N:
            cands += [("cupy", "jacobi"), ("cuda", "jacobi")]
        elif n <= JACOBI_AUTO_MAX_N:
            cands.append(("cuda", "jacobi"))
    return cands + [("torch", "eigh")]


def damped_inverse_candidates(n: int, batch: int) -> Candidates:
    """Ordered (backend, variant) candidates for ``damped_inverse`` on CUDA."""
    cands: Candidates = []
    if n <= INVERSE_SMEM_AUTO_MAX_N:
        cands.append(("cuda", "smem"))
    elif n <= INVERSE_BLOCKED_AUTO_MAX_N and batch >= INVERSE_BLOCKED_AUTO_MIN_BATCH:
        cands.append(("cuda", "blocked"))
    return cands + [("torch", None)]


_logged: set = set()


def run(op: str, cands: Candidates, device, args, kwargs, choice_kw: str) -> object:
    """Run ``op`` with the first workable entry of ``cands``; ``choice_kw`` names the keyword the
    entry's second element is passed as (``"method"`` or ``"variant"``; None entries pass none)."""
    reasons = []
    for backend, choice in cands:
        if backend != "torch":
            ok, why = _registry.backend_status(backend)
            if not ok:
                msg = f"kfac_kernels: {op}: backend {backend!r} skipped ({why})"
                if msg not in _logged:
                    _logged.add(msg)
                    log.warning(msg)
                reasons.append(f"{backend}: {why}")
                continue
        kw = dict(kwargs)
        if choice is not None:
            kw[choice_kw] = choice
        try:
            return _registry.call(op, backend, device, *args, **kw)
        except BackendUnavailable as exc:
            log.debug("kfac_kernels: %s: %s declined: %s", op, backend, exc)
            reasons.append(f"{backend}: {exc}")
    raise BackendUnavailable(f"no backend could run {op!r}: " + "; ".join(reasons))

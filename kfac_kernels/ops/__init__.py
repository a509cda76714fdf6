"""Kernel ops of kfac_kernels, usable on their own by other optimizers.

Every op is declared here once: its inputs are checked here (so backends repeat no checks), then
it runs on the backend chosen by ``backend=`` ("auto", "torch", "triton", "cuda", "cupy"; see
:mod:`kfac_kernels.ops._registry` for the rule). ``kfac_kernels.ops.reference`` holds the
pure-torch implementation of each, which is also the default.

Importing this module imports torch only: Triton, CuPy and the compiled ``_C`` module are loaded
the first time an op runs on their backend.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import _decomp_policy, _fallback, _library, _registry, reference
from ._registry import BackendUnavailable, NotSupported, backend_status
# ops already in their own module (issue 25): wrapper, checks, custom op and registrations
from .conv_factor import _conv_args, conv_input_factor, conv_input_factor_grouped
from .ekfac import ekfac_scalings, ekfac_scalings_embedding
from .gradient_factors import gradient_factor_update
from .orthogonalization import _NS_DTYPES, _newton_schulz_op, newton_schulz
from .syrk import ema_factor_update, syrk_update

_compiling = torch.compiler.is_compiling   # under dynamo, ops run as torch.library custom ops

__all__ = [
    "syrk_update",
    "ema_factor_update",
    "conv_input_factor",
    "symeig",
    "damped_inverse",
    "kron_precondition_eigen",
    "kron_precondition_inverse",
    "ekfac_precondition",
    "conv_input_factor_grouped",
    "kron_precondition_diag",
    "ekfac_scalings",
    "ekfac_scalings_embedding",
    "gradient_factor_update",
    "kron_rotate",
    "inverse_root",
    "eigenbasis_power_step",
    "newton_schulz",
    "fallback_counts",
    "reference",
    "BackendUnavailable",
    "NotSupported",
    "backend_status",
    "available_backends",
]

#: how many matrices the decompositions' repair handled in this process (see ops/_fallback.py)
fallback_counts = _fallback.counts

from ._checks import FACTOR_DTYPES as _FACTOR_DTYPES  # noqa: E402
from ._checks import INPUT_DTYPES as _INPUT_DTYPES  # noqa: E402

_OPS = ("symeig", "damped_inverse",
        "kron_precondition_eigen", "kron_precondition_inverse", "ekfac_precondition",
        "kron_precondition_diag", "kron_rotate", "inverse_root",
        "eigenbasis_power_step")
for _op in _OPS:
    _registry.register(_op, "torch", f"kfac_kernels.ops.reference:{_op}")

# Fast backends register themselves in their own package (no import happens here beyond
# recording names): see kfac_kernels/ops/_backends.py.
from . import _backends  # noqa: E402,F401


def available_backends():
    """{backend: (usable, reason)} for every backend, probing each lazily."""
    return {b: backend_status(b) for b in _registry.BACKENDS}


# ----------------------------------------------------------------------------- checks
# shared checks (ops/_checks.py), under the names this module used before the split
from ._checks import check_damping as _check_damping  # noqa: E402
from ._checks import check_number as _check_number  # noqa: E402
from ._checks import check_prev_eigenvectors as _check_prev_eigenvectors  # noqa: E402
from ._checks import check_same_device as _check_same_device  # noqa: E402
from ._checks import check_symmetric_stack as _check_symmetric_stack  # noqa: E402
from ._checks import check_tensor as _check_tensor  # noqa: E402
from ._checks import split_damping as _split_damping  # noqa: E402


# ----------------------------------------------------------------------------- decompositions
def symeig(factors: torch.Tensor, *, method: str = "auto",
           prev_eigenvectors: Optional[torch.Tensor] = None, return_info: bool = False,
           backend: str = "auto", **options):
    """Batched eigendecomposition of symmetric matrices [B, n, n] (or [n, n]).

    Returns ``(eigenvalues [B, n] ascending, eigenvectors [B, n, n])`` (eigenvectors in columns,
    ``F Q = Q diag(lam)``) and, with ``return_info``, an int32 ``info`` [B]: 0 where the matrix
    was decomposed, nonzero where it failed (1: no convergence or a failed factorisation,
    2: non-finite input, for the Jacobi solvers); failed entries hold NaN, the rest of the batch
    is unaffected. The input must be symmetric: torch and cuSOLVER read its lower triangle, the
    Jacobi kernel all of it.

    ``method``:

    * ``"auto"`` (default): the fastest path this build knows for the size and device (see
      :mod:`kfac_kernels.ops._decomp_policy`): ``torch.linalg.eigh`` on CPU; on CUDA the Jacobi
      kernels for small batched matrices, else ``torch.linalg.eigh``. ``prev_eigenvectors``, if
      given, warm-starts the Jacobi kernel.
    * ``"eigh"``: ``torch.linalg.eigh``.
    * ``"jacobi"``: batched Jacobi (CUDA kernel, warm-started from ``prev_eigenvectors`` if given,
      or cuSOLVER ``syevjBatched`` through CuPy for n <= 32); options ``tol`` (rotate while
      ``|a_pq| > tol sqrt(|a_pp a_qq|)``; defaults 1e-6 fp32 / 1e-13 fp64 for the kernel) and
      ``max_sweeps`` (default 15 for the kernel, 100 for cuSOLVER).
    * ``"refresh"``: update ``prev_eigenvectors`` (required): matrices whose previous basis still
      diagonalises them (off-diagonal mass of ``Q^T F Q`` at most ``skip_tol`` times its diagonal,
      default 1e-4, a bound on the eigen-residual) keep it; the others take one subspace-iteration
      step ``orth(F Q_prev)`` (``orth="qr"`` or ``"cholqr"``) and a Rayleigh-Ritz projection. Runs
      on every device (pure torch), with the Jacobi kernel for the projection on CUDA.

    ``backend`` as for every op ("auto", "torch", "cuda", "cupy"); backend-specific ``options``
    pass through (direct methods ignore ``tol`` / ``max_sweeps``).
    """
    _check_symmetric_stack("factors", factors)
    _check_prev_eigenvectors(factors, prev_eigenvectors)
    if method not in reference.SYMEIG_METHODS:
        raise ValueError(f"unknown symeig method {method!r}; expected auto, eigh, jacobi, refresh")
    if method == "refresh" and prev_eigenvectors is None:
        raise ValueError("method='refresh' needs prev_eigenvectors")
    if _compiling() and not options:
        lam, q, info = _library.symeig(factors, prev_eigenvectors, method, backend)
        return (lam, q, info) if return_info else (lam, q)
    return _run_symeig(factors, method, backend, prev_eigenvectors=prev_eigenvectors,
                       return_info=return_info, **options)


def _run_symeig(factors, method, backend, return_info=False, **kwargs):
    """symeig's dispatch after the checks (shared with its torch.library custom op), then the
    repair of matrices that failed on a finite input (:mod:`._fallback`)."""
    kwargs["return_info"] = True
    if backend == "auto" and factors.device.type == "cuda":
        n = factors.shape[-1]
        batch = factors.shape[0] if factors.dim() == 3 else 1
        plan = _decomp_policy.symeig_plan(n, batch, method, kwargs.get("prev_eigenvectors")
                                          is not None)
        out = _decomp_policy.run("symeig", plan, factors.device, (factors,), kwargs, "method")
    else:
        out = _registry.call("symeig", backend, factors.device, factors, method=method, **kwargs)
    lam, q, info = _fallback.repair_symeig(factors, *out)
    return (lam, q, info) if return_info else (lam, q)


def damped_inverse(factors: torch.Tensor, damping, *, return_info: bool = False,
                   backend: str = "auto"):
    """Batched ``(F + damping I)^{-1}`` of symmetric positive (semi)definite matrices by Cholesky.

    ``damping`` is a number, a 0-d tensor or a tensor [B] (one value per matrix); only the lower
    triangle of ``F`` is read. With ``return_info`` also returns an int32 ``info`` [B]: 0 on
    success, k > 0 where the leading k x k minor of ``F + damping I`` is not positive definite
    (or not finite); that matrix's inverse is NaN, the rest of the batch is unaffected. On CUDA,
    ``backend="auto"`` picks the CUDA kernels or torch by size (:mod:`._decomp_policy`).
    """
    _check_symmetric_stack("factors", factors)
    _check_damping(damping, factors.shape[:-2], factors.device)
    if _compiling():
        inv, info = _library.damped_inverse(factors, *_split_damping(damping), backend)
        return (inv, info) if return_info else inv
    return _run_damped_inverse(factors, damping, backend, return_info)


def _run_damped_inverse(factors, damping, backend, return_info):
    """damped_inverse's dispatch after the checks (shared with its torch.library custom op),
    then a float64 retry of matrices that failed on a finite input (:mod:`._fallback`)."""
    if backend == "auto" and factors.device.type == "cuda":
        n = factors.shape[-1]
        batch = factors.shape[0] if factors.dim() == 3 else 1
        plan = _decomp_policy.damped_inverse_plan(n, batch)
        inv, info = _decomp_policy.run("damped_inverse", plan, factors.device, (factors, damping),
                                       dict(return_info=True), "variant")
    else:
        inv, info = _registry.call("damped_inverse", backend, factors.device, factors, damping,
                                   return_info=True)
    inv, info = _fallback.repair_damped_inverse(
        factors, damping, inv, info,
        lambda f, d: reference.damped_inverse(f, d, return_info=True))
    return (inv, info) if return_info else inv


# ----------------------------------------------------------------------------- preconditioning
def _check_kron(V, left, right, what):
    _check_tensor("V", V, _INPUT_DTYPES, (2, 3))
    _check_tensor(what[0], left, _FACTOR_DTYPES, (V.dim(),))
    _check_tensor(what[1], right, _FACTOR_DTYPES, (V.dim(),))
    m, n = V.shape[-2:]
    if left.shape[-2:] != (m, m):
        raise ValueError(f"{what[0]} must be {m} x {m} for V of shape {tuple(V.shape)}, "
                         f"got {tuple(left.shape)}")
    if right.shape[-2:] != (n, n):
        raise ValueError(f"{what[1]} must be {n} x {n} for V of shape {tuple(V.shape)}, "
                         f"got {tuple(right.shape)}")
    if V.dim() == 3 and not (left.shape[0] == right.shape[0] == V.shape[0]):
        raise ValueError("batch sizes differ: V {}, {} {}, {} {}".format(
            V.shape[0], what[0], left.shape[0], what[1], right.shape[0]))
    if left.dtype != right.dtype:
        raise TypeError(f"{what[0]} is {left.dtype} but {what[1]} is {right.dtype}")
    _check_same_device(V=V, **{what[0]: left, what[1]: right})


def kron_precondition_eigen(V, QG, lamG, QA, lamA, damping, *, return_dot: bool = False,
                            backend: str = "auto"):
    """``U = QG [(QG^T V QA) / (lamG lamA^T + damping)] QA^T``, batched over [B, m, n] stacks.

    Eigenvalues are clamped at 0; an entry whose denominator is 0 is set to 0. Where the damping
    is 0, each factor's eigenvalues at most ``size * eps * max`` count as 0 (``torch.linalg.pinv``'s
    cut-off, eps of the eigenvectors' dtype), so ``U = pinv(G) V pinv(A)`` (docs/math.md); a
    positive damping cuts nothing. With ``return_dot`` returns ``(U, sum(U * V) per matrix)``.
    """
    _check_kron(V, QG, QA, ("QG", "QA"))
    for name, lam, q in (("lamG", lamG, QG), ("lamA", lamA, QA)):
        _check_tensor(name, lam, _FACTOR_DTYPES, (V.dim() - 1,))
        if lam.shape != q.shape[:-1]:
            raise ValueError(f"{name} has shape {tuple(lam.shape)}, expected {tuple(q.shape[:-1])}")
    _check_damping(damping, V.shape[:-2], V.device)
    if _compiling():
        U, dot = _library.kron_precondition_eigen(V, QG, lamG, QA, lamA, *_split_damping(damping),
                                                  bool(return_dot), backend)
        return (U, dot) if return_dot else U
    return _registry.call("kron_precondition_eigen", backend, V.device, V, QG, lamG, QA, lamA,
                          damping, return_dot=return_dot)


def ekfac_precondition(V, QG, QA, scalings, damping, *, return_dot: bool = False,
                       backend: str = "auto"):
    """EKFAC: ``U = QG [(QG^T V QA) / (scalings + damping)] QA^T`` with scalings [B, m, n].

    Scalings are clamped at 0; where the damping is 0 those at most ``max(m, n) * eps * max``
    count as 0 and give 0 (the pseudo-inverse, docs/math.md)."""
    _check_kron(V, QG, QA, ("QG", "QA"))
    _check_tensor("scalings", scalings, _FACTOR_DTYPES)
    if scalings.shape != V.shape:
        raise ValueError(f"scalings has shape {tuple(scalings.shape)}, V {tuple(V.shape)}")
    _check_damping(damping, V.shape[:-2], V.device)
    if _compiling():
        U, dot = _library.ekfac_precondition(V, QG, QA, scalings, *_split_damping(damping),
                                             bool(return_dot), backend)
        return (U, dot) if return_dot else U
    return _registry.call("ekfac_precondition", backend, V.device, V, QG, QA, scalings, damping,
                          return_dot=return_dot)


def kron_precondition_inverse(V, G_inv, A_inv, *, return_dot: bool = False, backend: str = "auto"):
    """``U = G_inv V A_inv``, batched over [B, m, n] stacks; ``return_dot`` as above."""
    _check_kron(V, G_inv, A_inv, ("G_inv", "A_inv"))
    if _compiling():
        U, dot = _library.kron_precondition_inverse(V, G_inv, A_inv, bool(return_dot), backend)
        return (U, dot) if return_dot else U
    return _registry.call("kron_precondition_inverse", backend, V.device, V, G_inv, A_inv,
                          return_dot=return_dot)


# ----------------------------------------------------------------------------- layer-specific ops
def kron_precondition_diag(V, QG, scalings, damping, *, return_dot: bool = False,
                           backend: str = "auto"):
    """``U = QG [(QG^T V) / (scalings + damping)]`` for blocks whose right factor is diagonal
    (an embedding's A): its eigenbasis is the identity and is never formed. ``scalings`` [.., m, n]
    is ``lamG lamA^T`` for K-FAC, the corrected eigenvalues for EKFAC. Batched over [B, m, n].
    Scalings are clamped at 0 and, where the damping is 0, cut as in :func:`ekfac_precondition`."""
    _check_tensor("V", V, _INPUT_DTYPES, (2, 3))
    _check_tensor("QG", QG, _FACTOR_DTYPES, (V.dim(),))
    _check_tensor("scalings", scalings, _FACTOR_DTYPES, (V.dim(),))
    m = V.shape[-2]
    if QG.shape[-2:] != (m, m):
        raise ValueError(f"QG must be {m} x {m} for V of shape {tuple(V.shape)}, got "
                         f"{tuple(QG.shape)}")
    if scalings.shape != V.shape:
        raise ValueError(f"scalings has shape {tuple(scalings.shape)}, V {tuple(V.shape)}")
    if V.dim() == 3 and QG.shape[0] != V.shape[0]:
        raise ValueError(f"batch sizes differ: V {V.shape[0]}, QG {QG.shape[0]}")
    _check_same_device(V=V, QG=QG, scalings=scalings)
    _check_damping(damping, V.shape[:-2], V.device)
    if _compiling():
        U, dot = _library.kron_precondition_diag(V, QG, scalings, *_split_damping(damping),
                                                 bool(return_dot), backend)
        return (U, dot) if return_dot else U
    return _registry.call("kron_precondition_diag", backend, V.device, V, QG, scalings, damping,
                          return_dot=return_dot)


# ----------------------------------------------------------------------------- optimizer ops
# What Shampoo and SOAP (kfac_kernels.optim) are built from; usable by any other optimizer.
def kron_rotate(V: torch.Tensor, QL: Optional[torch.Tensor], QR: Optional[torch.Tensor], *,
                back: bool = False, backend: str = "auto") -> torch.Tensor:
    """``QL^T V QR`` (into the eigenbases), or with ``back=True`` ``QL V QR^T`` (out of them),
    batched over [B, m, n] stacks: SOAP's projections, two batched GEMMs.

    ``QL`` [.., m, m] / ``QR`` [.., n, n] are fp32/fp64 (same dtype); None stands for the identity
    (one of them must be given). ``V`` may be any float dtype; the result is a new tensor in the
    bases' dtype. The Triton backend reads transposed operands through strides (no copies).
    """
    _check_tensor("V", V, _INPUT_DTYPES, (2, 3))
    if QL is None and QR is None:
        raise ValueError("kron_rotate needs QL, QR or both (None is the identity; with both None "
                         "there is nothing to rotate)")
    m, n = V.shape[-2:]
    for name, q, size in (("QL", QL, m), ("QR", QR, n)):
        if q is None:
            continue
        _check_tensor(name, q, _FACTOR_DTYPES, (V.dim(),))
        if q.shape[-2:] != (size, size):
            raise ValueError(f"{name} must be {size} x {size} for V of shape {tuple(V.shape)}, "
                             f"got {tuple(q.shape)}")
        if V.dim() == 3 and q.shape[0] != V.shape[0]:
            raise ValueError(f"batch sizes differ: V {V.shape[0]}, {name} {q.shape[0]}")
    if QL is not None and QR is not None and QL.dtype != QR.dtype:
        raise TypeError(f"QL is {QL.dtype} but QR is {QR.dtype}; use one dtype for both bases")
    _check_same_device(V=V, QL=QL, QR=QR)
    if _compiling():
        return _library.kron_rotate(V, QL, QR, bool(back), backend)
    return _registry.call("kron_rotate", backend, V.device, V, QL, QR, back=bool(back))


def inverse_root(factors: torch.Tensor, root: float, *, epsilon: float = 0.0,
                 method: str = "eigh", prev_eigenvectors: Optional[torch.Tensor] = None,
                 return_eigenvectors: bool = False, backend: str = "auto"):
    """Batched inverse p-th roots ``(F + epsilon I)^(-1/root)`` of symmetric positive
    semidefinite matrices [B, n, n] (or [n, n]), Shampoo's ``L^(-1/4)``.

    The eigendecomposition runs through :func:`symeig` (``method`` "eigh", "auto", "jacobi" or
    the warm-started "refresh" from ``prev_eigenvectors``; ``backend`` as for symeig, so the
    CUDA kernels apply on GPUs); eigenvalues are clamped at 0 before ``epsilon`` is added, and a
    direction whose shifted eigenvalue is 0 (``epsilon=0``) contributes 0, as a pseudo-inverse.
    Returns a new tensor, and with ``return_eigenvectors`` also the eigenvectors (to warm-start
    the next call). A matrix whose decomposition fails gives NaN (the rest of the batch does not).
    """
    _check_symmetric_stack("factors", factors)
    if isinstance(root, bool) or not isinstance(root, numbers.Real) or not root > 0:
        raise ValueError(f"root must be a positive number (4 for Shampoo's L^(-1/4)), got {root!r}")
    _check_number("epsilon", epsilon)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    _check_prev_eigenvectors(factors, prev_eigenvectors)
    if method not in reference.SYMEIG_METHODS:
        raise ValueError(f"unknown method {method!r}; expected auto, eigh, jacobi, refresh")
    if method == "refresh" and prev_eigenvectors is None:
        raise ValueError("method='refresh' needs prev_eigenvectors (the previous call's "
                         "eigenvectors: pass return_eigenvectors=True there)")
    if _compiling():
        out, q = _library.inverse_root(factors, float(root), float(epsilon), method,
                                       prev_eigenvectors, backend)
        return (out, q) if return_eigenvectors else out
    out, q = _run_inverse_root(factors, float(root), float(epsilon), method, prev_eigenvectors,
                               backend)
    return (out, q) if return_eigenvectors else out


def _run_inverse_root(factors, root, epsilon, method, prev_eigenvectors, backend):
    """inverse_root after the checks: symeig's dispatch (with its repair of failed matrices),
    then the root from the eigenpairs (``reference.inverse_root`` is the same two steps)."""
    lam, q = _run_symeig(factors, method, _registry.op_backend(backend, "symeig"),
                         prev_eigenvectors=prev_eigenvectors)
    return reference.root_from_eig(lam, q, root, epsilon), q


def eigenbasis_power_step(factors: torch.Tensor, Q: torch.Tensor, *,
                          shift: Optional[float] = None, backend: str = "auto"):
    """SOAP's eigenbasis refresh: one warm-started power-iteration step ``Q' = orth(F Q)``
    (Householder QR), batched over [B, n, n]; see :func:`reference.eigenbasis_power_step` for
    the column order, signs and the ``shift`` that keeps a rank-deficient factor's null columns.

    Returns ``(Q', d)`` with ``d = diag(Q^T F Q)`` [B, n], the eigenvalue estimates of the old
    basis. Runs on torch (``torch.linalg.qr``) on every device.
    """
    _check_symmetric_stack("factors", factors)
    _check_tensor("Q", Q, _FACTOR_DTYPES)
    if Q.shape != factors.shape:
        raise ValueError(f"Q has shape {tuple(Q.shape)}, factors {tuple(factors.shape)}: one "
                         f"square basis per factor")
    _check_same_device(factors=factors, Q=Q)
    if shift is not None:
        _check_number("shift", shift)
        if shift < 0:
            raise ValueError(f"shift must be >= 0, got {shift}")
    if _compiling():
        return _library.eigenbasis_power_step(factors, Q, shift, backend)
    return _registry.call("eigenbasis_power_step", backend, factors.device, factors, Q,
                          shift=shift)

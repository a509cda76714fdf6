"""The decompositions: ``symeig``, ``damped_inverse``, ``inverse_root`` and
``eigenbasis_power_step`` (wrappers, checks, ``torch.library`` custom ops and fakes, backend
registrations).

Reference: :mod:`kfac_kernels.ops.reference`; CUDA kernels (``ops/cuda``): ``symeig`` and
``damped_inverse``; cuSOLVER through CuPy (``ops/cupy``): ``symeig``. ``inverse_root``
decomposes through ``symeig``'s backends; ``eigenbasis_power_step`` is torch (QR) everywhere.

Two pieces stay in their own modules because they are a rule of their own, not one op's code:
:mod:`._decomp_policy`, the size-dependent "auto" choice on CUDA (the second dispatch rule, used
by ``_run_symeig`` and ``_run_damped_inverse`` below), and :mod:`._fallback`, the repair of
matrices that failed on a finite input. The module is not named after an op: ``symeig`` etc. are
the functions of :mod:`kfac_kernels.ops`.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, cast

import torch
from torch import Tensor
from torch.library import custom_op

from . import _decomp_policy, _fallback, _registry, reference
from ._checks import (FACTOR_DTYPES, check_damping, check_number, check_prev_eigenvectors,
                      check_same_device, check_symmetric_stack, check_tensor, compiling,
                      join_damping, split_damping)
from ._library import NAMESPACE, fresh

_registry.register("symeig", "torch", "kfac_kernels.ops.reference:symeig")
_registry.register("damped_inverse", "torch", "kfac_kernels.ops.reference:damped_inverse")
_registry.register("inverse_root", "torch", "kfac_kernels.ops.reference:inverse_root")
_registry.register("eigenbasis_power_step", "torch",
                   "kfac_kernels.ops.reference:eigenbasis_power_step")
# CUDA C++ kernels (kfac_kernels._C) and cuSOLVER through CuPy. On CUDA tensors with
# backend="auto" these two ops follow _decomp_policy's candidate lists, not the registry's order.
_registry.register("symeig", "cuda", "kfac_kernels.ops.cuda.symeig:symeig")
_registry.register("damped_inverse", "cuda", "kfac_kernels.ops.cuda.damped_inverse:damped_inverse")
_registry.register("symeig", "cupy", "kfac_kernels.ops.cupy.symeig:symeig")


# ----------------------------------------------------------------------------- symeig
@custom_op(f"{NAMESPACE}::symeig", mutates_args=())
def _symeig_op(factors: Tensor, prev_eigenvectors: Optional[Tensor], method: str,
               backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    lam, q, info = _run_symeig(factors, method, backend, prev_eigenvectors=prev_eigenvectors,
                               return_info=True)
    return fresh(lam), fresh(q), fresh(info.to(torch.int32))


@_symeig_op.register_fake
def _(factors, prev_eigenvectors, method, backend):
    return (factors.new_empty(factors.shape[:-1]), factors.new_empty(factors.shape),
            factors.new_empty(factors.shape[:-2], dtype=torch.int32))


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
    pass through (direct methods ignore ``tol`` / ``max_sweeps``). Under ``torch.compile`` a call
    with ``options`` has no custom-op schema and is traced as ordinary Python.
    """
    check_symmetric_stack("factors", factors)
    check_prev_eigenvectors(factors, prev_eigenvectors)
    if method not in reference.SYMEIG_METHODS:
        raise ValueError(f"unknown symeig method {method!r}; expected auto, eigh, jacobi, refresh")
    if method == "refresh" and prev_eigenvectors is None:
        raise ValueError("method='refresh' needs prev_eigenvectors")
    if compiling() and not options:
        lam, q, info = _symeig_op(factors, prev_eigenvectors, method, backend)
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
        cands = _decomp_policy.symeig_candidates(n, batch, method, kwargs.get("prev_eigenvectors")
                                          is not None)
        out = cast(Tuple[Tensor, Tensor, Tensor],
                   _decomp_policy.run("symeig", cands, factors.device, (factors,), kwargs,
                                      "method"))
    else:
        out = _registry.call("symeig", backend, factors.device, factors, method=method, **kwargs)
    lam, q, info = _fallback.repair_symeig(factors, *out)
    return (lam, q, info) if return_info else (lam, q)


# ----------------------------------------------------------------------------- damped_inverse
@custom_op(f"{NAMESPACE}::damped_inverse", mutates_args=())
def _damped_inverse_op(factors: Tensor, damping_t: Optional[Tensor],
                       damping_f: float, backend: str) -> Tuple[Tensor, Tensor]:
    inv, info = _run_damped_inverse(factors, join_damping(damping_t, damping_f), backend, True)
    return fresh(inv), fresh(info.to(torch.int32))


@_damped_inverse_op.register_fake
def _(factors, damping_t, damping_f, backend):
    return (factors.new_empty(factors.shape),
            factors.new_empty(factors.shape[:-2], dtype=torch.int32))


def damped_inverse(factors: torch.Tensor, damping, *, return_info: bool = False,
                   backend: str = "auto"):
    """Batched ``(F + damping I)^{-1}`` of symmetric positive (semi)definite matrices by Cholesky.

    ``damping`` is a number, a 0-d tensor or a tensor [B] (one value per matrix); only the lower
    triangle of ``F`` is read. With ``return_info`` also returns an int32 ``info`` [B]: 0 on
    success, k > 0 where the leading k x k minor of ``F + damping I`` is not positive definite
    (or not finite); that matrix's inverse is NaN, the rest of the batch is unaffected. On CUDA,
    ``backend="auto"`` picks the CUDA kernels or torch by size (:mod:`._decomp_policy`).
    """
    check_symmetric_stack("factors", factors)
    check_damping(damping, factors.shape[:-2], factors.device)
    if compiling():
        inv, info = _damped_inverse_op(factors, *split_damping(damping), backend)
        return (inv, info) if return_info else inv
    return _run_damped_inverse(factors, damping, backend, return_info)


def _run_damped_inverse(factors, damping, backend, return_info):
    """damped_inverse's dispatch after the checks (shared with its torch.library custom op),
    then a float64 retry of matrices that failed on a finite input (:mod:`._fallback`)."""
    if backend == "auto" and factors.device.type == "cuda":
        n = factors.shape[-1]
        batch = factors.shape[0] if factors.dim() == 3 else 1
        cands = _decomp_policy.damped_inverse_candidates(n, batch)
        inv, info = cast(Tuple[Tensor, Tensor],
                         _decomp_policy.run("damped_inverse", cands, factors.device,
                                            (factors, damping), dict(return_info=True),
                                            "variant"))
    else:
        inv, info = _registry.call("damped_inverse", backend, factors.device, factors, damping,
                                   return_info=True)
    inv, info = _fallback.repair_damped_inverse(
        factors, damping, inv, info,
        lambda f, d: reference.damped_inverse(f, d, return_info=True))
    return (inv, info) if return_info else inv


# ----------------------------------------------------------------------------- inverse_root
@custom_op(f"{NAMESPACE}::inverse_root", mutates_args=())
def _inverse_root_op(factors: Tensor, root: float, epsilon: float, method: str,
                     prev_eigenvectors: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    out, q = _run_inverse_root(factors, root, epsilon, method, prev_eigenvectors, backend)
    return fresh(out), fresh(q)


@_inverse_root_op.register_fake
def _(factors, root, epsilon, method, prev_eigenvectors, backend):
    return factors.new_empty(factors.shape), factors.new_empty(factors.shape)


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
    check_symmetric_stack("factors", factors)
    if isinstance(root, bool) or not isinstance(root, numbers.Real) or not root > 0:
        raise ValueError(f"root must be a positive number (4 for Shampoo's L^(-1/4)), got {root!r}")
    check_number("epsilon", epsilon)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    check_prev_eigenvectors(factors, prev_eigenvectors)
    if method not in reference.SYMEIG_METHODS:
        raise ValueError(f"unknown method {method!r}; expected auto, eigh, jacobi, refresh")
    if method == "refresh" and prev_eigenvectors is None:
        raise ValueError("method='refresh' needs prev_eigenvectors (the previous call's "
                         "eigenvectors: pass return_eigenvectors=True there)")
    if compiling():
        out, q = _inverse_root_op(factors, float(root), float(epsilon), method,
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


# ----------------------------------------------------------------------------- power step
@custom_op(f"{NAMESPACE}::eigenbasis_power_step", mutates_args=())
def _eigenbasis_power_step_op(factors: Tensor, Q: Tensor, shift: Optional[float],
                              backend: str) -> Tuple[Tensor, Tensor]:
    q, d = _registry.call("eigenbasis_power_step", backend, factors.device, factors, Q,
                          shift=shift)
    return fresh(q), fresh(d)


@_eigenbasis_power_step_op.register_fake
def _(factors, Q, shift, backend):
    return factors.new_empty(factors.shape), factors.new_empty(factors.shape[:-1])


def eigenbasis_power_step(factors: torch.Tensor, Q: torch.Tensor, *,
                          shift: Optional[float] = None, backend: str = "auto"):
    """SOAP's eigenbasis refresh: one warm-started power-iteration step ``Q' = orth(F Q)``
    (Householder QR), batched over [B, n, n]; see :func:`reference.eigenbasis_power_step` for
    the column order, signs and the ``shift`` that keeps a rank-deficient factor's null columns.

    Returns ``(Q', d)`` with ``d = diag(Q^T F Q)`` [B, n], the eigenvalue estimates of the old
    basis. Runs on torch (``torch.linalg.qr``) on every device.
    """
    check_symmetric_stack("factors", factors)
    check_tensor("Q", Q, FACTOR_DTYPES)
    if Q.shape != factors.shape:
        raise ValueError(f"Q has shape {tuple(Q.shape)}, factors {tuple(factors.shape)}: one "
                         f"square basis per factor")
    check_same_device(factors=factors, Q=Q)
    if shift is not None:
        check_number("shift", shift)
        if shift < 0:
            raise ValueError(f"shift must be >= 0, got {shift}")
    if compiling():
        return _eigenbasis_power_step_op(factors, Q, shift, backend)
    return _registry.call("eigenbasis_power_step", backend, factors.device, factors, Q,
                          shift=shift)

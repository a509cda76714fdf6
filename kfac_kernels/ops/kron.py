"""The Kronecker-factored products: ``kron_precondition_eigen``, ``ekfac_precondition``,
``kron_precondition_inverse``, ``kron_precondition_diag`` and ``kron_rotate`` (wrappers, checks,
``torch.library`` custom ops and fakes, backend registrations).

Reference: :mod:`kfac_kernels.ops.reference`; Triton: ``ops/triton/kron.py`` (batched GEMMs with
the eigenvalue division and the ``sum(U * V)`` reduction in their epilogues; ``kron_rotate`` on
the same GEMM kernel). ``kron_precondition_diag`` is reference only. No op is named ``kron``, so
the module and the functions of :mod:`kfac_kernels.ops` do not share a name.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.library import custom_op

from . import _registry
from ._checks import (FACTOR_DTYPES, INPUT_DTYPES, check_damping, check_same_device,
                      check_tensor, compiling, join_damping, split_damping)
from ._library import NAMESPACE, fresh

_registry.register("kron_precondition_eigen", "torch",
                   "kfac_kernels.ops.reference:kron_precondition_eigen")
_registry.register("kron_precondition_inverse", "torch",
                   "kfac_kernels.ops.reference:kron_precondition_inverse")
_registry.register("ekfac_precondition", "torch", "kfac_kernels.ops.reference:ekfac_precondition")
_registry.register("kron_precondition_diag", "torch",
                   "kfac_kernels.ops.reference:kron_precondition_diag")
_registry.register("kron_rotate", "torch", "kfac_kernels.ops.reference:kron_rotate")
_registry.register("kron_precondition_eigen", "triton",
                   "kfac_kernels.ops.triton.kron:kron_precondition_eigen")
_registry.register("ekfac_precondition", "triton",
                   "kfac_kernels.ops.triton.kron:ekfac_precondition")
_registry.register("kron_precondition_inverse", "triton",
                   "kfac_kernels.ops.triton.kron:kron_precondition_inverse")
_registry.register("kron_rotate", "triton", "kfac_kernels.ops.triton.kron:kron_rotate")


def _empty_dot(ref: Tensor, batch, dtype, return_dot: bool) -> Tensor:
    """The custom ops' second output: ``sum(U * V)`` per matrix, or an empty placeholder
    (a custom op returns a fixed number of tensors) when ``return_dot`` is False."""
    shape = tuple(batch) if return_dot else (0,)
    return ref.new_empty(shape, dtype=dtype)


def _check_kron(V, left, right, what):
    """``V`` [.., m, n] between ``left`` [.., m, m] and ``right`` [.., n, n] (names in ``what``)."""
    check_tensor("V", V, INPUT_DTYPES, (2, 3))
    check_tensor(what[0], left, FACTOR_DTYPES, (V.dim(),))
    check_tensor(what[1], right, FACTOR_DTYPES, (V.dim(),))
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
    check_same_device(V=V, **{what[0]: left, what[1]: right})


# -------------------------------------------------------------------------- kron_precondition_eigen
@custom_op(f"{NAMESPACE}::kron_precondition_eigen", mutates_args=())
def _kron_precondition_eigen_op(V: Tensor, QG: Tensor, lamG: Tensor, QA: Tensor, lamA: Tensor,
                                damping_t: Optional[Tensor], damping_f: float, return_dot: bool,
                                backend: str) -> Tuple[Tensor, Tensor]:
    res = _registry.call("kron_precondition_eigen", backend, V.device, V, QG, lamG, QA, lamA,
                         join_damping(damping_t, damping_f), return_dot=return_dot)
    U, dot = res if return_dot else (res, _empty_dot(V, (), QG.dtype, False))
    return fresh(U), fresh(dot)


@_kron_precondition_eigen_op.register_fake
def _(V, QG, lamG, QA, lamA, damping_t, damping_f, return_dot, backend):
    return torch.empty_like(V), _empty_dot(V, V.shape[:-2], QG.dtype, return_dot)


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
        check_tensor(name, lam, FACTOR_DTYPES, (V.dim() - 1,))
        if lam.shape != q.shape[:-1]:
            raise ValueError(f"{name} has shape {tuple(lam.shape)}, expected {tuple(q.shape[:-1])}")
    check_damping(damping, V.shape[:-2], V.device)
    if compiling():
        U, dot = _kron_precondition_eigen_op(V, QG, lamG, QA, lamA, *split_damping(damping),
                                             bool(return_dot), backend)
        return (U, dot) if return_dot else U
    return _registry.call("kron_precondition_eigen", backend, V.device, V, QG, lamG, QA, lamA,
                          damping, return_dot=return_dot)


# ------------------------------------------------------------------------------- ekfac_precondition
@custom_op(f"{NAMESPACE}::ekfac_precondition", mutates_args=())
def _ekfac_precondition_op(V: Tensor, QG: Tensor, QA: Tensor, scalings: Tensor,
                           damping_t: Optional[Tensor], damping_f: float, return_dot: bool,
                           backend: str) -> Tuple[Tensor, Tensor]:
    res = _registry.call("ekfac_precondition", backend, V.device, V, QG, QA, scalings,
                         join_damping(damping_t, damping_f), return_dot=return_dot)
    U, dot = res if return_dot else (res, _empty_dot(V, (), QG.dtype, False))
    return fresh(U), fresh(dot)


@_ekfac_precondition_op.register_fake
def _(V, QG, QA, scalings, damping_t, damping_f, return_dot, backend):
    return torch.empty_like(V), _empty_dot(V, V.shape[:-2], QG.dtype, return_dot)


def ekfac_precondition(V, QG, QA, scalings, damping, *, return_dot: bool = False,
                       backend: str = "auto"):
    """EKFAC: ``U = QG [(QG^T V QA) / (scalings + damping)] QA^T`` with scalings [B, m, n].

    Scalings are clamped at 0; where the damping is 0 those at most ``max(m, n) * eps * max``
    count as 0 and give 0 (the pseudo-inverse, docs/math.md)."""
    _check_kron(V, QG, QA, ("QG", "QA"))
    check_tensor("scalings", scalings, FACTOR_DTYPES)
    if scalings.shape != V.shape:
        raise ValueError(f"scalings has shape {tuple(scalings.shape)}, V {tuple(V.shape)}")
    check_damping(damping, V.shape[:-2], V.device)
    if compiling():
        U, dot = _ekfac_precondition_op(V, QG, QA, scalings, *split_damping(damping),
                                        bool(return_dot), backend)
        return (U, dot) if return_dot else U
    return _registry.call("ekfac_precondition", backend, V.device, V, QG, QA, scalings, damping,
                          return_dot=return_dot)


# ------------------------------------------------------------------------ kron_precondition_inverse
@custom_op(f"{NAMESPACE}::kron_precondition_inverse", mutates_args=())
def _kron_precondition_inverse_op(V: Tensor, G_inv: Tensor, A_inv: Tensor, return_dot: bool,
                                  backend: str) -> Tuple[Tensor, Tensor]:
    res = _registry.call("kron_precondition_inverse", backend, V.device, V, G_inv, A_inv,
                         return_dot=return_dot)
    U, dot = res if return_dot else (res, _empty_dot(V, (), G_inv.dtype, False))
    return fresh(U), fresh(dot)


@_kron_precondition_inverse_op.register_fake
def _(V, G_inv, A_inv, return_dot, backend):
    return torch.empty_like(V), _empty_dot(V, V.shape[:-2], G_inv.dtype, return_dot)


def kron_precondition_inverse(V, G_inv, A_inv, *, return_dot: bool = False, backend: str = "auto"):
    """``U = G_inv V A_inv``, batched over [B, m, n] stacks; ``return_dot`` as above."""
    _check_kron(V, G_inv, A_inv, ("G_inv", "A_inv"))
    if compiling():
        U, dot = _kron_precondition_inverse_op(V, G_inv, A_inv, bool(return_dot), backend)
        return (U, dot) if return_dot else U
    return _registry.call("kron_precondition_inverse", backend, V.device, V, G_inv, A_inv,
                          return_dot=return_dot)


# --------------------------------------------------------------------------- kron_precondition_diag
@custom_op(f"{NAMESPACE}::kron_precondition_diag", mutates_args=())
def _kron_precondition_diag_op(V: Tensor, QG: Tensor, scalings: Tensor,
                               damping_t: Optional[Tensor], damping_f: float, return_dot: bool,
                               backend: str) -> Tuple[Tensor, Tensor]:
    res = _registry.call("kron_precondition_diag", backend, V.device, V, QG, scalings,
                         join_damping(damping_t, damping_f), return_dot=return_dot)
    U, dot = res if return_dot else (res, _empty_dot(V, (), QG.dtype, False))
    return fresh(U), fresh(dot)


@_kron_precondition_diag_op.register_fake
def _(V, QG, scalings, damping_t, damping_f, return_dot, backend):
    return torch.empty_like(V), _empty_dot(V, V.shape[:-2], QG.dtype, return_dot)


def kron_precondition_diag(V, QG, scalings, damping, *, return_dot: bool = False,
                           backend: str = "auto"):
    """``U = QG [(QG^T V) / (scalings + damping)]`` for blocks whose right factor is diagonal
    (an embedding's A): its eigenbasis is the identity and is never formed. ``scalings`` [.., m, n]
    is ``lamG lamA^T`` for K-FAC, the corrected eigenvalues for EKFAC. Batched over [B, m, n].
    Scalings are clamped at 0 and, where the damping is 0, cut as in :func:`ekfac_precondition`."""
    check_tensor("V", V, INPUT_DTYPES, (2, 3))
    check_tensor("QG", QG, FACTOR_DTYPES, (V.dim(),))
    check_tensor("scalings", scalings, FACTOR_DTYPES, (V.dim(),))
    m = V.shape[-2]
    if QG.shape[-2:] != (m, m):
        raise ValueError(f"QG must be {m} x {m} for V of shape {tuple(V.shape)}, got "
                         f"{tuple(QG.shape)}")
    if scalings.shape != V.shape:
        raise ValueError(f"scalings has shape {tuple(scalings.shape)}, V {tuple(V.shape)}")
    if V.dim() == 3 and QG.shape[0] != V.shape[0]:
        raise ValueError(f"batch sizes differ: V {V.shape[0]}, QG {QG.shape[0]}")
    check_same_device(V=V, QG=QG, scalings=scalings)
    check_damping(damping, V.shape[:-2], V.device)
    if compiling():
        U, dot = _kron_precondition_diag_op(V, QG, scalings, *split_damping(damping),
                                            bool(return_dot), backend)
        return (U, dot) if return_dot else U
    return _registry.call("kron_precondition_diag", backend, V.device, V, QG, scalings, damping,
                          return_dot=return_dot)


# -------------------------------------------------------------------------------------- kron_rotate
# SOAP's projections (kfac_kernels.optim); usable by any other optimizer.
@custom_op(f"{NAMESPACE}::kron_rotate", mutates_args=())
def _kron_rotate_op(V: Tensor, QL: Optional[Tensor], QR: Optional[Tensor], back: bool,
                    backend: str) -> Tensor:
    return fresh(_registry.call("kron_rotate", backend, V.device, V, QL, QR, back=back))


@_kron_rotate_op.register_fake
def _(V, QL, QR, back, backend):
    return V.new_empty(V.shape, dtype=(QL if QL is not None else QR).dtype)


def kron_rotate(V: torch.Tensor, QL: Optional[torch.Tensor], QR: Optional[torch.Tensor], *,
                back: bool = False, backend: str = "auto") -> torch.Tensor:
    """``QL^T V QR`` (into the eigenbases), or with ``back=True`` ``QL V QR^T`` (out of them),
    batched over [B, m, n] stacks: SOAP's projections, two batched GEMMs.

    ``QL`` [.., m, m] / ``QR`` [.., n, n] are fp32/fp64 (same dtype); None stands for the identity
    (one of them must be given). ``V`` may be any float dtype; the result is a new tensor in the
    bases' dtype. The Triton backend reads transposed operands through strides (no copies).
    """
    check_tensor("V", V, INPUT_DTYPES, (2, 3))
    if QL is None and QR is None:
        raise ValueError("kron_rotate needs QL, QR or both (None is the identity; with both None "
                         "there is nothing to rotate)")
    m, n = V.shape[-2:]
    for name, q, size in (("QL", QL, m), ("QR", QR, n)):
        if q is None:
            continue
        check_tensor(name, q, FACTOR_DTYPES, (V.dim(),))
        if q.shape[-2:] != (size, size):
            raise ValueError(f"{name} must be {size} x {size} for V of shape {tuple(V.shape)}, "
                             f"got {tuple(q.shape)}")
        if V.dim() == 3 and q.shape[0] != V.shape[0]:
            raise ValueError(f"batch sizes differ: V {V.shape[0]}, {name} {q.shape[0]}")
    if QL is not None and QR is not None and QL.dtype != QR.dtype:
        raise TypeError(f"QL is {QL.dtype} but QR is {QR.dtype}; use one dtype for both bases")
    check_same_device(V=V, QL=QL, QR=QR)
    if compiling():
        return _kron_rotate_op(V, QL, QR, bool(back), backend)
    return _registry.call("kron_rotate", backend, V.device, V, QL, QR, back=bool(back))

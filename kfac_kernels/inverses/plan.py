"""The per-step plan of a shape group: what depends only on the decompositions, built once.

A step without factor or inverse work preconditions every shape group with the same
decompositions and the same damping, so everything that depends on those alone (the reciprocal
of the damped eigenvalue products with the pseudo-inverse cut-off, the pi terms, transposed
views, one-matrix stacks as plain matrices) is computed when the decompositions change (or the
damping does) instead of in every step. What is left per step and group is

    U = Lo ((Li V Ri) * R) Ro,   <U, V>

with one ``mm`` (a group of one matrix) or ``bmm`` per product and any absent term skipped:
eigh with eigenvalue damping ``QG [(QG^T V QA) * R] QA^T`` (four products: the damped
eigenvalue products do not factorise), EKFAC the same with ``R = 1 / (S + gamma)``; pi damping
factorises, so eigh builds the damped inverses ``QG diag(1/(lamG + g)) QG^T`` once and a step is
two products ``G^-1 V A^-1``, as cholesky's is; a diagonal A ``QG [(QG^T V) * R]``. Plans that
read what a factor update changes (pi from the running factors, EKFAC's scalings) are rebuilt
after every factor update. The plan is the torch backend's path: the
kinds build one only where the preconditioning op resolves to the torch backend and outside
``torch.compile`` (which sees the ops as custom ops); elsewhere the op is called. It computes the
same quantity as the op's reference (``ops.reference``) up to rounding (``x * (1/d)`` for
``x / d``); tests/test_plan.py compares them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.reference import pinv_cut

__all__ = ["StepPlan", "reciprocal_or_zero", "eigen_reciprocal", "damped_inverse_from_eigh",
           "two_sided"]


def reciprocal_or_zero(denom: torch.Tensor) -> torch.Tensor:
    """``1 / denom`` where ``denom > 0``, else 0 (the pseudo-inverse on the null space)."""
    return torch.where(denom > 0, denom.reciprocal(), torch.zeros((), dtype=denom.dtype,
                                                                   device=denom.device))


def eigen_reciprocal(lamG: torch.Tensor, lamA: torch.Tensor, damping: float) -> torch.Tensor:
    """``1 / (cut(lamG) cut(lamA)^T + damping)`` with the op's cut-off (``ops.reference.pinv_cut``:
    eigenvalues clamped at 0; at damping 0 those at most ``size eps max`` count as 0)."""
    denom = pinv_cut(lamG, damping, 1).unsqueeze(-1) * pinv_cut(lamA, damping, 1).unsqueeze(-2)
    if damping:
        denom = denom + float(damping)
    return reciprocal_or_zero(denom)


def damped_inverse_from_eigh(Q: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``Q diag(1 / cut(lam)) Q^T`` (``cut``: the op's pseudo-inverse cut-off at damping 0,
    ``ops.reference.pinv_cut``; an eigenvalue cut to 0 contributes 0)."""
    r = reciprocal_or_zero(pinv_cut(lam, 0.0, 1))
    return (Q * r.unsqueeze(-2)) @ Q.transpose(-1, -2)


class StepPlan:
    """``V -> (U, <U, V>)`` for one shape group (see the module docstring). Matrices are [m, n]
    for a group of one unstacked matrix, else [B, m, n]; ``dtype`` is the decompositions'."""

    __slots__ = ("dtype", "Li", "Ri", "R", "Lo", "Ro", "dims")
    _TERMS = ("Li", "Ri", "R", "Lo", "Ro")

    def __init__(self, dtype: torch.dtype, *, Li=None, Ri=None, R=None, Lo=None, Ro=None,
                 batched: bool):
        self.dtype = dtype
        self.Li, self.Ri, self.R, self.Lo, self.Ro = Li, Ri, R, Lo, Ro
        self.dims = (-2, -1) if batched else None

    def single(self) -> "StepPlan":
        """The plan of a group of one unstacked matrix: [m, n] operands, ``mm`` instead of
        ``bmm``, a 0-d dot."""
        terms = {k: (None if getattr(self, k) is None else getattr(self, k)[0])
                 for k in self._TERMS}
        return StepPlan(self.dtype, batched=False, **terms)

    def __call__(self, V: torch.Tensor):
        Vw = V if V.dtype == self.dtype else V.to(self.dtype)
        mm = torch.mm if Vw.dim() == 2 else torch.bmm
        T = Vw
        if self.Li is not None:
            T = mm(self.Li, T)
        if self.Ri is not None:
            T = mm(T, self.Ri)
        if self.R is not None:
            T = T * self.R
        if self.Lo is not None:
            T = mm(self.Lo, T)
        if self.Ro is not None:
            T = mm(T, self.Ro)
        prod = T * Vw
        dot = prod.sum() if self.dims is None else prod.sum(self.dims)
        return (T if T.dtype == V.dtype else T.to(V.dtype)), dot


def two_sided(QG: torch.Tensor, QA: Optional[torch.Tensor], R: Optional[torch.Tensor],
              batched: bool) -> StepPlan:
    """The plan ``QG [(QG^T V QA) * R] QA^T`` (``QA`` None: a diagonal A, identity basis)."""
    return StepPlan(QG.dtype, Li=QG.transpose(-1, -2), Ri=QA, R=R, Lo=QG,
                    Ro=None if QA is None else QA.transpose(-1, -2), batched=batched)

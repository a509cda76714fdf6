"""Inverse kinds: how a block's factors are decomposed, what is stored, how it preconditions.

One class per kind, each in its own file; :data:`KINDS` maps the ``inverse=`` option to it. A
new kind is a new file with an :class:`InverseKind` subclass and one entry here.

* ``"eigh"`` (:class:`EighInverse`): eigendecompositions ``A = QA diag(lamA) QA^T``,
  ``G = QG diag(lamG) QG^T``; eigenvalue damping (``damping_mode="eigen"``) or pi damping.
* ``"cholesky"`` (:class:`CholeskyInverse`): damped inverses ``(A + pi sqrt(gamma) I)^-1``,
  ``(G + sqrt(gamma)/pi I)^-1`` through Cholesky; pi damping only.
* ``"ekfac"`` (:class:`EkfacInverse`): the eigenbases of "eigh" with eigenvalue-corrected
  scalings S (George et al. 2018), re-estimated in the current basis on every factor step.
* ``"eigen_adam"`` (:class:`EigenAdamInverse`): the eigenbases of "eigh" with Adam's bias-corrected
  per-coordinate second moment of the rotated gradient in place of the eigenvalues (SOAP's
  ingredient, in K-FAC's basis); ``damping`` is Adam's epsilon.
"""
from __future__ import annotations

from typing import Dict, Type

from .base import InverseKind, Slice, finite_each, pi
from .cholesky import CholeskyInverse
from .eigh import EighInverse
from .ekfac import EkfacInverse
from .eigen_adam import EigenAdamInverse

KINDS: Dict[str, Type[InverseKind]] = {
    "eigh": EighInverse,
    "cholesky": CholeskyInverse,
    "ekfac": EkfacInverse,
    "eigen_adam": EigenAdamInverse,
}

__all__ = ["KINDS", "InverseKind", "EighInverse", "CholeskyInverse", "EkfacInverse", "EigenAdamInverse", "Slice",
           "finite_each", "pi"]

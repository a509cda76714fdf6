"""The kernel ops as ``torch.library`` custom ops, so ``torch.compile`` treats them as opaque.

Each op of :mod:`kfac_kernels.ops` is registered once as ``torch.ops.kfac_kernels.<name>`` with a
fake (meta) implementation that states its output shapes and dtypes; the in-place
``syrk_update`` (and ``ema_factor_update``, which is built on it) declares the mutation of its
``factor``. The real implementation is the same backend dispatch the eager wrappers use (the
registry, and for decompositions on CUDA the size policy of
:mod:`kfac_kernels.ops._decomp_policy`), so a compiled region runs exactly the kernels an eager
call would, without dynamo tracing (and breaking on) the registry's Python.

The public wrappers in :mod:`kfac_kernels.ops` check their inputs as usual and route through
these ops only while dynamo is tracing (``torch.compiler.is_compiling()``); eager calls skip the
custom-op dispatcher and its overhead. Registration happens at import: it costs a few
milliseconds, initialises no device and compiles nothing (measured in docs/robustness.md).

Moving to one module per op (issue 25): ``syrk_update`` / ``ema_factor_update``
(:mod:`.syrk`), ``conv_input_factor`` / ``conv_input_factor_grouped`` (:mod:`.conv_factor`) and
``newton_schulz`` (:mod:`.orthogonalization`), ``ekfac_scalings`` / ``ekfac_scalings_embedding``
(:mod:`.ekfac`), ``gradient_factor_update`` (:mod:`.gradient_factors`) declare their custom ops next to their wrappers.

Not covered: ``symeig``'s backend-specific ``**options`` (tolerances, sweep limits) have no
schema; a call that passes them is traced as ordinary Python.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.library import custom_op

from . import _registry

NAMESPACE = "kfac_kernels"
__all__ = ["NAMESPACE", "symeig", "damped_inverse",
           "kron_precondition_eigen", "kron_precondition_inverse", "ekfac_precondition",
           "kron_precondition_diag", "kron_rotate", "inverse_root",
           "eigenbasis_power_step"]


def _damping(damping_t: Optional[Tensor], damping_f: float):
    return damping_t if damping_t is not None else damping_f


def _fresh(t: Tensor) -> Tensor:
    """Outputs are contiguous (the fake implementations say so; eigh's eigenvectors are not)
    and not views (custom-op outputs may not alias, e.g. the [n, n] result of a batch of one)."""
    t = t.contiguous()
    return t if t._base is None else t.clone()


def _empty_dot(ref: Tensor, batch, dtype, return_dot: bool) -> Tensor:
    shape = tuple(batch) if return_dot else (0,)
    return ref.new_empty(shape, dtype=dtype)


# ----------------------------------------------------------------------------- factor updates
# ----------------------------------------------------------------------------- decompositions
@custom_op(f"{NAMESPACE}::symeig", mutates_args=())
def symeig(factors: Tensor, prev_eigenvectors: Optional[Tensor], method: str,
           backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    from . import _run_symeig
    lam, q, info = _run_symeig(factors, method, backend, prev_eigenvectors=prev_eigenvectors,
                               return_info=True)
    return _fresh(lam), _fresh(q), _fresh(info.to(torch.int32))


@symeig.register_fake
def _(factors, prev_eigenvectors, method, backend):
    return (factors.new_empty(factors.shape[:-1]), factors.new_empty(factors.shape),
            factors.new_empty(factors.shape[:-2], dtype=torch.int32))


@custom_op(f"{NAMESPACE}::damped_inverse", mutates_args=())
def damped_inverse(factors: Tensor, damping_t: Optional[Tensor],
                   damping_f: float, backend: str) -> Tuple[Tensor, Tensor]:
    from . import _run_damped_inverse
    inv, info = _run_damped_inverse(factors, _damping(damping_t, damping_f), backend, True)
    return _fresh(inv), _fresh(info.to(torch.int32))


@damped_inverse.register_fake
def _(factors, damping_t, damping_f, backend):
    return (factors.new_empty(factors.shape),
            factors.new_empty(factors.shape[:-2], dtype=torch.int32))


# ----------------------------------------------------------------------------- preconditioning
@custom_op(f"{NAMESPACE}::kron_precondition_eigen", mutates_args=())
def kron_precondition_eigen(V: Tensor, QG: Tensor, lamG: Tensor, QA: Tensor, lamA: Tensor,
                            damping_t: Optional[Tensor], damping_f: float, return_dot: bool,
                            backend: str) -> Tuple[Tensor, Tensor]:
    res = _registry.call("kron_precondition_eigen", backend, V.device, V, QG, lamG, QA, lamA,
                         _damping(damping_t, damping_f), return_dot=return_dot)
    U, dot = res if return_dot else (res, _empty_dot(V, (), QG.dtype, False))
    return _fresh(U), _fresh(dot)


@kron_precondition_eigen.register_fake
def _(V, QG, lamG, QA, lamA, damping_t, damping_f, return_dot, backend):
    return torch.empty_like(V), _empty_dot(V, V.shape[:-2], QG.dtype, return_dot)


@custom_op(f"{NAMESPACE}::ekfac_precondition", mutates_args=())
def ekfac_precondition(V: Tensor, QG: Tensor, QA: Tensor, scalings: Tensor,
                       damping_t: Optional[Tensor], damping_f: float, return_dot: bool,
                       backend: str) -> Tuple[Tensor, Tensor]:
    res = _registry.call("ekfac_precondition", backend, V.device, V, QG, QA, scalings,
                         _damping(damping_t, damping_f), return_dot=return_dot)
    U, dot = res if return_dot else (res, _empty_dot(V, (), QG.dtype, False))
    return _fresh(U), _fresh(dot)


@ekfac_precondition.register_fake
def _(V, QG, QA, scalings, damping_t, damping_f, return_dot, backend):
    return torch.empty_like(V), _empty_dot(V, V.shape[:-2], QG.dtype, return_dot)


@custom_op(f"{NAMESPACE}::kron_precondition_inverse", mutates_args=())
def kron_precondition_inverse(V: Tensor, G_inv: Tensor, A_inv: Tensor, return_dot: bool,
                              backend: str) -> Tuple[Tensor, Tensor]:
    res = _registry.call("kron_precondition_inverse", backend, V.device, V, G_inv, A_inv,
                         return_dot=return_dot)
    U, dot = res if return_dot else (res, _empty_dot(V, (), G_inv.dtype, False))
    return _fresh(U), _fresh(dot)


@kron_precondition_inverse.register_fake
def _(V, G_inv, A_inv, return_dot, backend):
    return torch.empty_like(V), _empty_dot(V, V.shape[:-2], G_inv.dtype, return_dot)


# ----------------------------------------------------------------------------- layer-specific ops
def _factor_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@custom_op(f"{NAMESPACE}::kron_precondition_diag", mutates_args=())
def kron_precondition_diag(V: Tensor, QG: Tensor, scalings: Tensor, damping_t: Optional[Tensor],
                           damping_f: float, return_dot: bool, backend: str
                           ) -> Tuple[Tensor, Tensor]:
    res = _registry.call("kron_precondition_diag", backend, V.device, V, QG, scalings,
                         _damping(damping_t, damping_f), return_dot=return_dot)
    U, dot = res if return_dot else (res, _empty_dot(V, (), QG.dtype, False))
    return _fresh(U), _fresh(dot)


@kron_precondition_diag.register_fake
def _(V, QG, scalings, damping_t, damping_f, return_dot, backend):
    return torch.empty_like(V), _empty_dot(V, V.shape[:-2], QG.dtype, return_dot)


# ----------------------------------------------------------------------------- optimizer ops
def _work_dtype(QL: Optional[Tensor], QR: Optional[Tensor]) -> torch.dtype:
    return (QL if QL is not None else QR).dtype


@custom_op(f"{NAMESPACE}::kron_rotate", mutates_args=())
def kron_rotate(V: Tensor, QL: Optional[Tensor], QR: Optional[Tensor], back: bool,
                backend: str) -> Tensor:
    return _fresh(_registry.call("kron_rotate", backend, V.device, V, QL, QR, back=back))


@kron_rotate.register_fake
def _(V, QL, QR, back, backend):
    return V.new_empty(V.shape, dtype=_work_dtype(QL, QR))


@custom_op(f"{NAMESPACE}::inverse_root", mutates_args=())
def inverse_root(factors: Tensor, root: float, epsilon: float, method: str,
                 prev_eigenvectors: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    from . import _run_inverse_root
    out, q = _run_inverse_root(factors, root, epsilon, method, prev_eigenvectors, backend)
    return _fresh(out), _fresh(q)


@inverse_root.register_fake
def _(factors, root, epsilon, method, prev_eigenvectors, backend):
    return factors.new_empty(factors.shape), factors.new_empty(factors.shape)


@custom_op(f"{NAMESPACE}::eigenbasis_power_step", mutates_args=())
def eigenbasis_power_step(factors: Tensor, Q: Tensor, shift: Optional[float],
                          backend: str) -> Tuple[Tensor, Tensor]:
    q, d = _registry.call("eigenbasis_power_step", backend, factors.device, factors, Q,
                          shift=shift)
    return _fresh(q), _fresh(d)


@eigenbasis_power_step.register_fake
def _(factors, Q, shift, backend):
    return factors.new_empty(factors.shape), factors.new_empty(factors.shape[:-1])

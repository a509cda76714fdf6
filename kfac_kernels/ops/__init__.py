"""Kernel ops of kfac_kernels, usable on their own by other optimizers.

One module per op family holds each op's public wrapper (its inputs are checked there, so
backends repeat no checks), its ``torch.library`` custom op and fake, and its backend
registrations: :mod:`.syrk`, :mod:`.conv_factor`, :mod:`.gradient_factors`, :mod:`.ekfac`,
:mod:`.orthogonalization`, :mod:`.decompositions`, :mod:`.kron`. Each op runs on the backend
chosen by ``backend=`` ("auto", "torch", "triton", "cuda", "cupy"; see
:mod:`kfac_kernels.ops._registry` for the rule). ``kfac_kernels.ops.reference`` holds the
pure-torch implementation of each, which is also the default.

Importing this module imports torch only: Triton, CuPy and the compiled ``_C`` module are loaded
the first time an op runs on their backend.
"""
from __future__ import annotations

from . import _decomp_policy, _fallback, _registry, reference
from ._registry import BackendUnavailable, NotSupported, backend_status
from .conv_factor import _conv_args, conv_input_factor, conv_input_factor_grouped
from .decompositions import (_run_damped_inverse, _run_inverse_root, _run_symeig, damped_inverse,
                             eigenbasis_power_step, inverse_root, symeig)
from .ekfac import ekfac_scalings, ekfac_scalings_embedding
from .gradient_factors import gradient_factor_update
from .kron import (_check_kron, ekfac_precondition, kron_precondition_diag,
                   kron_precondition_eigen, kron_precondition_inverse, kron_rotate)
from .orthogonalization import _NS_DTYPES, _newton_schulz_op, newton_schulz
from .syrk import ema_factor_update, syrk_update

# the shared checks (ops/_checks.py) under the names this module used before the split
from ._checks import FACTOR_DTYPES as _FACTOR_DTYPES
from ._checks import INPUT_DTYPES as _INPUT_DTYPES
from ._checks import check_damping as _check_damping
from ._checks import check_number as _check_number
from ._checks import check_prev_eigenvectors as _check_prev_eigenvectors
from ._checks import check_same_device as _check_same_device
from ._checks import check_symmetric_stack as _check_symmetric_stack
from ._checks import check_tensor as _check_tensor
from ._checks import split_damping as _split_damping

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


def available_backends():
    """{backend: (usable, reason)} for every backend, probing each lazily."""
    return {b: backend_status(b) for b in _registry.BACKENDS}

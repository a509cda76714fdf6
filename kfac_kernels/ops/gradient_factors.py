"""``gradient_factor_update``: both Kronecker factors of Shampoo / SOAP from a gradient stack.

Reference: :func:`kfac_kernels.ops.reference.gradient_factor_update`; Triton:
``ops/triton/gradient_factors.py`` (both factors in one launch).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import _registry
from ._checks import (FACTOR_DTYPES, INPUT_DTYPES, check_number, check_same_device,
                      check_tensor, compiling)
from ._library import NAMESPACE

_registry.register("gradient_factor_update", "torch",
                   "kfac_kernels.ops.reference:gradient_factor_update")
_registry.register("gradient_factor_update", "triton",
                   "kfac_kernels.ops.triton.gradient_factors:gradient_factor_update")


@custom_op(f"{NAMESPACE}::gradient_factor_update", mutates_args=("left", "right"))
def _gradient_factor_update_op(left: Optional[Tensor], right: Optional[Tensor], grad: Tensor,
                           beta: float, scale: float, allow_tf32: bool, backend: str) -> None:
    device = (left if left is not None else right).device
    _registry.call("gradient_factor_update", backend, device, left, right, grad, beta=beta,
                   scale=scale, allow_tf32=allow_tf32)


@_gradient_factor_update_op.register_fake
def _(left, right, grad, beta, scale, allow_tf32, backend):
    return None


def _check_grad_stack(grad):
    check_tensor("grad", grad, INPUT_DTYPES, (2, 3))


def _check_side(name, f, size, grad):
    if f is None:
        return
    check_tensor(name, f, FACTOR_DTYPES, (grad.dim(),))
    if f.shape[-2:] != (size, size):
        raise ValueError(f"{name} must be {size} x {size} for grad of shape {tuple(grad.shape)}, "
                         f"got {tuple(f.shape)}")
    if grad.dim() == 3 and f.shape[0] != grad.shape[0]:
        raise ValueError(f"batched: {name} stack has {f.shape[0]} matrices, grad has "
                         f"{grad.shape[0]}")


def gradient_factor_update(left: Optional[torch.Tensor], right: Optional[torch.Tensor],
                           grad: torch.Tensor, *, beta: float, scale: Optional[float] = None,
                           allow_tf32: bool = False, backend: str = "auto"):
    """In place: ``left <- beta left + scale G G^T`` and ``right <- beta right + scale G^T G``,
    the two Kronecker factors of Shampoo / SOAP for gradient matrices ``G``.

    ``grad`` is [m, n] or a stack [B, m, n] (fp16/bf16/fp32/fp64, any strides); ``left`` is
    fp32/fp64 [.., m, m] and ``right`` [.., n, n] (same dtype); either may be None to update one
    side only. ``scale`` defaults to ``1 - beta`` for ``beta < 1`` (a running average) and to 1
    for ``beta == 1`` (sums, as Shampoo's Algorithm 1). ``beta == 0`` overwrites the factors. The
    Triton backend updates both factors in one launch. Returns ``(left, right)``.
    """
    _check_grad_stack(grad)
    if left is None and right is None:
        raise ValueError("gradient_factor_update needs left, right or both (got neither)")
    m, n = grad.shape[-2:]
    _check_side("left", left, m, grad)
    _check_side("right", right, n, grad)
    if left is not None and right is not None and left.dtype != right.dtype:
        raise TypeError(f"left is {left.dtype} but right is {right.dtype}; use one factor dtype")
    check_same_device(left=left, right=right, grad=grad)
    check_number("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if scale is None:
        scale = 1.0 if beta == 1.0 else 1.0 - float(beta)
    check_number("scale", scale)
    if compiling():
        _gradient_factor_update_op(left, right, grad, float(beta), float(scale),
                                        bool(allow_tf32), backend)
        return left, right
    any_f = left if left is not None else right
    return _registry.call("gradient_factor_update", backend, any_f.device, left, right, grad,
                          beta=float(beta), scale=float(scale), allow_tf32=bool(allow_tf32))

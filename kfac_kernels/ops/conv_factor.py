"""``conv_input_factor`` and ``conv_input_factor_grouped``: KFC input factors of convolutions.

Reference: :func:`kfac_kernels.ops.reference.conv_input_factor` (and ``_grouped``); Triton:
``ops/triton/conv_factor.py`` (ungrouped only).
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor
from torch.library import custom_op

from . import _registry, reference
from ._checks import INPUT_DTYPES, check_tensor, compiling
from ._library import NAMESPACE, fresh

_registry.register("conv_input_factor", "torch", "kfac_kernels.ops.reference:conv_input_factor")
_registry.register("conv_input_factor", "triton",
                   "kfac_kernels.ops.triton.conv_factor:conv_input_factor")
_registry.register("conv_input_factor_grouped", "torch",
                   "kfac_kernels.ops.reference:conv_input_factor_grouped")


def factor_dtype(x: Tensor) -> torch.dtype:
    """The factors' dtype for an input of ``x``'s dtype (the fakes' output dtype)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _conv_args(x, kernel_size, stride, padding, dilation) -> dict:
    """The convolution geometry as per-dimension tuples, checked against ``x`` ([N, C, *spatial]):
    sizes in range, the padded input at least as large as the kernel's span, a non-empty batch."""
    nd = x.dim() - 2
    args = {}
    for name, v in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding),
                    ("dilation", dilation)):
        t = reference._tuple(v, nd, name)
        lo = 0 if name == "padding" else 1
        if any(i < lo for i in t):
            raise ValueError(f"{name} must be >= {lo}, got {v}")
        args[name] = t
    for i in range(nd):
        span = args["dilation"][i] * (args["kernel_size"][i] - 1) + 1
        if x.shape[2 + i] + 2 * args["padding"][i] < span:
            raise ValueError(f"spatial dim {i} of size {x.shape[2 + i]} (padded by "
                             f"{args['padding'][i]}) is smaller than the kernel's span {span}")
    if x.shape[0] == 0:
        raise ValueError("x has an empty batch")
    return args


# ----------------------------------------------------------------------------- conv_input_factor
@custom_op(f"{NAMESPACE}::conv_input_factor", mutates_args=())
def _conv_input_factor_op(x: Tensor, kernel_size: List[int], stride: List[int],
                          padding: List[int], dilation: List[int], homogeneous: bool,
                          backend: str) -> Tensor:
    out = _registry.call("conv_input_factor", backend, x.device, x, tuple(kernel_size),
                         tuple(stride), tuple(padding), tuple(dilation), homogeneous=homogeneous)
    return fresh(out)


@_conv_input_factor_op.register_fake
def _(x, kernel_size, stride, padding, dilation, homogeneous, backend):
    d = x.shape[1]
    for k in kernel_size:
        d = d * k
    d = d + int(homogeneous)
    return x.new_empty((d, d), dtype=factor_dtype(x))


def conv_input_factor(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, *,
                      homogeneous: bool = False, backend: str = "auto") -> torch.Tensor:
    """KFC input factor ``(1/(N T)) sum_{n,t} pbar pbar^T`` of a Conv1d/2d/3d input ``x``.

    ``x`` is [N, C, *spatial] (1 to 3 spatial dims); patches are ordered like
    ``weight.flatten(1)``; ``padding`` is symmetric zero padding (pad the input yourself for other
    modes). Fast backends never materialise the unfolded patch matrix. Returns a new fp32 matrix
    (fp64 for fp64 input) of size ``C * prod(kernel_size) + homogeneous``.
    """
    check_tensor("x", x, INPUT_DTYPES, (3, 4, 5))
    args = _conv_args(x, kernel_size, stride, padding, dilation)
    if compiling():
        return _conv_input_factor_op(x, list(args["kernel_size"]), list(args["stride"]),
                                     list(args["padding"]), list(args["dilation"]),
                                     bool(homogeneous), backend)
    return _registry.call("conv_input_factor", backend, x.device, x, args["kernel_size"],
                          args["stride"], args["padding"], args["dilation"],
                          homogeneous=bool(homogeneous))


# ----------------------------------------------------------------------------- grouped
@custom_op(f"{NAMESPACE}::conv_input_factor_grouped", mutates_args=())
def _conv_input_factor_grouped_op(x: Tensor, kernel_size: List[int], stride: List[int],
                                  padding: List[int], dilation: List[int], groups: int,
                                  homogeneous: bool, backend: str) -> Tensor:
    out = _registry.call("conv_input_factor_grouped", backend, x.device, x, tuple(kernel_size),
                         tuple(stride), tuple(padding), tuple(dilation), groups,
                         homogeneous=homogeneous)
    return fresh(out)


@_conv_input_factor_grouped_op.register_fake
def _(x, kernel_size, stride, padding, dilation, groups, homogeneous, backend):
    d = x.shape[1] // groups
    for k in kernel_size:
        d = d * k
    d = d + int(homogeneous)
    return x.new_empty((groups, d, d), dtype=factor_dtype(x))


def conv_input_factor_grouped(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1,
                              groups: int = 1, *, homogeneous: bool = False,
                              backend: str = "auto") -> torch.Tensor:
    """KFC input factors of a grouped convolution, one per group: a new ``[groups, d, d]`` stack
    with ``d = (C / groups) * prod(kernel_size) + homogeneous`` (see :func:`conv_input_factor`
    for the other arguments; group j sees input channels ``[j C/groups, (j+1) C/groups)``)."""
    check_tensor("x", x, INPUT_DTYPES, (3, 4, 5))
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be an integer >= 1, got {groups!r}")
    if x.shape[1] % groups:
        raise ValueError(f"x has {x.shape[1]} channels, not divisible by groups={groups}")
    args = _conv_args(x, kernel_size, stride, padding, dilation)
    if compiling():
        return _conv_input_factor_grouped_op(
            x, list(args["kernel_size"]), list(args["stride"]), list(args["padding"]),
            list(args["dilation"]), groups, bool(homogeneous), backend)
    return _registry.call("conv_input_factor_grouped", backend, x.device, x, args["kernel_size"],
                          args["stride"], args["padding"], args["dilation"], groups,
                          homogeneous=bool(homogeneous))

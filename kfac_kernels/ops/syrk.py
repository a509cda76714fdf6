"""``syrk_update`` and ``ema_factor_update``: the in-place Gram update of a K-FAC factor.

Reference: :func:`kfac_kernels.ops.reference.syrk_update`; Triton: ``ops/triton/syrk.py``.
``ema_factor_update`` is ``syrk_update`` with ``beta = decay`` and ``alpha = (1 - decay) scale``:
its wrapper routes there, so every backend of ``syrk_update`` serves it.
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

_registry.register("syrk_update", "torch", "kfac_kernels.ops.reference:syrk_update")
_registry.register("syrk_update", "triton", "kfac_kernels.ops.triton.syrk:syrk_update")
_registry.register("ema_factor_update", "torch", "kfac_kernels.ops.reference:ema_factor_update")


@custom_op(f"{NAMESPACE}::syrk_update", mutates_args=("factor",))
def _syrk_update_op(factor: Tensor, x: Tensor, alpha: float, beta: float, homogeneous: bool,
                    allow_tf32: bool, backend: str) -> None:
    _registry.call("syrk_update", backend, factor.device, factor, x, alpha=alpha, beta=beta,
                   homogeneous=homogeneous, allow_tf32=allow_tf32)


@_syrk_update_op.register_fake
def _(factor, x, alpha, beta, homogeneous, allow_tf32, backend):
    return None


def syrk_update(factor: torch.Tensor, x: torch.Tensor, *, alpha: float, beta: float,
                homogeneous: bool = False, allow_tf32: bool = False, backend: str = "auto"):
    """In place ``factor <- beta * factor + alpha * xbar^T xbar`` with ``xbar = [x, 1]`` when
    ``homogeneous`` (fast backends never build the ones column).

    ``factor`` is fp32/fp64 [d, d] or a stack [B, d, d]; ``x`` is [n, d - homogeneous] (resp.
    [B, n, ...]) in fp16/bf16/fp32/fp64, contiguous or not. ``beta == 0`` overwrites ``factor``
    whatever it held. ``allow_tf32`` lets fp32 inputs use TF32 matrix units on GPUs (faster,
    ~1e-3 relative error); the default is exact fp32. Returns ``factor``.
    """
    check_tensor("factor", factor, FACTOR_DTYPES, (2, 3))
    check_tensor("x", x, INPUT_DTYPES, (factor.dim(),))
    check_same_device(factor=factor, x=x)
    check_number("alpha", alpha)
    check_number("beta", beta)
    d = factor.shape[-1]
    if factor.shape[-2] != d:
        raise ValueError(f"factor must be square, got shape {tuple(factor.shape)}")
    if x.shape[-1] + int(bool(homogeneous)) != d:
        raise ValueError(f"x has {x.shape[-1]} columns{' (+1 homogeneous)' if homogeneous else ''}"
                         f" but factor is {d} x {d}")
    if factor.dim() == 3 and x.shape[0] != factor.shape[0]:
        raise ValueError(f"batched: factor stack has {factor.shape[0]} matrices, x has {x.shape[0]}")
    if compiling():
        _syrk_update_op(factor, x, float(alpha), float(beta), bool(homogeneous),
                        bool(allow_tf32), backend)
        return factor
    return _registry.call("syrk_update", backend, factor.device, factor, x, alpha=float(alpha),
                          beta=float(beta), homogeneous=bool(homogeneous),
                          allow_tf32=bool(allow_tf32))


def ema_factor_update(factor: torch.Tensor, x: torch.Tensor, decay: float, *,
                      homogeneous: bool = False, scale: Optional[float] = None,
                      allow_tf32: bool = False, backend: str = "auto"):
    """In place ``factor <- decay * factor + (1 - decay) * scale * xbar^T xbar``.

    ``scale`` defaults to ``1 / rows``. Same shapes and dtypes as :func:`syrk_update` (of which
    this is the running-average form); returns ``factor``.
    """
    check_number("decay", decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if scale is None:
        check_tensor("x", x, INPUT_DTYPES, (2, 3))
        if x.shape[-2] == 0:
            raise ValueError("x has no rows: the average of an empty batch is undefined")
        scale = 1.0 / x.shape[-2]
    check_number("scale", scale)
    return syrk_update(factor, x, alpha=(1.0 - decay) * float(scale), beta=float(decay),
                       homogeneous=homogeneous, allow_tf32=allow_tf32, backend=backend)

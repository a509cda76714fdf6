"""``ekfac_scalings`` and ``ekfac_scalings_embedding``: EKFAC's per-example statistics in the
Kronecker eigenbasis (George et al. 2018). Reference only (:mod:`kfac_kernels.ops.reference`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import _registry
from ._checks import (FACTOR_DTYPES, INPUT_DTYPES, check_number, check_same_device,
                      check_tensor, compiling)
from ._library import NAMESPACE, fresh

_registry.register("ekfac_scalings", "torch", "kfac_kernels.ops.reference:ekfac_scalings")
_registry.register("ekfac_scalings_embedding", "torch",
                   "kfac_kernels.ops.reference:ekfac_scalings_embedding")


@custom_op(f"{NAMESPACE}::ekfac_scalings", mutates_args=())
def _ekfac_scalings_op(g: Tensor, a: Tensor, QG: Tensor, QA: Tensor, homogeneous: bool,
                   alpha: float, backend: str) -> Tensor:
    out = _registry.call("ekfac_scalings", backend, g.device, g, a, QG, QA,
                         homogeneous=homogeneous, alpha=alpha)
    return fresh(out)


@_ekfac_scalings_op.register_fake
def _(g, a, QG, QA, homogeneous, alpha, backend):
    return g.new_empty(tuple(g.shape[:-3]) + (g.shape[-1], QA.shape[-1]), dtype=QG.dtype)


@custom_op(f"{NAMESPACE}::ekfac_scalings_embedding", mutates_args=())
def _ekfac_scalings_embedding_op(g: Tensor, tokens: Tensor, QG: Tensor, num_embeddings: int,
                             padding_idx: Optional[int], alpha: float, backend: str) -> Tensor:
    out = _registry.call("ekfac_scalings_embedding", backend, g.device, g, tokens, QG,
                         num_embeddings, padding_idx=padding_idx, alpha=alpha)
    return fresh(out)


@_ekfac_scalings_embedding_op.register_fake
def _(g, tokens, QG, num_embeddings, padding_idx, alpha, backend):
    return g.new_empty((g.shape[-1], num_embeddings), dtype=QG.dtype)



def ekfac_scalings(g, a, QG, QA, *, homogeneous: bool = False, alpha: float = 1.0,
                   backend: str = "auto"):
    """EKFAC statistics ``alpha * sum_n (QG^T D_n QA)^2`` with per-example gradients
    ``D_n = sum_t g[n, t] abar[n, t]^T`` (George et al. 2018), returned as a new [..., m, n].

    ``g`` [..., N, T, m] (output-gradients), ``a`` [..., N, T, k] (inputs; abar = [a, 1] when
    ``homogeneous``), ``QG`` [..., m, m], ``QA`` [..., k(+1), k(+1)]; leading dims are independent
    problems. T = 1 needs no per-example gradient (one product of squares); T > 1 forms the
    projected per-example gradients chunk by chunk."""
    check_tensor("g", g, INPUT_DTYPES)
    check_tensor("a", a, INPUT_DTYPES, (g.dim(),))
    check_tensor("QG", QG, FACTOR_DTYPES, (g.dim() - 1,))
    check_tensor("QA", QA, FACTOR_DTYPES, (g.dim() - 1,))
    if g.dim() < 3:
        raise ValueError(f"g must be [..., N, T, m], got shape {tuple(g.shape)}")
    if g.shape[:-1] != a.shape[:-1]:
        raise ValueError(f"g {tuple(g.shape)} and a {tuple(a.shape)} must agree in all but the "
                         f"last dim")
    m, k = g.shape[-1], a.shape[-1] + int(bool(homogeneous))
    if QG.shape[-2:] != (m, m) or QA.shape[-2:] != (k, k):
        raise ValueError(f"QG must be {m} x {m} and QA {k} x {k}, got {tuple(QG.shape)} and "
                         f"{tuple(QA.shape)}")
    if QG.shape[:-2] != g.shape[:-3] or QA.shape[:-2] != g.shape[:-3]:
        raise ValueError(f"leading (batch) dims differ: g {tuple(g.shape[:-3])}, QG "
                         f"{tuple(QG.shape[:-2])}, QA {tuple(QA.shape[:-2])}")
    check_number("alpha", alpha)
    check_same_device(g=g, a=a, QG=QG, QA=QA)
    if compiling():
        return _ekfac_scalings_op(g, a, QG, QA, bool(homogeneous), float(alpha), backend)
    return _registry.call("ekfac_scalings", backend, g.device, g, a, QG, QA,
                          homogeneous=bool(homogeneous), alpha=float(alpha))


def ekfac_scalings_embedding(g, tokens, QG, num_embeddings: int, *,
                             padding_idx: Optional[int] = None, alpha: float = 1.0,
                             backend: str = "auto"):
    """EKFAC statistics of an embedding, ``alpha * sum_n (QG^T D_n)^2`` [m, V], with
    ``D_n = sum_t g[n, t] e_{tokens[n, t]}^T``: a new tensor. ``g`` [N, T, m], ``tokens`` [N, T]
    (integers in [0, num_embeddings)); positions holding ``padding_idx`` do not count."""
    check_tensor("g", g, INPUT_DTYPES, (3,))
    check_tensor("QG", QG, FACTOR_DTYPES, (2,))
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError("tokens must be an int32/int64 tensor")
    if tuple(tokens.shape) != tuple(g.shape[:2]):
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}, expected {tuple(g.shape[:2])}")
    m = g.shape[-1]
    if QG.shape != (m, m):
        raise ValueError(f"QG must be {m} x {m}, got {tuple(QG.shape)}")
    check_number("alpha", alpha)
    check_same_device(g=g, tokens=tokens, QG=QG)
    if compiling():
        return _ekfac_scalings_embedding_op(
            g, tokens.to(torch.int64), QG, int(num_embeddings),
            None if padding_idx is None else int(padding_idx), float(alpha), backend)
    return _registry.call("ekfac_scalings_embedding", backend, g.device, g,
                          tokens.to(torch.int64), QG, int(num_embeddings),
                          padding_idx=padding_idx, alpha=float(alpha))

"""nn.Linear block, also for inputs [N, ..., features] (sequence positions are the T positions)."""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import ops
from .base import Block, BlockInputError, SyrkJob, mean_over_calls, rows_jobs_expand


class LinearBlock(Block):
    family = "linear"
    diagonal_sides = ("A", "G")

    @property
    def in_features(self) -> int:
        return self.in_dim - int(self.has_bias)

    def check_input(self, x: torch.Tensor) -> None:
        k = self.in_features
        if x.dim() < 1 or x.shape[-1] != k:
            raise BlockInputError(f"module {self.name!r} expects inputs [..., {k}], got shape "
                                  f"{tuple(x.shape)}")
        if self.weight_sharing == "reduce" and x.dim() < 2:
            raise BlockInputError(f"module {self.name!r}: weight_sharing='reduce' needs a batch "
                                  f"dimension, got shape {tuple(x.shape)}")

    def batch_size(self, x: torch.Tensor) -> int:
        return x.shape[0] if x.dim() > 1 else 1

    def a_jobs(self, inputs: List[torch.Tensor]):
        k = self.in_features
        if self.weight_sharing == "expand":
            return self.sided(rows_jobs_expand(inputs, k, self.has_bias), "A"), None
        parts = [(x.reshape(x.shape[0], -1, k).sum(1), x[0].numel() // k) for x in inputs]
        a = mean_over_calls(parts, self.name)
        return self.sided([SyrkJob(a, 1.0 / a.shape[0], self.has_bias)], "A"), None

    def g_jobs(self, grads: List[torch.Tensor], scale: float) -> List[SyrkJob]:
        return self.sided(self._g_jobs(grads, scale), "G")

    def _g_jobs(self, grads: List[torch.Tensor], scale: float) -> List[SyrkJob]:
        m = self.out_dim
        n = self.batch_size(grads[0])
        if self.weight_sharing == "expand":
            if len(grads) > 1 and all(self.batch_size(g) == n for g in grads):   # one op call
                return [SyrkJob(torch.cat([g.reshape(-1, m) for g in grads]), scale / n, False)]
            return [SyrkJob(g if g.dim() == 2 else g.reshape(-1, m), scale / self.batch_size(g),
                            False) for g in grads]
        total = None
        for g in grads:
            if self.batch_size(g) != n:
                raise BlockInputError(
                    f"module {self.name!r} was called with batch sizes "
                    f"{[self.batch_size(x) for x in grads]} in one step; weight_sharing='reduce' "
                    f"needs the same batch size in every call")
            s = g.reshape(n, -1, m).sum(1)
            total = s if total is None else total + s
        return [SyrkJob(total, scale / n, False)]

    def ekfac_sums(self, inputs, grads, calls, QG, QA):
        """Per-example gradient D_n = sum over calls and positions of g abar^T; with one call and
        no positions (T = 1) the op needs no per-example gradient at all."""
        k, m = self.in_features, self.out_dim
        pairs = self.paired(inputs, grads, calls)
        n = self.batch_size(pairs[0][0])
        g = torch.cat([gr.reshape(n, -1, m) for _, gr in pairs], 1)
        a = torch.cat([x.reshape(n, -1, k) for x, _ in pairs], 1)
        return ops.ekfac_scalings(g, a, QG, QA, homogeneous=self.has_bias,
                                  backend=self.backend_for("ekfac_scalings"))


class TransposedLinearBlock(LinearBlock):
    """A linear layer that stores its weight as ``[in, out]`` and computes ``x @ W + b``: the
    ``Conv1D`` of Hugging Face's GPT-2 family (recognised by its class name and its ``nf`` out
    size). The same block as ``nn.Linear`` with the weight seen transposed."""

    family = "linear-t"

    def __init__(self, name, module, **kw):
        super().__init__(name, module, **kw)
        self.out_dim = self.weight.shape[1]
        self.in_dim = self.weight.shape[0] + int(self.has_bias)

    def grad_matrix(self, grads=None) -> Optional[torch.Tensor]:
        gw, gb = self.param_grads(grads)
        if gw is None:
            return None
        if gb is None:
            return gw.T
        return torch.cat([gw.T, gb.reshape(-1, 1)], dim=1)

    def param_matrix(self, values=None) -> torch.Tensor:
        w, b = self.param_values(values)
        if b is None:
            return w.T
        return torch.cat([w.T, b.reshape(-1, 1)], dim=1)

    def split(self, U: torch.Tensor) -> List[torch.Tensor]:
        if not self.has_bias:
            return [U.T]
        return [U[:, :-1].T, U[:, -1].reshape(self.bias.shape)]


def is_transposed_linear(module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2, and models copied from it), without importing it."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(module, "nf", None) == w.shape[1])

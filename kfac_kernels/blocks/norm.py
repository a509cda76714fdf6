"""Affine parameters of normalisation layers (LayerNorm, RMSNorm, GroupNorm, BatchNorm*d,
InstanceNorm*d): the EXACT per-channel curvature block of [scale, shift].

Channel c computes s_c = scale_c * xhat_c + shift_c at every position t of example n (xhat: the
normalised input, which depends on no parameter of this layer). Example n's gradient with respect
to (scale_c, shift_c) is

    u_nc = sum_t g_ntc [xhat_ntc, 1]        (g = dl_n/ds, the metric's output-gradient)

so the metric restricted to channel c is the 2 x 2 matrix F_c = (1/N) sum_n u_nc u_nc^T (summed
over the metric's backward passes like G). The block keeps F_c exactly: no Kronecker or
weight-sharing approximation is involved (``weight_sharing`` does not apply), and the cost is one
elementwise product and a reduction over positions, the same as the gradient itself. Channels are
independent (block-diagonal across channels, as K-FAC is across layers).

Layout: a stacked block of C members, each with the gradient matrix [d scale; d shift] (a 2 x 1
column; 1 x 1 without a shift, e.g. RMSNorm), G_c = F_c (2 x 2) and A_c = [1]. So the natural
gradient is U_c = (F_c + damping I)^-1 V_c under eigenvalue damping, decompositions of all channels
run in one batched call, and EKFAC's scalings coincide with F_c's eigenvalues.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .base import Block, BlockInputError, SyrkJob

_BN = nn.modules.batchnorm._BatchNorm
_IN = nn.modules.instancenorm._InstanceNorm
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, _BN, _IN) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class NormBlock(Block):
    family = "norm"
    stacked = True

    def __init__(self, name, module, **kw):
        super().__init__(name, module, **kw)
        self.channels = self.weight.numel()
        self.out_dim = 1 + int(self.has_bias)       # [scale; shift] per channel
        self.in_dim = 1
        # LayerNorm/RMSNorm: channels are the trailing normalized_shape; the others: dim 1
        self.trailing = isinstance(module, nn.LayerNorm) or (
            hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm))

    @property
    def num_stack(self) -> int:
        return self.channels

    def describe_row(self) -> dict:
        row = super().describe_row()
        c, o = self.channels, self.out_dim
        row.update(shape=f"{c}x{o}x1", A="1", G=f"{c}x{o}x{o} (exact)")
        return row

    # ------------------------------------------------------------------ capture
    def batch_size(self, x: torch.Tensor) -> int:
        if self.trailing:
            nd = len(self.module.normalized_shape)
            return x.shape[0] if x.dim() > nd else 1
        return x.shape[0]

    def check_input(self, x: torch.Tensor) -> None:
        if not x.is_floating_point():
            raise BlockInputError(f"module {self.name!r} expects floating-point inputs, got "
                                  f"{x.dtype}")

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """xhat, exactly as the module computes it before its affine map."""
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
            return F.rms_norm(x, m.normalized_shape, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        if isinstance(m, _BN):
            batch_stats = m.training or (m.running_mean is None and m.running_var is None)
            if batch_stats:
                return F.batch_norm(x, None, None, None, None, True, 0.0, m.eps)
            return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
        if isinstance(m, _IN):
            input_stats = m.training or not m.track_running_stats
            return F.instance_norm(x, None if input_stats else m.running_mean,
                                   None if input_stats else m.running_var, None, None,
                                   input_stats, 0.0, m.eps)
        raise TypeError(f"no normalisation rule for {type(m).__name__}")  # pragma: no cover

    def _channels_last(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """[N, positions, C] view of a tensor shaped like the module's input/output."""
        if not self.trailing:
            t = t.movedim(1, -1)
        return t.reshape(n, -1, self.channels)

    def per_example(self, inputs, grads, calls, cache: Optional[dict] = None) -> torch.Tensor:
        """u [N, C, 1(+1)]: per-example gradients of (scale, shift), summed over calls (with a
        ``cache``, xhat is computed once per call and micro-batch, however many backward passes
        the metric runs)."""
        pairs = self.paired(inputs, grads, calls)
        n = self.batch_size(pairs[0][0])
        if cache is None:
            cache = {}
        u = None
        for (x, g), c in zip(pairs, calls):
            xh = cache.get(c)
            if xh is None:
                xh = cache[c] = self.normalized(x.to(g.dtype))
            gc = self._channels_last(g, n)
            parts = [(gc * self._channels_last(xh, n)).sum(1)]
            if self.has_bias:
                parts.append(gc.sum(1))
            uc = torch.stack(parts, -1)                                   # [N, C, 1(+1)]
            u = uc if u is None else u + uc
        return u

    def a_jobs(self, inputs: List[torch.Tensor]):
        return [], torch.ones(self.channels, 1, 1, dtype=self.factor_dtype,
                              device=self.weight.device)

    def pass_jobs(self, inputs: List[torch.Tensor], grads: List[torch.Tensor], calls: List[int],
                  scale: float, cache: Optional[dict] = None) -> List[SyrkJob]:
        u = self.per_example(inputs, grads, calls, cache)
        return [SyrkJob(u.transpose(0, 1), scale / u.shape[0], False)]  # [C, N, 2] -> [C, 2, 2]

    def g_jobs(self, grads, scale):  # pragma: no cover - the engine calls pass_jobs
        raise NotImplementedError("NormBlock needs pass_jobs (pairs gradients with inputs)")

    # ------------------------------------------------------------------ gradients
    def grad_matrix(self, grads=None) -> Optional[torch.Tensor]:
        gw, gb = self.param_grads(grads)
        if gw is None:
            return None
        cols = [gw.reshape(-1)]
        if gb is not None:
            cols.append(gb.reshape(-1))
        return torch.stack(cols, -1).unsqueeze(-1)                          # [C, 2, 1]

    def param_matrix(self, values=None) -> torch.Tensor:
        w, b = self.param_values(values)
        cols = [w.reshape(-1)]
        if b is not None:
            cols.append(b.reshape(-1))
        return torch.stack(cols, -1).unsqueeze(-1)

    def split(self, U: torch.Tensor) -> List[torch.Tensor]:
        out = [U[:, 0, 0].reshape(self.weight.shape)]
        if self.has_bias:
            out.append(U[:, 1, 0].reshape(self.bias.shape))
        return out

    # ------------------------------------------------------------------ EKFAC
    def ekfac_sums(self, inputs, grads, calls, QG, QA):
        u = self.per_example(inputs, grads, calls)                         # [N, C, 2]
        g = u.transpose(0, 1).unsqueeze(2)                                  # [C, N, 1, 2]
        a = torch.ones(g.shape[:-1] + (1,), dtype=g.dtype, device=g.device)
        return ops.ekfac_scalings(g, a, QG, QA, backend=self.backend_for("ekfac_scalings"))

"""Convolution blocks (Conv1d/2d/3d): KFC factors (Grosse & Martens 2016) over patches."""
from __future__ import annotations

import itertools
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .. import ops
from .base import Block, BlockInputError, SyrkJob, mean_over_calls


def conv_padding(module) -> Tuple[List[Tuple[int, int]], str]:
    """Per spatial dim (left, right) zero/other padding of a conv module, and the pad mode."""
    nd = len(module.kernel_size)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pads = [(0, 0)] * nd
        else:  # "same"
            pads = []
            for d, k in zip(module.dilation, module.kernel_size):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in module.padding]
    return pads, module.padding_mode


class ConvBlock(Block):
    kind = "conv"

    def __init__(self, name, module, **kw):
        super().__init__(name, module, **kw)
        self.nd = len(module.kernel_size)
        self.pads, self.pad_mode = conv_padding(module)
        self.symmetric_zero = self.pad_mode == "zeros" and all(l == r for l, r in self.pads)

    def describe_row(self) -> dict:
        row = super().describe_row()
        row["module"] += f"(k={tuple(self.module.kernel_size)}, s={tuple(self.module.stride)})"
        return row

    def check_input(self, x: torch.Tensor) -> None:
        c = self.module.in_channels
        if x.dim() != self.nd + 2 or x.shape[1] != c:
            raise BlockInputError(f"module {self.name!r} expects inputs [N, {c}, "
                                  f"{', '.join('*' * self.nd)}], got shape {tuple(x.shape)}")

    def _padded(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, ...]]:
        """Input and the symmetric zero padding to hand to the patch computations."""
        if self.symmetric_zero:
            return x, tuple(l for l, _ in self.pads)
        flat = []
        for l, r in reversed(self.pads):
            flat += [l, r]
        mode = "constant" if self.pad_mode == "zeros" else self.pad_mode
        return F.pad(x, flat, mode=mode), (0,) * self.nd

    def _out_spatial(self, xp: torch.Tensor, pad) -> List[int]:
        m = self.module
        return [(xp.shape[2 + i] + 2 * pad[i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1)
                // m.stride[i] + 1 for i in range(self.nd)]

    def mean_patch_sum(self, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """(sum over output positions of each example's patch [N, C*K], T) without unfolding:
        for each kernel offset, the sum over a strided sub-grid of the padded input."""
        m = self.module
        xp, pad = self._padded(x)
        if any(pad):
            flat = []
            for p in reversed(pad):
                flat += [p, p]
            xp = F.pad(xp, flat)
        out = self._out_spatial(xp, (0,) * self.nd)
        cols = []
        for offs in itertools.product(*[range(k) for k in m.kernel_size]):
            idx = [slice(None), slice(None)]
            for i, o in enumerate(offs):
                start = o * m.dilation[i]
                idx.append(slice(start, start + m.stride[i] * (out[i] - 1) + 1, m.stride[i]))
            cols.append(xp[tuple(idx)].sum(dim=tuple(range(2, 2 + self.nd))))
        s = torch.stack(cols, dim=-1)                           # [N, C, K] in (c, k...) order
        return s.reshape(x.shape[0], -1), math.prod(out)

    def a_jobs(self, inputs: List[torch.Tensor]):
        m = self.module
        if self.weight_sharing == "reduce":
            a = mean_over_calls([self.mean_patch_sum(x) for x in inputs], self.name)
            return [SyrkJob(a, 1.0 / a.shape[0], self.has_bias)], None
        mats, weights = [], []
        for x in inputs:
            xp, pad = self._padded(x)
            mats.append(ops.conv_input_factor(xp, m.kernel_size, m.stride, pad, m.dilation,
                                              homogeneous=self.has_bias, backend=self.backend))
            weights.append(x.shape[0] * math.prod(self._out_spatial(xp, pad)))
        total = float(sum(weights))
        A = mats[0].to(self.factor_dtype) * (weights[0] / total)
        for w, mat in zip(weights[1:], mats[1:]):
            A = A + mat.to(self.factor_dtype) * (w / total)
        return [], A

    def g_jobs(self, grads: List[torch.Tensor], scale: float) -> List[SyrkJob]:
        mo = self.out_dim
        if self.weight_sharing == "expand":
            return [SyrkJob(g.movedim(1, -1).reshape(-1, mo), scale / g.shape[0], False)
                    for g in grads]
        n = grads[0].shape[0]
        total = None
        for g in grads:
            if g.shape[0] != n:
                raise BlockInputError(f"module {self.name!r} was called with different batch "
                                      f"sizes in one step; weight_sharing='reduce' needs one")
            s = g.reshape(n, mo, -1).sum(-1)
            total = s if total is None else total + s
        return [SyrkJob(total, scale / n, False)]

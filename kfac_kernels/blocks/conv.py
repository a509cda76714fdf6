"""Convolution blocks (Conv1d/2d/3d): KFC factors (Grosse & Martens 2016) over patches."""
from __future__ import annotations

import itertools
import math
from typing import List, Optional, Tuple

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


def _weighted_mean(mats: List[torch.Tensor], weights: List[int], dtype) -> torch.Tensor:
    """The input factors of several calls of one convolution, averaged with each call's number
    of (example, position) rows as its weight, in ``dtype``."""
    total = float(sum(weights))
    out = mats[0].to(dtype) * (weights[0] / total)
    for w, mat in zip(weights[1:], mats[1:]):
        out = out + mat.to(dtype) * (w / total)
    return out


class ConvBlock(Block):
    family = "conv"

    def __init__(self, name, module, **kw):
        super().__init__(name, module, **kw)
        self.nd = len(module.kernel_size)
        # the convolution whose patches the factors are built from (a transposed convolution
        # substitutes the equivalent stride-1 convolution: see ConvTransposeBlock)
        self.ks, self.st, self.dil = (tuple(module.kernel_size), tuple(module.stride),
                                      tuple(module.dilation))
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
        return [(xp.shape[2 + i] + 2 * pad[i] - self.dil[i] * (self.ks[i] - 1) - 1)
                // self.st[i] + 1 for i in range(self.nd)]

    def mean_patch_sum(self, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """(sum over output positions of each example's patch [N, C*K], T) without unfolding:
        for each kernel offset, the sum over a strided sub-grid of the padded input."""
        xp, pad = self._padded(x)
        if any(pad):
            flat = []
            for p in reversed(pad):
                flat += [p, p]
            xp = F.pad(xp, flat)
        out = self._out_spatial(xp, (0,) * self.nd)
        cols = []
        for offs in itertools.product(*[range(k) for k in self.ks]):
            idx = [slice(None), slice(None)]
            for i, o in enumerate(offs):
                start = o * self.dil[i]
                idx.append(slice(start, start + self.st[i] * (out[i] - 1) + 1, self.st[i]))
            cols.append(xp[tuple(idx)].sum(dim=tuple(range(2, 2 + self.nd))))
        s = torch.stack(cols, dim=-1)                           # [N, C, K] in (c, k...) order
        return s.reshape(x.shape[0], -1), math.prod(out)

    def a_jobs(self, inputs: List[torch.Tensor]):
        if self.weight_sharing == "reduce":
            a = mean_over_calls([self.mean_patch_sum(x) for x in inputs], self.name)
            return [SyrkJob(a, 1.0 / a.shape[0], self.has_bias)], None
        mats, weights = [], []
        for x in inputs:
            xp, pad = self._padded(x)
            mats.append(ops.conv_input_factor(xp, self.ks, self.st, pad, self.dil,
                                              homogeneous=self.has_bias, backend=self.backend))
            weights.append(x.shape[0] * math.prod(self._out_spatial(xp, pad)))
        return [], _weighted_mean(mats, weights, self.factor_dtype)

    def g_jobs(self, grads: List[torch.Tensor], scale: float) -> List[SyrkJob]:
        mo = self.out_dim
        if self.weight_sharing == "expand":
            # rows as a view of the [out, N*T] column layout (one blocked copy, then a plain GEMM)
            return [SyrkJob(g.transpose(0, 1).reshape(mo, -1).T, scale / g.shape[0], False)
                    for g in grads]
        n = grads[0].shape[0]
        total = None
        for g in grads:
            if g.shape[0] != n:
                raise BlockInputError(
                    f"module {self.name!r} was called with batch sizes "
                    f"{[self.batch_size(x) for x in grads]} in one step; weight_sharing='reduce' "
                    f"needs the same batch size in every call")
            s = g.reshape(n, mo, -1).sum(-1)
            total = s if total is None else total + s
        return [SyrkJob(total, scale / n, False)]

    # ------------------------------------------------------------------ EKFAC
    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, C*K] patches of one call (materialised: EKFAC's per-example gradients need them,
        and the engine hands them over in chunks of examples)."""
        xp, pad = self._padded(x)
        return ops.reference.conv_patches(xp, self.ks, self.st, pad, self.dil)

    def _ekfac_terms(self, chunk_pairs):
        """g [N, T, O] and patches [N, T, C*K] of a chunk of examples, calls concatenated along T."""
        g = torch.cat([gr.reshape(gr.shape[0], self.module.out_channels, -1).transpose(1, 2)
                       for _, gr in chunk_pairs], 1)
        a = torch.cat([self._patches(x) for x, _ in chunk_pairs], 1)
        return g, a

    def _chunks(self, pairs, per_example: int):
        """Split the examples so that one chunk's patches stay below ~2^24 elements."""
        n = pairs[0][0].shape[0]
        step = max(1, (1 << 24) // max(1, per_example))
        for s in range(0, n, step):
            yield [(x[s:s + step], g[s:s + step]) for x, g in pairs]

    def ekfac_sums(self, inputs, grads, calls, QG, QA):
        pairs = self.paired(inputs, grads, calls)
        per_example = sum(x[0:1].numel() * math.prod(self.ks) for x, _ in pairs)
        out = None
        for chunk in self._chunks(pairs, per_example):
            g, a = self._ekfac_terms(chunk)
            part = ops.ekfac_scalings(g, a, QG, QA, homogeneous=self.has_bias,
                                      backend=self.backend_for("ekfac_scalings"))
            out = part if out is None else out + part
        return out


class GroupedConvBlock(ConvBlock):
    """A convolution with ``groups > 1`` (depthwise included): one Kronecker block per group,
    held as a stack so that factor updates, decompositions and preconditioning of all groups are
    single batched op calls. Group j maps input channels [j C/g, (j+1) C/g) to output channels
    [j O/g, (j+1) O/g) with the weight rows ``weight[j O/g:(j+1) O/g].flatten(1)`` and their
    biases; its factors are the KFC factors of those channels alone."""

    family = "conv-grouped"
    stacked = True

    def __init__(self, name, module, **kw):
        super().__init__(name, module, **kw)
        self.groups = module.groups
        self.out_dim = module.out_channels // self.groups          # per group
        self.in_dim = math.prod(self.weight.shape[1:]) + int(self.has_bias)  # (C/g)*K (+1)

    @property
    def num_stack(self) -> int:
        return self.groups

    def describe_row(self) -> dict:
        row = super().describe_row()
        g = self.groups
        row.update(shape=f"{g}x{self.out_dim}x{self.in_dim}", A=f"{g}x{self.in_dim}x{self.in_dim}",
                   G=f"{g}x{self.out_dim}x{self.out_dim}")
        row["module"] = row["module"][:-1] + f", groups={g})"
        return row

    def a_jobs(self, inputs: List[torch.Tensor]):
        g = self.groups
        if self.weight_sharing == "reduce":
            a = mean_over_calls([self.mean_patch_sum(x) for x in inputs], self.name)   # [N, C*K]
            a = a.reshape(a.shape[0], g, -1).transpose(0, 1)                           # [g, N, CgK]
            return [SyrkJob(a, 1.0 / a.shape[1], self.has_bias)], None
        mats, weights = [], []
        for x in inputs:
            xp, pad = self._padded(x)
            mats.append(ops.conv_input_factor_grouped(
                xp, self.ks, self.st, pad, self.dil, g, homogeneous=self.has_bias,
                backend=self.backend_for("conv_input_factor_grouped")))
            weights.append(x.shape[0] * math.prod(self._out_spatial(xp, pad)))
        return [], _weighted_mean(mats, weights, self.factor_dtype)

    def g_jobs(self, grads: List[torch.Tensor], scale: float) -> List[SyrkJob]:
        g, mo = self.groups, self.out_dim
        if self.weight_sharing == "expand":
            return [SyrkJob(gr.movedim(1, -1).reshape(-1, g, mo).transpose(0, 1),
                            scale / gr.shape[0], False) for gr in grads]
        n = grads[0].shape[0]
        total = None
        for gr in grads:
            if gr.shape[0] != n:
                raise BlockInputError(
                    f"module {self.name!r} was called with batch sizes "
                    f"{[self.batch_size(x) for x in grads]} in one step; weight_sharing='reduce' "
                    f"needs the same batch size in every call")
            s = gr.reshape(n, g * mo, -1).sum(-1)
            total = s if total is None else total + s
        return [SyrkJob(total.reshape(n, g, mo).transpose(0, 1), scale / n, False)]

    def grad_matrix(self, grads=None) -> Optional[torch.Tensor]:
        gw, gb = self.param_grads(grads)
        if gw is None:
            return None
        g = self.groups
        gw = gw.reshape(g, self.out_dim, -1)
        if gb is None:
            return gw
        return torch.cat([gw, gb.reshape(g, self.out_dim, 1)], dim=2)

    def param_matrix(self, values=None) -> torch.Tensor:
        w, b = self.param_values(values)
        g = self.groups
        w = w.reshape(g, self.out_dim, -1)
        if b is None:
            return w
        return torch.cat([w, b.reshape(g, self.out_dim, 1)], dim=2)

    def split(self, U: torch.Tensor) -> List[torch.Tensor]:
        if not self.has_bias:
            return [U.reshape(self.weight.shape)]
        return [U[..., :-1].reshape(self.weight.shape), U[..., -1].reshape(self.bias.shape)]

    def ekfac_sums(self, inputs, grads, calls, QG, QA):
        g = self.groups
        pairs = self.paired(inputs, grads, calls)
        per_example = sum(x[0:1].numel() * math.prod(self.ks) for x, _ in pairs)
        out = None
        for chunk in self._chunks(pairs, per_example):
            gr, a = self._ekfac_terms(chunk)                      # [c, T, O], [c, T, C*K]
            n, t = gr.shape[:2]
            gr = gr.reshape(n, t, g, -1).permute(2, 0, 1, 3)       # [g, c, T, O/g]
            a = a.reshape(n, t, g, -1).permute(2, 0, 1, 3)         # [g, c, T, CgK]
            part = ops.ekfac_scalings(gr, a, QG, QA, homogeneous=self.has_bias,
                                      backend=self.backend_for("ekfac_scalings"))
            out = part if out is None else out + part
        return out


class ConvTransposeBlock(ConvBlock):
    """A transposed convolution (``nn.ConvTranspose1d/2d/3d``, ``groups=1``) as the convolution it
    equals: stride 1 and the same dilation over the input with ``stride - 1`` zeros inserted
    between its elements and padded by ``dilation (kernel - 1) - padding`` on each side (plus
    what the output size asks for on the far side: ``output_padding`` or ``output_size``), with
    the kernel flipped and its in/out channels swapped. The KFC factors are that convolution's:
    A over its patches (``C_in * prod(kernel) + 1``), G over the output channels. The capture
    stores the zero-inserted, padded input (``stride^d`` times the input's size), which every
    factor and EKFAC computation then treats as a plain stride-1 convolution's input."""

    family = "conv-transpose"

    def __init__(self, name, module, **kw):
        super().__init__(name, module, **kw)
        if module.groups != 1:
            raise ValueError("ConvTransposeBlock needs groups=1")
        self.out_dim = module.out_channels
        self.in_dim = module.in_channels * math.prod(module.kernel_size) + int(self.has_bias)
        self.up = tuple(module.stride)                # zero insertion of the input
        self.st = (1,) * self.nd
        self.pads, self.symmetric_zero = [(0, 0)] * self.nd, True   # applied at capture
        self._spatial = tuple(range(2, 2 + self.nd))

    def describe_row(self) -> dict:
        row = super().describe_row()
        row["module"] = (f"{type(self.module).__name__}(k={tuple(self.module.kernel_size)}, "
                         f"s={tuple(self.module.stride)})")
        return row

    def prepare_input(self, x: torch.Tensor, output) -> torch.Tensor:
        """The equivalent convolution's input: ``x`` zero-inserted and padded (or cropped) so
        that a stride-1 convolution with the flipped kernel yields ``output``'s spatial size."""
        n, c = x.shape[:2]
        sizes = [(s - 1) * u + 1 for s, u in zip(x.shape[2:], self.up)]
        up = x.new_zeros((n, c, *sizes))
        up[(slice(None), slice(None)) + tuple(slice(None, None, u) for u in self.up)] = x
        flat = []
        for i in reversed(range(self.nd)):
            reach = self.dil[i] * (self.ks[i] - 1)
            left = reach - self.module.padding[i]
            right = output.shape[2 + i] + reach - sizes[i] - left
            flat += [left, right]
        return F.pad(up, flat)

    def grad_matrix(self, grads=None) -> Optional[torch.Tensor]:
        gw, gb = self.param_grads(grads)
        if gw is None:
            return None
        gw = self._as_conv(gw)
        if gb is None:
            return gw
        return torch.cat([gw, gb.reshape(-1, 1)], dim=1)

    def param_matrix(self, values=None) -> torch.Tensor:
        w, b = self.param_values(values)
        w = self._as_conv(w)
        if b is None:
            return w
        return torch.cat([w, b.reshape(-1, 1)], dim=1)

    def _as_conv(self, w: torch.Tensor) -> torch.Tensor:
        """[C_in, C_out, k...] transposed-conv weight -> [C_out, C_in * prod(k)] conv layout."""
        return w.flip(self._spatial).transpose(0, 1).reshape(self.out_dim, -1)

    def split(self, U: torch.Tensor) -> List[torch.Tensor]:
        co, ci = self.module.out_channels, self.module.in_channels
        W = U[:, :-1] if self.has_bias else U
        W = W.reshape(co, ci, *self.ks).transpose(0, 1).flip(self._spatial)
        if not self.has_bias:
            return [W]
        return [W, U[:, -1].reshape(self.bias.shape)]

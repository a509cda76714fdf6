"""Recurrent and attention layers K-FAC can see: the maths of torch's RNN/GRU/LSTM and
MultiheadAttention, built from nn.Linear (``convert(model)`` swaps them into a model in place).

torch's fused ``nn.RNN/GRU/LSTM`` and ``nn.*Cell`` compute their gate pre-activations inside one op,
so forward hooks never see the layer input/gate pairs K-FAC needs (``describe()`` lists their
parameters in the fallback with that reason). These modules compute exactly the same functions
with two ``nn.Linear`` layers per cell, ``ih`` (input -> gates) and ``hh`` (hidden -> gates), both
with their own bias as in torch:

* RNNCell:  h' = act(W_ih x + b_ih + W_hh h + b_hh)
* GRUCell:  r, z = sigmoid(gi_r + gh_r), sigmoid(gi_z + gh_z); n = tanh(gi_n + r * gh_n);
            h' = (1 - z) * n + z * h            (gi = ih(x), gh = hh(h); gates ordered r, z, n)
* LSTMCell: i, f, g, o = gates ordered as torch (i, f, o sigmoid, g tanh);
            c' = f * c + i * g; h' = o * tanh(c')

Parameters can be copied from torch's modules (``from_torch``), and initialisation follows torch's
(uniform in ±1/sqrt(hidden_size)).

For K-FAC each Linear is one block used at every time step: the tied-weight K-FAC of Martens, Ba
& Johnson (2018) with independence across time steps (weight_sharing="expand": A averages the
inputs over the N·T (example, step) pairs, G sums the output-gradient outer products over steps
and averages over examples), or "reduce" (inputs averaged and gradients summed over the steps of
each example first). See docs/layers.md.

The sequence modules (``RNN``, ``GRU``, ``LSTM``) apply ``ih`` to the whole input sequence in one
call and ``hh`` once per step: under both weight-sharing modes this gives the same factors as T
separate calls (a Linear on [N, T, k] treats T as positions, and repeated calls accumulate the
same way).

``MultiheadAttention`` computes what ``nn.MultiheadAttention`` computes (same masks, dropout and
returned weights) with four ``nn.Linear`` projections, ``q_proj``, ``k_proj``, ``v_proj`` and
``out_proj``, each a K-FAC block over the sequence. It keeps torch's argument conventions
(``batch_first=False`` means [L, N, E] inputs) but always projects batch-first, so the Linears see
the examples in dim 0 as K-FAC requires. ``add_bias_kv`` and ``add_zero_attn`` are not supported.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RNNCell", "GRUCell", "LSTMCell", "RNN", "GRU", "LSTM", "MultiheadAttention", "convert",
           "recalibrate_batchnorm"]


class _CellBase(nn.Module):
    gates = 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.ih = nn.Linear(input_size, self.gates * hidden_size, **kw)
        self.hh = nn.Linear(hidden_size, self.gates * hidden_size, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.ih.bias is not None}"

    @classmethod
    def from_torch(cls, cell: nn.RNNCellBase) -> "_CellBase":
        """A cell with the parameters of torch's cell (copied)."""
        kw = {}
        if cls is RNNCell:
            kw["nonlinearity"] = cell.nonlinearity
        out = cls(cell.input_size, cell.hidden_size, bias=cell.bias, device=cell.weight_ih.device,
                  dtype=cell.weight_ih.dtype, **kw)
        out._copy_from(cell, "")
        return out

    def _copy_from(self, src: nn.Module, suffix: str) -> None:
        with torch.no_grad():
            self.ih.weight.copy_(getattr(src, "weight_ih" + suffix))
            self.hh.weight.copy_(getattr(src, "weight_hh" + suffix))
            if self.ih.bias is not None:
                self.ih.bias.copy_(getattr(src, "bias_ih" + suffix))
                self.hh.bias.copy_(getattr(src, "bias_hh" + suffix))

    def _zeros(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[:-1] + (self.hidden_size,))


class RNNCell(_CellBase):
    """torch.nn.RNNCell's maths: h' = act(W_ih x + b_ih + W_hh h + b_hh), act tanh or relu."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}; expected 'tanh' or 'relu'")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, device, dtype)

    def step(self, gi: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        s = gi + self.hh(h)
        return torch.tanh(s) if self.nonlinearity == "tanh" else torch.relu(s)

    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.step(self.ih(input), self._zeros(input) if hx is None else hx)


class GRUCell(_CellBase):
    """torch.nn.GRUCell's maths (gates r, z, n; the reset gate multiplies W_hn h + b_hn)."""
    gates = 3

    def step(self, gi: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        gh = self.hh(h)
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h

    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.step(self.ih(input), self._zeros(input) if hx is None else hx)


class LSTMCell(_CellBase):
    """torch.nn.LSTMCell's maths (gates i, f, g, o); returns (h', c')."""
    gates = 4

    def step(self, gi: torch.Tensor, state: Tuple[torch.Tensor, torch.Tensor]):
        h, c = state
        gates = gi + self.hh(h)
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, input: torch.Tensor,
                hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        if hx is None:
            z = self._zeros(input)
            hx = (z, z)
        return self.step(self.ih(input), hx)


class _SeqBase(nn.Module):
    cell_type = RNNCell

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, **cell_kw):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.batch_first = num_layers, batch_first
        self.dropout, self.bidirectional = float(dropout), bool(bidirectional)
        D = 2 if bidirectional else 1

        def cells():
            return nn.ModuleList(
                self.cell_type(input_size if i == 0 else D * hidden_size, hidden_size, bias=bias,
                               device=device, dtype=dtype, **cell_kw) for i in range(num_layers))
        self.layers = cells()
        # the reverse direction's cells (torch's *_reverse parameters), run on the flipped sequence
        self.layers_reverse = cells() if bidirectional else None

    @classmethod
    def from_torch(cls, rnn: nn.RNNBase) -> "_SeqBase":
        """A module with the parameters of torch's fused RNN/GRU/LSTM (copied; any number of
        layers, bidirectional, dropout between layers; not LSTM's ``proj_size``)."""
        if getattr(rnn, "proj_size", 0):
            raise ValueError("from_torch does not support LSTM(proj_size > 0)")
        kw = {"nonlinearity": rnn.nonlinearity} if cls is RNN else {}
        out = cls(rnn.input_size, rnn.hidden_size, rnn.num_layers, bias=rnn.bias,
                  batch_first=rnn.batch_first, dropout=rnn.dropout,
                  bidirectional=rnn.bidirectional, device=rnn.weight_ih_l0.device,
                  dtype=rnn.weight_ih_l0.dtype, **kw)
        for i, cell in enumerate(out.layers):
            cell._copy_from(rnn, f"_l{i}")
        if out.layers_reverse is not None:
            for i, cell in enumerate(out.layers_reverse):
                cell._copy_from(rnn, f"_l{i}_reverse")
        out.train(rnn.training)
        return out

    def _run_layer(self, cell, x: torch.Tensor, state):
        """x [N, T, k] -> outputs [N, T, H] and the final state."""
        gi = cell.ih(x)                                          # one call over all T positions
        outs = []
        for t in range(x.shape[1]):
            state = cell.step(gi[:, t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outs, 1), state

    def forward(self, input: torch.Tensor, hx=None):
        unbatched = input.dim() == 2                                  # [T, k]
        if unbatched:
            x = input.unsqueeze(0)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        else:
            x = input if self.batch_first else input.transpose(0, 1)  # [N, T, k]
        D = 2 if self.bidirectional else 1
        finals = []
        for i, cell in enumerate(self.layers):
            if i > 0 and self.dropout > 0:          # torch: between layers, not after the last
                x = F.dropout(x, self.dropout, self.training)
            out, state = self._run_layer(cell, x, self._initial(hx, D * i, x))
            finals.append(state)
            if D == 2:
                back, state = self._run_layer(self.layers_reverse[i], x.flip(1),
                                              self._initial(hx, D * i + 1, x))
                finals.append(state)
                out = torch.cat([out, back.flip(1)], -1)
            x = out
        out = x if self.batch_first else x.transpose(0, 1)
        h_n = self._finals(finals)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            h_n = tuple(h.squeeze(1) for h in h_n) if isinstance(h_n, tuple) else h_n.squeeze(1)
        return out, h_n

    def _initial(self, hx, i, x):
        if hx is None:
            return x.new_zeros(x.shape[0], self.hidden_size)
        return hx[i]

    def _finals(self, finals):
        return torch.stack(finals, 0)


class RNN(_SeqBase):
    """torch.nn.RNN's maths, built from :class:`RNNCell`s."""
    cell_type = RNNCell


class GRU(_SeqBase):
    """torch.nn.GRU's maths, built from :class:`GRUCell`s."""
    cell_type = GRUCell


class LSTM(_SeqBase):
    """torch.nn.LSTM's maths (no projection), built from :class:`LSTMCell`s;
    ``forward`` returns ``(output, (h_n, c_n))``."""
    cell_type = LSTMCell

    def _initial(self, hx, i, x):
        if hx is None:
            z = x.new_zeros(x.shape[0], self.hidden_size)
            return (z, z)
        return (hx[0][i], hx[1][i])

    def _finals(self, finals):
        return (torch.stack([h for h, _ in finals], 0), torch.stack([c for _, c in finals], 0))


# ----------------------------------------------------------------------------- attention
class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` from four ``nn.Linear`` projections (see the module docstring).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` returns ``(output, weights or None)`` with
    torch's shapes and mask semantics: a boolean mask marks positions that may NOT be attended
    to, a float mask is added to the scores; ``attn_mask`` is [L, S] or [N * num_heads, L, S],
    ``key_padding_mask`` is [N, S]; ``is_causal`` without an ``attn_mask`` applies a causal mask.
    """

    # attributes torch's Transformer layers read before deciding against their fused fast path
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None
    bias_k = bias_v = None
    add_zero_attn = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads "
                             f"({num_heads})")
        kw = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = float(dropout), batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        for lin in (self.q_proj, self.k_proj, self.v_proj):     # torch's initialisation
            nn.init.xavier_uniform_(lin.weight)
        if bias:
            for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
                nn.init.zeros_(lin.bias)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiheadAttention":
        """A module with the parameters (copies) and settings of torch's ``mha``."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("MultiheadAttention.from_torch does not support add_bias_kv=True or "
                             "add_zero_attn=True")
        w = mha.out_proj.weight
        out = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout,
                  bias=mha.in_proj_bias is not None, batch_first=mha.batch_first,
                  kdim=mha.kdim, vdim=mha.vdim, device=w.device, dtype=w.dtype)
        E = mha.embed_dim
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                ws = mha.in_proj_weight.split(E)
            else:
                ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            for lin, wt in zip((out.q_proj, out.k_proj, out.v_proj), ws):
                lin.weight.copy_(wt)
            if mha.in_proj_bias is not None:
                for lin, bt in zip((out.q_proj, out.k_proj, out.v_proj),
                                   mha.in_proj_bias.split(E)):
                    lin.bias.copy_(bt)
                out.out_proj.bias.copy_(mha.out_proj.bias)
            out.out_proj.weight.copy_(mha.out_proj.weight)
        out.train(mha.training)
        return out

    def _mask(self, attn_mask, key_padding_mask, N: int, L: int, S: int, dtype, device):
        """One additive float mask broadcastable to [N, H, L, S] (None if there is none)."""
        def additive(m):
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(
                    m, float("-inf"))
            return m.to(dtype)
        out = None
        if attn_mask is not None:
            m = additive(attn_mask)
            if m.dim() == 2:
                if m.shape != (L, S):
                    raise ValueError(f"attn_mask of shape {tuple(m.shape)}: expected ({L}, {S})")
                m = m.view(1, 1, L, S)
            elif m.dim() == 3:
                if m.shape != (N * self.num_heads, L, S):
                    raise ValueError(f"attn_mask of shape {tuple(m.shape)}: expected "
                                     f"({N * self.num_heads}, {L}, {S})")
                m = m.view(N, self.num_heads, L, S)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {m.dim()}-D")
            out = m
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S):
                raise ValueError(f"key_padding_mask of shape {tuple(key_padding_mask.shape)}: "
                                 f"expected ({N}, {S})")
            m = additive(key_padding_mask).view(N, 1, 1, S)
            out = m if out is None else out + m
        return out

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        batched = query.dim() == 3
        if not batched:                    # [L, E]: one example
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:         # [L, N, E] -> batch first: examples in dim 0
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        N, L, _ = query.shape
        S = key.shape[1]
        H, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(N, L, H, d).transpose(1, 2)
        k = self.k_proj(key).view(N, S, H, d).transpose(1, 2)
        v = self.v_proj(value).view(N, S, H, d).transpose(1, 2)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        mask = self._mask(attn_mask, key_padding_mask, N, L, S, q.dtype, q.device)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            out = F.dropout(weights, p, training=p > 0) @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, self.embed_dim))
        if not batched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


_CONVERT = {nn.RNN: RNN, nn.GRU: GRU, nn.LSTM: LSTM, nn.RNNCell: RNNCell, nn.GRUCell: GRUCell,
            nn.LSTMCell: LSTMCell, nn.MultiheadAttention: MultiheadAttention}


def convert(model: nn.Module) -> nn.Module:
    """Replace, in place, every torch module K-FAC cannot see into by its counterpart here:
    ``nn.MultiheadAttention`` (also inside ``nn.Transformer*Layer``), ``nn.RNN``, ``nn.GRU``,
    ``nn.LSTM`` and their cells (``from_torch`` copies the parameters, so the model computes the
    same function; training mode is kept). Returns ``model``; convert before creating the optimiser. A module the counterpart
    cannot represent (``add_bias_kv``, ``LSTM(proj_size=...)``, ...) raises ``ValueError`` naming it."""
    if type(model) in _CONVERT:
        raise ValueError(f"convert() replaces submodules in place; wrap the {type(model).__name__} "
                         f"in a container, or call {_CONVERT[type(model)].__name__}.from_torch")
    for name, child in list(model.named_children()):
        target = _CONVERT.get(type(child))
        if target is None:
            convert(child)
            continue
        try:
            new = target.from_torch(child)
        except ValueError as exc:
            raise ValueError(f"cannot convert {name!r} ({type(child).__name__}): {exc}") from None
        setattr(model, name, new)
    return model


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, forward=None) -> int:
    """Recompute every BatchNorm layer's running statistics for the current weights, as the exact
    average over ``batches`` (an iterable of model inputs; ``forward(model, batch)`` if a batch
    is not the model's one argument), and return how many batches were used.

    Why: BatchNorm's running statistics are an exponential average over past steps, so they lag
    the weights; after large steps (K-FAC's are) an eval-mode model normalises with statistics of
    an older model and its accuracy swings while the training loss is ~0. Call this before
    evaluating, with a few training batches (4-8 of the training batch size suffice on the
    ResNet benchmark, benchmarks/resnet_bn.py): the statistics are then those of the weights being
    evaluated. Runs in training mode under ``torch.no_grad()`` (so K-FAC captures nothing),
    restores each layer's ``momentum`` and the model's mode; the weights do not change."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [m.momentum for m in bns]
    was = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                 # a cumulative (exact) average over the batches
    n = 0
    try:
        model.train()
        for batch in batches:
            if forward is None:
                model(batch)
            else:
                forward(model, batch)
            n += 1
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was)
    if n == 0:
        raise ValueError("recalibrate_batchnorm: no batches given; pass a few training batches "
                         "(the running statistics were reset and need at least one)")
    return n

"""Recurrent layers K-FAC can see: the maths of torch's RNN/GRU/LSTM, built from nn.Linear.

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
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["RNNCell", "GRUCell", "LSTMCell", "RNN", "GRU", "LSTM"]


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
                 batch_first: bool = False, device=None, dtype=None, **cell_kw):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.batch_first = num_layers, batch_first
        self.layers = nn.ModuleList(
            self.cell_type(input_size if i == 0 else hidden_size, hidden_size, bias=bias,
                           device=device, dtype=dtype, **cell_kw) for i in range(num_layers))

    @classmethod
    def from_torch(cls, rnn: nn.RNNBase) -> "_SeqBase":
        """A module with the parameters of torch's fused RNN/GRU/LSTM (unidirectional, no
        projection, no dropout between layers)."""
        if rnn.bidirectional or getattr(rnn, "proj_size", 0) or rnn.dropout:
            raise ValueError("from_torch supports unidirectional modules without proj_size or "
                             "dropout")
        kw = {"nonlinearity": rnn.nonlinearity} if cls is RNN else {}
        out = cls(rnn.input_size, rnn.hidden_size, rnn.num_layers, bias=rnn.bias,
                  batch_first=rnn.batch_first, device=rnn.weight_ih_l0.device,
                  dtype=rnn.weight_ih_l0.dtype, **kw)
        for i, cell in enumerate(out.layers):
            cell._copy_from(rnn, f"_l{i}")
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
        finals = []
        for i, cell in enumerate(self.layers):
            state = self._initial(hx, i, x)
            x, state = self._run_layer(cell, x, state)
            finals.append(state)
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
    """torch.nn.RNN's maths (unidirectional), built from :class:`RNNCell`s."""
    cell_type = RNNCell


class GRU(_SeqBase):
    """torch.nn.GRU's maths (unidirectional), built from :class:`GRUCell`s."""
    cell_type = GRUCell


class LSTM(_SeqBase):
    """torch.nn.LSTM's maths (unidirectional, no projection), built from :class:`LSTMCell`s;
    ``forward`` returns ``(output, (h_n, c_n))``."""
    cell_type = LSTMCell

    def _initial(self, hx, i, x):
        if hx is None:
            z = x.new_zeros(x.shape[0], self.hidden_size)
            return (z, z)
        return (hx[0][i], hx[1][i])

    def _finals(self, finals):
        return (torch.stack([h for h, _ in finals], 0), torch.stack([c for _, c in finals], 0))

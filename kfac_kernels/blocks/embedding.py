"""nn.Embedding: a linear layer on one-hot inputs, so A is DIAGONAL (token frequencies).

The layer computes s = W^T e_v for token v, W = weight [V, d]. In docs/math.md's s = W abar form the
block's matrix is ``weight^T`` [d, V] (out = d, in = V, no bias), the input is the one-hot e_v and

* expand: A = (1/P) sum_{n,t} e_{v_nt} e_{v_nt}^T = diag(token counts / P), G = (1/N) sum_{n,t} g g^T;
* reduce: abar_n = (1/T_n) sum_t e_{v_nt} is a histogram, and reduce's A = (1/N) sum_n abar_n
  abar_n^T is dense; the block keeps its DIAGONAL, A_v = (1/N) sum_n (c_nv / T_n)^2 (c_nv: count
  of v in example n), and G = (1/N) sum_n g_n g_n^T with g_n = sum_t g_nt.

P counts the (non-padding) positions of the batch and T_n those of example n. Positions holding
``padding_idx`` are dropped entirely: their output does not depend on any trainable parameter
(the padding row gets no gradient), so they contribute to neither A nor G, and the padding row
gets no update (its column of the gradient matrix is zeroed, weight decay included).

A is stored as a vector [V]; no V x V matrix is ever formed, and preconditioning is
``U = QG [(QG^T V) / (lamG a^T + damping)]`` (``ops.kron_precondition_diag``).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import ops
from .base import Block, BlockInputError, SyrkJob


def segment_counts(tokens: torch.Tensor, weights: torch.Tensor, num: int) -> torch.Tensor:
    """sum_n (sum_{t: tokens[n,t] = v} weights[n,t])^2 for every v, as a vector [num], without an
    [N, V] buffer and without host synchronisation (sort each example's tokens, segment-sum)."""
    n, t = tokens.shape
    tok, order = tokens.sort(dim=1)
    w = weights.gather(1, order)
    first = torch.ones_like(tok, dtype=torch.bool)
    first[:, 1:] = tok[:, 1:] != tok[:, :-1]
    seg = first.to(torch.int64).cumsum(1) - 1
    flat = (torch.arange(n, device=tokens.device).unsqueeze(1) * t + seg).reshape(-1)
    sums = torch.zeros(n * t, dtype=w.dtype, device=w.device).index_add_(0, flat, w.reshape(-1))
    seg_tok = torch.zeros(n * t, dtype=torch.int64, device=w.device).scatter_(0, flat, tok.reshape(-1))
    return torch.zeros(num, dtype=w.dtype, device=w.device).index_add_(0, seg_tok, sums * sums)


class EmbeddingBlock(Block):
    family = "embedding"
    diag_A = True

    def __init__(self, name, module, **kw):
        super().__init__(name, module, **kw)
        self.num_embeddings, dim = self.weight.shape
        self.out_dim, self.in_dim = dim, self.num_embeddings
        self.padding_idx: Optional[int] = module.padding_idx

    def describe_row(self) -> dict:
        row = super().describe_row()
        row["module"] += f"({self.num_embeddings}, {self.out_dim}" + (
            f", padding_idx={self.padding_idx})" if self.padding_idx is not None else ")")
        return row

    # ------------------------------------------------------------------ capture
    def check_input(self, x: torch.Tensor) -> None:
        if x.dtype not in (torch.int64, torch.int32):
            raise BlockInputError(f"module {self.name!r} (Embedding) expects integer token ids, "
                                  f"got dtype {x.dtype}")

    def batch_size(self, x: torch.Tensor) -> int:
        return x.shape[0] if x.dim() >= 1 else 1

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.batch_size(x), -1).to(torch.int64)          # [N, T]

    def _mask(self, tok: torch.Tensor, dtype) -> Optional[torch.Tensor]:
        if self.padding_idx is None:
            return None
        return (tok != self.padding_idx).to(dtype)

    def a_jobs(self, inputs: List[torch.Tensor]):
        dt, dev, V = self.factor_dtype, self.weight.device, self.num_embeddings
        toks = [self._tokens(x) for x in inputs]
        if self.weight_sharing == "expand":
            counts = torch.zeros(V, dtype=dt, device=dev)
            total = 0
            for tok in toks:
                w = self._mask(tok, dt)
                if w is None:
                    counts.index_add_(0, tok.reshape(-1), torch.ones(tok.numel(), dtype=dt,
                                                                     device=dev))
                    total = total + tok.numel()
                else:
                    counts.index_add_(0, tok.reshape(-1), w.reshape(-1))
                    total = total + w.sum()
            if isinstance(total, torch.Tensor):
                total = total.clamp_min(1.0)       # a batch of padding only: A = 0, no NaN
            return [], counts / total
        n = toks[0].shape[0]
        if any(t.shape[0] != n for t in toks):
            raise BlockInputError(
                f"module {self.name!r} was called with batch sizes {[t.shape[0] for t in toks]} in "
                f"one step; weight_sharing='reduce' needs the same batch size in every call")
        tok = torch.cat(toks, 1)                                            # [N, T_total]
        w = self._mask(tok, dt)
        if w is None:
            w = torch.full(tok.shape, 1.0 / tok.shape[1], dtype=dt, device=dev)
        else:
            w = w / w.sum(1, keepdim=True).clamp_min(1.0)                   # 1 / T_n
        return [], segment_counts(tok, w, V) / n

    def pass_jobs(self, inputs: List[torch.Tensor], grads: List[torch.Tensor], calls: List[int],
                  scale: float, cache: Optional[dict] = None) -> List[SyrkJob]:
        d = self.out_dim
        n = self.batch_size(inputs[calls[0]])
        rows = []
        for gr, c in zip(grads, calls):
            tok = self._tokens(inputs[c])
            if tok.shape[0] != n and self.weight_sharing == "reduce":
                raise BlockInputError(
                    f"module {self.name!r} was called with batch sizes "
                    f"{[self.batch_size(inputs[c]) for c in calls]} in one step; "
                    f"weight_sharing='reduce' needs the same batch size in every call")
            gr = gr.reshape(tok.shape[0], -1, d)                            # [N, T, d]
            w = self._mask(tok, gr.dtype)
            if w is not None:
                gr = gr * w.unsqueeze(-1)
            rows.append(gr)
        if self.weight_sharing == "expand":
            return [SyrkJob(gr.reshape(-1, d), scale / gr.shape[0], False) for gr in rows]
        total = rows[0].sum(1)
        for gr in rows[1:]:
            total = total + gr.sum(1)
        return [SyrkJob(total, scale / n, False)]

    def g_jobs(self, grads, scale):  # pragma: no cover - the engine calls pass_jobs
        raise NotImplementedError("EmbeddingBlock needs pass_jobs (padding masks per call)")

    # ------------------------------------------------------------------ gradients
    def grad_matrix(self, grads=None) -> Optional[torch.Tensor]:
        gw, _ = self.param_grads(grads)
        if gw is None:
            return None
        V = gw.t()
        if self.padding_idx is not None:
            V = V.clone()
            V[:, self.padding_idx] = 0
        return V

    def param_matrix(self, values=None) -> torch.Tensor:
        W = self.param_values(values)[0].t()
        if self.padding_idx is not None:
            W = W.clone()
            W[:, self.padding_idx] = 0
        return W

    def split(self, U: torch.Tensor) -> List[torch.Tensor]:
        return [U.t().reshape(self.weight.shape)]

    # ------------------------------------------------------------------ EKFAC
    def ekfac_sums(self, inputs, grads, calls, QG, QA):
        pairs = self.paired(inputs, grads, calls)
        n, d = self.batch_size(pairs[0][0]), self.out_dim
        tok = torch.cat([self._tokens(x) for x, _ in pairs], 1)
        g = torch.cat([gr.reshape(n, -1, d) for _, gr in pairs], 1)
        return ops.ekfac_scalings_embedding(g, tok, QG, self.num_embeddings,
                                            padding_idx=self.padding_idx,
                                            backend=self.backend_for("ekfac_scalings_embedding"))

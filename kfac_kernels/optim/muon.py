"""Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training") on the kernel ops.

The options, defaults and update of ``torch.optim.Muon``. For a 2-D parameter W with gradient G,
momentum mu, learning rate lr and weight decay wd, each step::

    M <- mu M + (1 - mu) G                        (the momentum buffer, a running average)
    U  = (1 - mu) G + mu M  if nesterov, else M
    O  = NS(U)                                    ops.newton_schulz, batched over same shapes
    W <- W (1 - lr wd) - lr' O                    lr' = adjust(lr, W.shape)

with ``adjust`` ``"original"`` (None): ``lr sqrt(max(1, rows / cols))``, or ``"match_rms_adamw"``:
``0.2 lr sqrt(max(rows, cols))``. ``NS`` runs ``ns_steps`` Newton-Schulz iterations with
``ns_coefficients`` on ``U / max(||U||_F, eps)`` in ``ns_dtype`` (bfloat16 by default, as
``torch.optim.Muon`` does whatever the parameter dtype). Parameters of one param group with the
same shape, dtype and device form one stack, so one op call serves all of them.

Muon is for the 2-D weights of hidden layers. Embeddings, the output head, norms and biases are
usually left to AdamW: either a second optimizer, or a param group of this one with
``use_muon=False``, which runs ``torch.optim.AdamW``'s update (its defaults: betas (0.9, 0.999),
eps 1e-8, weight_decay 0.01; lr Muon's unless the group gives its own). :func:`muon_param_groups`
builds that split for a model.
"""
from __future__ import annotations

import math
import numbers
from typing import List

import torch
from torch import nn

from .. import ops
from ._common import ParamBatch, StackedOptimizer, check_positive, check_unit

__all__ = ["Muon", "muon_param_groups"]

_ADJUST = (None, "original", "match_rms_adamw")
_NS_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
# what a use_muon=False group gets unless it says otherwise: torch.optim.AdamW's defaults
ADAMW_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)

_SPLIT = ("give embeddings, the output head, norms and biases to AdamW: a second optimizer "
          "(torch.optim.AdamW) or a param group {'params': [...], 'use_muon': False} of this "
          "one (kfac_kernels.optim.muon_param_groups(model) builds both groups)")


def adjusted_lr(lr: float, adjust_lr_fn, shape) -> float:
    """The learning rate Muon applies to the orthogonalised update of a ``shape`` parameter."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))


class Muon(StackedOptimizer):
    r"""Muon: momentum, orthogonalised by Newton-Schulz, for 2-D parameters (see the module doc).

    Args (names, defaults and meaning as ``torch.optim.Muon``'s):
        params: 2-D parameters or param_groups; a group with ``use_muon=False`` is AdamW.
        lr: learning rate (a number or a one-element tensor).
        weight_decay: decoupled weight decay, ``W <- W (1 - lr wd)``.
        momentum: mu of the momentum buffer ``M <- mu M + (1 - mu) G``.
        nesterov: use ``(1 - mu) G + mu M`` instead of ``M``.
        ns_coefficients: (a, b, c) of the quintic Newton-Schulz iteration.
        eps: lower bound of the Frobenius norm the update is divided by.
        ns_steps: Newton-Schulz iterations (0 to 99).
        adjust_lr_fn: None / ``"original"`` or ``"match_rms_adamw"``.
        ns_dtype: the iteration's dtype: bfloat16 (default, as torch.optim.Muon), float32 or
            float64.
        batch_shapes: one op call per group of same-shaped parameters (default); False runs one
            call per parameter (a benchmark baseline).
        backend: the ops' ``backend=`` ("auto" runs the Triton kernel on GPUs).
    """

    def __init__(self, params, lr=1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients=ops.reference.NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn=None, *,
                 ns_dtype: torch.dtype = torch.bfloat16, batch_shapes: bool = True,
                 backend: str = "auto"):
        _check_lr(lr)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        check_positive("momentum", momentum, allow_zero=True)
        check_positive("eps", eps)
        if not isinstance(ns_coefficients, (tuple, list)) or len(ns_coefficients) != 3 or \
                not all(isinstance(v, numbers.Real) for v in ns_coefficients):
            raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got "
                             f"{ns_coefficients!r}")
        if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 0 <= ns_steps < 100:
            raise ValueError(f"ns_steps must be an integer in [0, 100), got {ns_steps!r}")
        if adjust_lr_fn not in _ADJUST:
            raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw'; got "
                             f"{adjust_lr_fn!r}")
        if ns_dtype not in _NS_DTYPES:
            raise ValueError(f"ns_dtype must be torch.bfloat16, torch.float32 or torch.float64; "
                             f"got {ns_dtype!r}")
        self.backend = backend
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        nesterov=bool(nesterov), ns_coefficients=tuple(ns_coefficients), eps=eps,
                        ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype,
                        use_muon=True)
        super().__init__(params, defaults, batch_shapes=batch_shapes)

    def _work_dtype(self, p):
        return p.dtype          # momentum (and AdamW's moments) in the parameter's dtype, as torch

    def add_param_group(self, param_group):
        if not param_group.get("use_muon", True):
            for k, v in ADAMW_DEFAULTS.items():
                param_group.setdefault(k, v)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["use_muon"]:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D weight matrices only, got a parameter of "
                                     f"shape {tuple(p.shape)}; {_SPLIT}")
        else:
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"betas of a use_muon=False group must be a pair, got {betas!r}")
            check_unit("betas[0]", betas[0])
            check_unit("betas[1]", betas[1])
            check_positive("eps", group["eps"])
        _check_lr(group["lr"])
        check_positive("weight_decay", group["weight_decay"], allow_zero=True)

    def load_state_dict(self, state_dict):
        """As torch's, keeping saved state dtypes; a ``torch.optim.Muon`` state_dict loads too
        (its groups lack ``use_muon`` and ``ns_dtype``: they get this optimizer's defaults)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for k in ("use_muon", "ns_dtype"):
                group.setdefault(k, self.defaults[k])

    def _group_step(self, group: dict, pb: ParamBatch) -> None:
        if group["use_muon"]:
            self._muon(group, pb)
        else:
            self._adamw(group, pb)

    def _muon(self, group, pb):
        G = pb.grads()
        buf = pb.buffer("momentum_buffer", lambda: torch.zeros_like(G))
        mu = group["momentum"]
        buf.lerp_(G, 1.0 - mu)
        U = G.lerp(buf, mu) if group["nesterov"] else buf
        O = ops.newton_schulz(U, group["ns_steps"], group["ns_coefficients"], group["eps"],
                              dtype=group["ns_dtype"], backend=self._b("newton_schulz"))
        lr = float(group["lr"])
        params = pb.params
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
        ups = [o.to(p.dtype) for o, p in zip(O.unbind(0), params)]
        torch._foreach_add_(params, ups, alpha=-adjusted_lr(lr, group["adjust_lr_fn"],
                                                              (pb.m, pb.n)))

    def _adamw(self, group, pb):
        """torch.optim.AdamW's update on the stack (non-amsgrad, non-maximize)."""
        t = pb.advance()
        G = pb.grads()
        m = pb.buffer("exp_avg", lambda: torch.zeros_like(G))
        v = pb.buffer("exp_avg_sq", lambda: torch.zeros_like(G))
        b1, b2 = group["betas"]
        lr = float(group["lr"])
        m.lerp_(G, 1.0 - b1)
        v.mul_(b2).addcmul_(G, G, value=1.0 - b2)
        denom = (v.sqrt() / math.sqrt(1.0 - b2 ** t)).add_(group["eps"])
        params = pb.params
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
        torch._foreach_addcdiv_(params, [x.view(p.shape) for x, p in zip(m.unbind(0), params)],
                                [x.view(p.shape) for x, p in zip(denom.unbind(0), params)],
                                value=-lr / (1.0 - b1 ** t))


def _check_lr(lr):
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("a tensor lr must have one element")
        lr = float(lr)
    check_positive("lr", lr, allow_zero=True)


def muon_param_groups(model: nn.Module, *, adamw_lr=None, **adamw_options) -> List[dict]:
    """The usual split of a model's parameters for :class:`Muon`: the 2-D weights of its
    ``nn.Linear`` layers except the last one (the output head) in one Muon group; everything else
    (embeddings, the head, norms, biases, convolutions) in a ``use_muon=False`` (AdamW) group
    with ``lr=adamw_lr`` (if given) and ``adamw_options`` (betas, eps, weight_decay).
    Parameters without ``requires_grad`` are left out."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hidden = {id(m.weight) for m in linears[:-1]}
    muon, rest = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (muon if id(p) in hidden and p.dim() == 2 else rest).append(p)
    aux = dict(params=rest, use_muon=False, **adamw_options)
    if adamw_lr is not None:
        aux["lr"] = adamw_lr
    return [g for g in (dict(params=muon), aux) if g["params"]]

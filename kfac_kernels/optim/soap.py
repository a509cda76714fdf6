"""SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam") on the kernel ops.

Adam (with decoupled weight decay) run in the eigenbasis of Shampoo's two factors. For a matrix
parameter W with gradient G, step t >= 2 (Algorithm 3 of the paper)::

    G' = QL^T G QR                                  ops.kron_rotate
    M  <- b1 M + (1 - b1) G',  V <- b2 V + (1 - b2) G'^2      (M, V in the eigenbasis)
    N  = QL [ (M / (1 - b1^k)) / (sqrt(V / (1 - b2^k)) + eps) ] QR^T,  k = t - 1
    W  <- W (1 - lr wd) - lr N
    L  <- avg of G G^T,  R <- avg of G^T G                     ops.gradient_factor_update
    every precondition_frequency steps:                         ops.eigenbasis_power_step
        QL <- orth(L QL),  QR <- orth(R QR)   and M is rotated into the new basis

The factors are running averages with decay ``shampoo_beta``, bias-corrected as Adam's moments
are (``L_t = sum_i (1 - sb) sb^(t-i) G_i G_i^T / (1 - sb^t)``): the same eigenvectors as the
plain average, and ``L_1 = G_1 G_1^T``. Step 1 only initialises: the factors from the first
gradient and their eigenbases by ``ops.symeig`` (as the paper's reference implementation does;
the parameters do not move), so Adam's bias correction counts from step 2. The paper projects
the momentum from the original space every step (``M' = QL^T M QR``); keeping M in the eigenbasis
and rotating it when the basis changes is the same in exact arithmetic and saves two products per
step. The second moment is not rotated (as in the paper): the refresh keeps each column in its
place so V stays aligned.

1-D parameters, and sides longer than ``max_precond_dim`` (or of length 1), use the identity as
that side's basis; with both sides identity the method is AdamW.
"""
from __future__ import annotations

import torch

from .. import ops
from ._common import (ParamBatch, StackedOptimizer, check_positive, check_schedule,
                      check_unit)

__all__ = ["SOAP"]

_REFRESH = ("qr", "eigh")


class SOAP(StackedOptimizer):
    r"""SOAP: AdamW in the eigenbasis of Shampoo's factors, refreshed by power iteration.

    Args (names as heavyball.SOAP's where they mean the same):
        params: parameters or param_groups.
        lr: step size.
        betas: Adam's (beta1, beta2).
        shampoo_beta: decay of the running averages of ``G G^T`` and ``G^T G``.
        eps: Adam's epsilon, added to the bias-corrected ``sqrt(V)``.
        weight_decay: decoupled (AdamW) weight decay.
        precondition_frequency: refresh the eigenbases every this many steps.
        max_precond_dim: longest side that gets an eigenbasis; longer sides keep the identity.
        refresh: ``"qr"`` (default: one warm-started power-iteration step with QR,
            ``ops.eigenbasis_power_step``, as the paper) or ``"eigh"`` (a fresh
            eigendecomposition, ``ops.symeig``).
        factor_dtype: dtype of factors, bases and Adam's moments (default float32, float64 for
            float64 parameters).
        batch_shapes: one op call per group of same-shaped parameters (default); False runs one
            call per parameter.
        backend: the ops' ``backend=``.
    """

    def __init__(self, params, lr: float = 3e-3, betas=(0.95, 0.95), shampoo_beta: float = 0.95,
                 eps: float = 1e-8, weight_decay: float = 0.01, precondition_frequency: int = 10,
                 max_precond_dim: int = 2048, *, refresh: str = "qr", factor_dtype=None,
                 batch_shapes: bool = True, backend: str = "auto"):
        check_positive("lr", lr, allow_zero=True)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_unit("betas[0]", betas[0])
        check_unit("betas[1]", betas[1])
        check_unit("shampoo_beta", shampoo_beta)
        check_positive("eps", eps, allow_zero=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        check_schedule(precondition_frequency, max_precond_dim, "AdamW everywhere")
        if refresh not in _REFRESH:
            raise ValueError(f"refresh must be 'qr' or 'eigh', got {refresh!r}")
        self.backend = backend
        defaults = dict(lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps,
                        weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                        max_precond_dim=max_precond_dim, refresh=refresh)
        super().__init__(params, defaults, factor_dtype=factor_dtype, batch_shapes=batch_shapes)

    def _group_step(self, group: dict, pb: ParamBatch) -> None:
        t = pb.advance()
        w = pb.dtype
        G = pb.grads().to(w)
        matrix = not pb.vector and (pb.left or pb.right)
        if matrix:
            L, R = self._factors(pb, G)
            if t == 1:
                ops.gradient_factor_update(L, R, G, beta=0.0, scale=1.0,
                                           backend=self._b("gradient_factor_update"))
                for side, F in (("QL", L), ("QR", R)):
                    if F is not None:
                        q = ops.symeig(F, method="eigh", backend=self._b("symeig"))[1]
                        # a failed first basis: the identity (Adam in that coordinate system)
                        pb.put(side, self._kept_if_failed(q, _identity(q)))
                return
            QL = pb.buffer("QL", _missing) if pb.left else None
            QR = pb.buffer("QR", _missing) if pb.right else None
            Gp = ops.kron_rotate(G, QL, QR, backend=self._b("kron_rotate"))
        else:
            if t == 1:
                return
            Gp = G
        N = self._adam(group, pb, Gp, t - 1)
        if matrix:
            N = ops.kron_rotate(N, QL, QR, back=True, backend=self._b("kron_rotate"))
        pb.apply(N, group["lr"], decoupled_decay=group["weight_decay"])
        if matrix:
            sb = _debiased(group["shampoo_beta"], t)
            ops.gradient_factor_update(L, R, G, beta=sb, scale=1.0 - sb,
                                       backend=self._b("gradient_factor_update"))
            if t % group["precondition_frequency"] == 0:
                self._refresh(group, pb, L, R, QL, QR)

    def _factors(self, pb, G):
        B, m, n = G.shape
        w, dev = G.dtype, G.device
        L = pb.buffer("L", lambda: torch.zeros(B, m, m, dtype=w, device=dev)) if pb.left else None
        R = pb.buffer("R", lambda: torch.zeros(B, n, n, dtype=w, device=dev)) if pb.right else None
        return L, R

    def _adam(self, group, pb, Gp, k):
        b1, b2 = group["betas"]
        m = pb.buffer("exp_avg", lambda: torch.zeros_like(Gp))
        v = pb.buffer("exp_avg_sq", lambda: torch.zeros_like(Gp))
        m.lerp_(Gp, 1.0 - b1)
        v.mul_(b2).addcmul_(Gp, Gp, value=1.0 - b2)
        denom = v.div(1.0 - b2 ** k).sqrt_().add_(group["eps"])
        return m.div(1.0 - b1 ** k).div_(denom)

    def _refresh(self, group, pb, L, R, QL, QR):
        """New eigenbases; the first moment is rotated into them: ``M <- A^T M B`` with
        ``A = QL_old^T QL_new``, ``B = QR_old^T QR_new``."""
        turns = []
        for name, F, Q in (("QL", L, QL), ("QR", R, QR)):
            if F is None:
                turns.append(None)
                continue
            if group["refresh"] == "qr":
                Qn, _ = ops.eigenbasis_power_step(F, Q, backend=self._b("eigenbasis_power_step"))
            else:
                Qn = ops.symeig(F, method="eigh", backend=self._b("symeig"))[1]
            Qn = self._kept_if_failed(Qn, Q)
            turns.append(Q.transpose(-1, -2) @ Qn)
            pb.put(name, Qn)
        m = pb.buffer("exp_avg", _missing)
        m.copy_(ops.kron_rotate(m, turns[0], turns[1], backend=self._b("kron_rotate")))


def _debiased(beta: float, t: int) -> float:
    """The decay that makes a running average bias-corrected: with ``beta_t = 1 - (1 - beta) /
    (1 - beta^t)``, ``x_t = beta_t x_{t-1} + (1 - beta_t) y_t`` equals the plain average
    ``sum_i (1 - beta) beta^(t-i) y_i`` divided by ``1 - beta^t`` (``beta_1 = 0``)."""
    return 1.0 - (1.0 - beta) / (1.0 - beta ** t)


def _identity(q: torch.Tensor) -> torch.Tensor:
    return torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)


def _missing():  # pragma: no cover - the first step creates every buffer the others read
    raise RuntimeError("internal: a SOAP state buffer expected to exist is missing")

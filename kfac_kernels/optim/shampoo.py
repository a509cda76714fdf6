"""Shampoo (Gupta, Koren & Singer 2018) on the kernel ops of :mod:`kfac_kernels.ops`.

For a matrix parameter W with gradient G (Algorithm 1 of the paper, with ``beta2=1``)::

    L <- L + G G^T,   R <- R + G^T G            (ops.gradient_factor_update, both in one call)
    W <- W - lr (L + eps I)^(-1/4) G (R + eps I)^(-1/4)   (ops.inverse_root, ops.kron_rotate)

With ``beta2 < 1`` the factors are running averages ``L <- beta2 L + (1 - beta2) G G^T``.
Options beyond the paper follow common practice (Anil et al. 2020; Shi et al. 2023, "Distributed
Shampoo"): inverse roots recomputed every ``precondition_frequency`` steps (the statistics every
step), optionally by the warm-started eigensolver; grafting, which keeps Shampoo's direction but
takes the step's size per parameter from another method (``"sgd"``: the gradient's norm,
``"adam"``: the norm of Adam's direction); heavy-ball momentum on the grafted step; L2 weight
decay added to the gradient.

A side longer than ``max_precond_dim`` (or of length 1) keeps only the diagonal of its factor
(``diag(G G^T)``, the row sums of G squared), and 0-d/1-d parameters get the diagonal version of
the whole method, AdaGrad (``beta2 = 1``) or RMSprop-like (``beta2 < 1``) with exponent -1/2.
"""
from __future__ import annotations

import torch

from .. import ops
from ._common import (ParamBatch, StackedOptimizer, check_positive, check_schedule,
                      check_unit)

__all__ = ["Shampoo"]

_GRAFTING = (None, "sgd", "adam")
_ROOT_METHODS = ("eigh", "refresh")


class Shampoo(StackedOptimizer):
    r"""Shampoo: ``W <- W - lr L^(-1/4) G R^(-1/4)`` with Kronecker factors of the gradient.

    Args:
        params: parameters or param_groups, as for any ``torch.optim`` optimizer.
        lr: step size.
        epsilon: ``eps`` of Algorithm 1 (``L = eps I + sum G G^T``): added to the factors'
            eigenvalues (clamped at 0) before the inverse root.
        beta2: 1 (default) sums the statistics (Algorithm 1); < 1 averages them.
        momentum: heavy-ball momentum on the (grafted) step, 0 for none.
        weight_decay: L2 penalty added to the gradient before the statistics.
        precondition_frequency: recompute the inverse roots every this many steps (first step
            included); the statistics are updated every step.
        grafting: None (Shampoo's own step size), ``"sgd"`` or ``"adam"``: rescale each
            parameter's step to the norm of that method's step.
        grafting_beta2, grafting_eps: Adam grafting's second-moment decay and epsilon.
        max_precond_dim: longest side that gets a full factor; longer sides keep the diagonal.
        root_method: ``"eigh"`` (a fresh eigendecomposition each time) or ``"refresh"`` (warm-
            started from the previous eigenvectors: ``ops.symeig(method="refresh")``).
        factor_dtype: dtype of the factors and roots: float32, or float64 (default: float64 for
            float64 parameters, float32 otherwise).
        batch_shapes: one op call per group of same-shaped parameters (default); False runs one
            call per parameter (a benchmark baseline).
        backend: the ops' ``backend=`` ("auto" picks Triton / CUDA kernels on GPUs).
    """

    def __init__(self, params, lr: float = 1e-3, epsilon: float = 1e-6, beta2: float = 1.0,
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 precondition_frequency: int = 1, grafting=None, grafting_beta2: float = 0.999,
                 grafting_eps: float = 1e-8, max_precond_dim: int = 2048,
                 root_method: str = "eigh", *, factor_dtype=None, batch_shapes: bool = True,
                 backend: str = "auto"):
        check_positive("lr", lr, allow_zero=True)
        check_positive("epsilon", epsilon, allow_zero=True)
        check_unit("beta2", beta2, closed=True)
        check_unit("momentum", momentum)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        check_unit("grafting_beta2", grafting_beta2)
        check_positive("grafting_eps", grafting_eps)
        check_schedule(precondition_frequency, max_precond_dim, "every side diagonal")
        if grafting not in _GRAFTING:
            raise ValueError(f"grafting must be None, 'sgd' or 'adam'; got {grafting!r}")
        if root_method not in _ROOT_METHODS:
            raise ValueError(f"root_method must be 'eigh' or 'refresh'; got {root_method!r}")
        self.backend = backend
        defaults = dict(lr=lr, epsilon=epsilon, beta2=beta2, momentum=momentum,
                        weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                        grafting=grafting, grafting_beta2=grafting_beta2,
                        grafting_eps=grafting_eps, max_precond_dim=max_precond_dim,
                        root_method=root_method)
        super().__init__(params, defaults, factor_dtype=factor_dtype, batch_shapes=batch_shapes)

    # ------------------------------------------------------------------ one parameter batch
    def _group_step(self, group: dict, pb: ParamBatch) -> None:
        t = pb.advance()
        w = pb.dtype
        G = pb.grads().to(w)
        if group["weight_decay"]:
            W = torch.stack([p.reshape(G.shape[1:]) for p in pb.params]).to(w)
            G = G.add(W, alpha=group["weight_decay"])
        beta2, eps = group["beta2"], group["epsilon"]
        scale = 1.0 if beta2 == 1.0 else 1.0 - beta2
        if pb.vector:
            U = self._diagonal_step(pb, G, beta2, scale, eps)
        else:
            U = self._matrix_step(group, pb, G, t, beta2, scale, eps)
        U = self._graft(group, pb, G, U, t)
        if group["momentum"]:
            buf = pb.buffer("momentum_buffer", lambda: torch.zeros_like(U))
            U = buf.mul_(group["momentum"]).add_(U)
        pb.apply(U, group["lr"])

    def _diagonal_step(self, pb, G, beta2, scale, eps):
        acc = pb.buffer("diag", lambda: torch.zeros_like(G))
        acc.mul_(beta2).addcmul_(G, G, value=scale)
        return G * _diag_root(acc, 2, eps)

    def _matrix_step(self, group, pb, G, t, beta2, scale, eps):
        B, m, n = G.shape
        w, dev = G.dtype, G.device
        L = pb.buffer("L", lambda: torch.zeros(B, m, m, dtype=w, device=dev)) if pb.left else None
        R = pb.buffer("R", lambda: torch.zeros(B, n, n, dtype=w, device=dev)) if pb.right else None
        if L is not None or R is not None:
            ops.gradient_factor_update(L, R, G, beta=beta2, scale=scale,
                                       backend=self._b("gradient_factor_update"))
        refresh = (t - 1) % group["precondition_frequency"] == 0 or not (
            (L is None or pb.has("L_root")) and (R is None or pb.has("R_root")))
        roots = []
        for side, F in (("L", L), ("R", R)):
            if F is None:
                roots.append(None)
                continue
            if refresh:
                self._refresh_root(group, pb, side, F, eps)
            roots.append(pb.buffer(f"{side}_root", _missing))
        U = ops.kron_rotate(G, roots[0], roots[1], backend=self._b("kron_rotate")) if any(
            r is not None for r in roots) else G.clone()
        # diagonal sides: the diagonal of G G^T (or G^T G), accumulated like the full factors
        if not pb.left:
            d = pb.buffer("L_diag", lambda: torch.zeros(B, m, dtype=w, device=dev))
            d.mul_(beta2).add_(G.square().sum(-1), alpha=scale)
            U.mul_(_diag_root(d, 4, eps).unsqueeze(-1))
        if not pb.right:
            d = pb.buffer("R_diag", lambda: torch.zeros(B, n, dtype=w, device=dev))
            d.mul_(beta2).add_(G.square().sum(-2), alpha=scale)
            U.mul_(_diag_root(d, 4, eps).unsqueeze(-2))
        return U

    def _refresh_root(self, group, pb, side, F, eps):
        warm = group["root_method"] == "refresh" and pb.has(f"{side}_eigvecs")
        prev = pb.buffer(f"{side}_eigvecs", _missing) if warm else None
        root, q = ops.inverse_root(F, 4, epsilon=eps, method="refresh" if warm else "eigh",
                                   prev_eigenvectors=prev, return_eigenvectors=True,
                                   backend=self._b("inverse_root"))
        old = pb.buffer(f"{side}_root", _missing) if pb.has(f"{side}_root") else None
        pb.put(f"{side}_root", self._kept_if_failed(root, old))
        if group["root_method"] == "refresh":
            pb.put(f"{side}_eigvecs", self._kept_if_failed(q, prev))

    def _graft(self, group, pb, G, U, t):
        kind = group["grafting"]
        if kind is None:
            return U
        if kind == "sgd":
            D = G
        else:
            b2 = group["grafting_beta2"]
            v = pb.buffer("graft_exp_avg_sq", lambda: torch.zeros_like(G))
            v.mul_(b2).addcmul_(G, G, value=1.0 - b2)
            D = G / (v.div(1.0 - b2 ** t).sqrt_().add_(group["grafting_eps"]))
        dims = tuple(range(1, G.dim()))
        dn = torch.linalg.vector_norm(D, dim=dims, keepdim=True)
        un = torch.linalg.vector_norm(U, dim=dims, keepdim=True)
        # a zero Shampoo direction stays zero (there is nothing to rescale)
        return U * torch.where(un > 0, dn / torch.where(un > 0, un, torch.ones_like(un)),
                               torch.zeros_like(un))


def _missing():  # pragma: no cover - callers check pb.has() first
    raise RuntimeError("internal: a state buffer expected to exist is missing")


def _diag_root(acc: torch.Tensor, root: float, eps: float) -> torch.Tensor:
    """(acc + eps)^(-1/root) elementwise, 0 where acc + eps is 0."""
    s = acc.clamp_min(0) + eps
    pos = s > 0
    return torch.where(pos, torch.where(pos, s, torch.ones_like(s)).pow(-1.0 / root),
                       torch.zeros_like(s))

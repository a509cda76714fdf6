"""Curvature types (the metric) and likelihoods.

A K-FAC block needs g_n, the gradient of example n's own loss term with respect to the layer's
output. The three curvature types differ only in which vectors are back-propagated from the model
output ``f`` to produce those g_n (docs/math.md, "The metric"):

* ``"empirical"``: the training loss at the true target; g_n come from the user's own
  ``loss.backward()`` and are rescaled by N when the loss is a batch mean.
* ``"fisher"``: ``-log p(y_hat | f)`` with ``y_hat`` drawn from the model's predictive
  distribution, ``mc_samples`` draws per example; the vector is ``d(-log p(y_hat|f))/df``, in closed
  form for each likelihood.
* ``"ggn"``: the exact generalised Gauss-Newton: one backward pass per column k of the output
  Hessian's square root L_n (H_n = L_n L_n^T), back-propagating ``L_n e_k`` for every example at once.

Conventions: the batch dimension of ``f`` is the first; for "categorical" the classes are the LAST
dimension; every other dimension is part of example n's output (so example n's loss sums over
them, e.g. over the positions of a sequence).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

CURVATURES = ("empirical", "fisher", "ggn")
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")


def positions(likelihood: Optional[str], out: torch.Tensor) -> int:
    """Loss terms per example that ``loss_reduction="token_mean"`` averages over: every dimension
    of ``out`` but the batch, and for "categorical" (or no likelihood: "empirical") the last one
    (the classes, or a position's features)."""
    shape = out.shape[1:] if likelihood in ("gaussian", "bernoulli") else out.shape[1:-1]
    return max(1, math.prod(shape))


def check_likelihood_output(likelihood: str, out: torch.Tensor) -> None:
    """Raise a clear error when ``out`` cannot be the output of ``likelihood``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model output must be a tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(f"the model output has dtype {out.dtype}; a {likelihood} likelihood needs "
                        f"floating-point {'logits' if likelihood != 'gaussian' else 'predictions'}")
    if not out.requires_grad:
        raise ValueError("the model output does not require grad: it must be the output of the "
                         "forward pass whose loss is being back-propagated")
    if out.dim() < 1 or out.shape[0] == 0:
        raise ValueError(f"the model output must have a non-empty batch dimension first, got "
                         f"shape {tuple(out.shape)}")
    if likelihood == "categorical":
        if out.dim() < 2:
            raise ValueError(f"a categorical likelihood needs logits of shape [N, ..., C] with the "
                             f"classes last, got shape {tuple(out.shape)}")
        if out.shape[-1] < 2:
            raise ValueError(f"a categorical likelihood needs at least 2 classes in the last "
                             f"dimension, got shape {tuple(out.shape)} (use 'bernoulli' for one "
                             f"logit per example)")


def sample_vectors(likelihood: str, out: torch.Tensor, mc_samples: int,
                   generator: Optional[torch.Generator]) -> Iterator[torch.Tensor]:
    """Yield ``mc_samples`` vectors ``d(-log p(y_hat | f))/df``, y_hat drawn from the model.

    Every example gets its own draw, so each yields per-example gradients when back-propagated.
    """
    f = out.detach()
    for _ in range(mc_samples):
        if likelihood == "categorical":
            p = torch.softmax(f.to(torch.float32) if f.dtype in (torch.float16, torch.bfloat16)
                              else f, dim=-1)
            flat = p.reshape(-1, p.shape[-1])
            # a non-finite output must not crash the sampler: draw from a uniform row there; the
            # vector keeps the NaN, so the step's statistics are rejected as non-finite
            bad = ~torch.isfinite(flat).all(-1, keepdim=True)
            idx = torch.multinomial(torch.where(bad, torch.ones_like(flat), flat), 1,
                                    generator=generator).squeeze(-1)
            onehot = torch.zeros_like(flat).scatter_(1, idx.unsqueeze(1), 1.0)
            v = (flat - onehot).reshape(p.shape)
        elif likelihood == "gaussian":
            # y_hat = f + eps; d(0.5 ||f - y_hat||^2)/df = f - y_hat = -eps (the sign is irrelevant)
            v = torch.randn(f.shape, dtype=f.dtype, device=f.device, generator=generator)
        elif likelihood == "bernoulli":
            p = torch.sigmoid(f)
            y = torch.bernoulli(torch.nan_to_num(p, nan=0.5), generator=generator)
            v = p - y
        else:  # pragma: no cover - validated by the optimizer
            raise ValueError(f"unknown likelihood {likelihood!r}")
        yield v.to(out.dtype)


def ggn_num_columns(likelihood: str, out: torch.Tensor) -> int:
    """How many backward passes the exact GGN needs: the per-example output size."""
    return math.prod(out.shape[1:]) if out.dim() > 1 else 1


def ggn_vectors(likelihood: str, out: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield the columns ``L_n e_k`` of the per-example output Hessian's square root.

    Column k is back-propagated for all examples at once (examples do not interact), so the sum
    over the yielded passes of g g^T is exactly ``sum_n J_n^T H_n J_n`` restricted to the layer.
    """
    f = out.detach()
    n = f.shape[0]
    flat_shape = (n, ggn_num_columns(likelihood, out))
    if likelihood == "gaussian":  # H = I
        for k in range(flat_shape[1]):
            v = torch.zeros(flat_shape, dtype=f.dtype, device=f.device)
            v[:, k] = 1.0
            yield v.reshape(f.shape)
    elif likelihood == "bernoulli":  # H = diag(p (1 - p))
        p = torch.sigmoid(f).reshape(flat_shape)
        s = (p * (1 - p)).sqrt()
        for k in range(flat_shape[1]):
            v = torch.zeros_like(p)
            v[:, k] = s[:, k]
            yield v.reshape(f.shape)
    elif likelihood == "categorical":  # H = diag(p) - p p^T = L L^T, L = diag(sqrt p) - p sqrt(p)^T
        c = f.shape[-1]
        p = torch.softmax(f, dim=-1).reshape(n, -1, c)           # [N, T, C]
        sq = p.sqrt()
        for t in range(p.shape[1]):
            for k in range(c):
                v = torch.zeros_like(p)
                col = -p[:, t, :] * sq[:, t, k:k + 1]             # -p sqrt(p_k)
                col[:, k] += sq[:, t, k]                           # + sqrt(p_k) e_k
                v[:, t, :] = col
                yield v.reshape(f.shape)
    else:  # pragma: no cover
        raise ValueError(f"unknown likelihood {likelihood!r}")


def per_example_loss(likelihood: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The per-example negative log-likelihood l_n (summed over non-batch output dims).

    Provided for tests and users who want the loss that matches the metric's likelihood.
    """
    n = out.shape[0]
    if likelihood == "categorical":
        c = out.shape[-1]
        nll = torch.nn.functional.cross_entropy(out.reshape(-1, c), target.reshape(-1),
                                                reduction="none")
    elif likelihood == "gaussian":
        nll = 0.5 * (out - target) ** 2
    elif likelihood == "bernoulli":
        nll = torch.nn.functional.binary_cross_entropy_with_logits(out, target.to(out.dtype),
                                                                   reduction="none")
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}")
    return nll.reshape(n, -1).sum(1)

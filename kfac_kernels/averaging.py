"""The guarded first-estimate running average, written once.

Every running estimate of K-FAC (the factors A and G, EKFAC's scalings S) is updated as

    F <- rho F + (1 - rho) F_hat,    rho = min(1 - 1/k, ema_decay),

where k counts the accepted estimates (so the first one replaces F: the first-estimate rule), and
an estimate that is not accepted (non-finite, or its step rejected) leaves F and k as they were.
All on the device, with no host synchronisation: acceptance is a device flag, and a rejected
update is the same arithmetic with weights 1 and 0 on a cleaned estimate.

:func:`running_average_` does it for one set of estimates that share a counter (a block's A and
G, or its S). The batched paths use its two halves: :func:`first_estimate_weights` (the counter
and the weights, for a vector of counters) and :func:`blend_` (one in-place update, weights
broadcast as the caller lays them out: per block in ``factors.py``, per row of the flat buffers
in ``arena.py``).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

__all__ = ["first_estimate_weights", "blend_", "running_average_"]


def first_estimate_weights(count: torch.Tensor, ok: torch.Tensor, ema_decay: float, *,
                           in_place: bool = False
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(count, keep, fresh)``: the counter after this update (``count + ok``; updated in place
    when ``in_place``, e.g. a vector whose entries are the blocks' counters), and the weights of
    the old estimate and of the new one: ``rho`` and ``1 - rho`` where ``ok``, 1 and 0 where not.
    ``count`` and ``ok`` may be scalars or [blocks] vectors."""
    inc = ok.to(count.dtype)
    count = count.add_(inc) if in_place else count + inc
    # rho = min(1 - 1/max(k, 1), ema_decay), in in-place calls on a fresh tensor
    rho = count.clamp_min(1.0).reciprocal_().neg_().add_(1.0).clamp_(0.0, ema_decay)
    keep = torch.where(ok, rho, torch.ones((), dtype=rho.dtype, device=rho.device))
    return count, keep, keep.neg().add_(1.0)


def blend_(old: torch.Tensor, hat: torch.Tensor, keep: torch.Tensor, fresh: torch.Tensor) -> None:
    """``old <- keep old + fresh hat`` in place (``keep`` 1 and ``fresh`` 0 on a rejected
    update). ``hat`` is the caller's scratch: it is cleaned first (non-finite entries to 0) so
    that ``0 * hat`` is 0. A narrower ``old`` (bf16 storage) is averaged in ``hat``'s dtype and
    rounded once."""
    torch.nan_to_num_(hat, nan=0.0, posinf=0.0, neginf=0.0)
    if old.dtype == hat.dtype:
        old.mul_(keep).addcmul_(hat, fresh)
    else:
        old.copy_(torch.addcmul(old.to(hat.dtype) * keep, hat, fresh))


def running_average_(olds: Sequence[torch.Tensor], hats: Sequence[torch.Tensor],
                     ok: torch.Tensor, count: torch.Tensor, ema_decay: float) -> torch.Tensor:
    """Fold the estimates ``hats`` into the running ``olds`` (in place) under one counter
    ``count`` and one acceptance flag ``ok`` (0-d device tensors); returns the new counter (a new
    tensor: ``count`` itself is not modified)."""
    count, keep, fresh = first_estimate_weights(count, ok, ema_decay)
    for old, hat in zip(olds, hats):
        blend_(old, hat, keep, fresh)
    return count

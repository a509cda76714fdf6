"""Mixed precision and non-finite gradients: the GradScaler contract and the step guard.

Everything here runs on the device: the finiteness check of a step's gradients, the unscaling of
gradients and of the empirical G factor, and the decision to skip a step are device tensors
(``torch.where``), never read on the host inside ``step()``. Warnings about skipped steps are read
later, when the device has finished (:mod:`kfac_kernels.health`). Under torch.distributed the
communication strategy makes every rank take the same skip decision
(:meth:`kfac_kernels.comm.LocalComm.agree`).

GradScaler contract (``torch.amp.GradScaler``, see docs/robustness.md):

* :class:`kfac_kernels.KFAC` sets ``_step_supports_amp_scaling``: ``scaler.step(opt)`` then always
  calls ``opt.step()`` and hands it ``opt.grad_scale`` (the scale still in the gradients, or None
  after ``scaler.unscale_(opt)``) and ``opt.found_inf`` (device tensors). KFAC unscales the
  gradients itself, skips the parameter *and* factor update on the device when an inf/NaN was found,
  and divides the empirical G estimate by S^2 (S read from the scaler's scale tensor, no sync), so
  the statistics of a skipped step are discarded rather than merged into the next one.
* the scaler's own ``update()`` works as for any optimiser (its found-inf record is filled).
"""
from __future__ import annotations

import sys
from collections import defaultdict
from typing import Iterable, Optional

import torch

__all__ = ["scaler_scale", "inverse_scale", "check_and_unscale"]


def scaler_scale(scaler) -> Optional[torch.Tensor]:
    """The loss scale S of an enabled GradScaler as a device tensor (no host sync), else None."""
    if scaler is None or not scaler.is_enabled():
        return None
    return getattr(scaler, "_scale", None)   # created lazily by the first scaler.scale(loss)


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """1/S in float32, the reciprocal taken in float64 as GradScaler does."""
    return scale.double().reciprocal().float()


def check_and_unscale(grads: Iterable[torch.Tensor],
                      inv_scale: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Multiply ``grads`` in place by ``inv_scale`` (when given) and return a 0-d float32 device
    tensor that is > 0 when any of them holds an inf or NaN (None when there are no gradients).

    One fused multi-tensor kernel per (device, dtype) (the one GradScaler uses), no host sync.
    DTensor gradients (FSDP2) are checked and unscaled through their local shards: the flag
    covers this process's part, and the strategy's ``agree`` combines the processes' flags.
    """
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    groups = defaultdict(list)
    for g in grads:
        if dtensor is not None and isinstance(g, dtensor):
            g = g.to_local()
        groups[(g.device, g.dtype)].append(g)
    if not groups:
        return None
    found_all = None
    for (dev, _), gs in groups.items():
        found = torch.zeros((), dtype=torch.float32, device=dev)
        inv = (torch.ones((), dtype=torch.float32, device=dev) if inv_scale is None
               else inv_scale.to(device=dev, dtype=torch.float32))
        if any(g.is_sparse for g in gs):
            for g in gs:
                found = found + (~torch.isfinite(g.coalesce()._values())).any().float()
                if inv_scale is not None:
                    g.mul_(inv)
        else:
            torch._amp_foreach_non_finite_check_and_unscale_(gs, found, inv)
        found_all = found if found_all is None else found_all + found.to(found_all.device)
    return found_all

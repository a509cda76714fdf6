"""The factory: which communication strategy an engine gets.

:func:`strategy_for` reads the optimiser's distributed options and the state of
torch.distributed: FSDP2 (:class:`kfac_kernels.comm.fsdp.FSDPKFAC`) when the model's parameters
are DTensors, DDP (:class:`kfac_kernels.comm.ddp.DistributedKFAC`) when torch.distributed is
initialised with more than one process (or ``distributed=True``), else
:class:`kfac_kernels.comm.base.LocalComm`. The strategy modules are imported only when chosen,
so a single process never imports them (nor ``torch.distributed.fsdp``).
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .base import DistributedOptions, LocalComm, StrategyOptions

if TYPE_CHECKING:
    from ..blocks import Block
    from ..inverses.base import InverseKind

try:  # some builds of torch have no torch.distributed at all
    import torch.distributed as dist
    _HAVE_DIST = dist.is_available()
except ImportError:  # pragma: no cover
    _HAVE_DIST = False

__all__ = ["strategy_for", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module DistributedDataParallel wraps (K-FAC names blocks without "module."). Raises
    for the FSDP1 wrapper (FSDP2's ``fully_shard`` is supported: :mod:`kfac_kernels.comm.fsdp`)."""
    if _HAVE_DIST:
        from torch.nn.parallel import DistributedDataParallel
        while isinstance(model, DistributedDataParallel):
            model = model.module
        if "torch.distributed.fsdp" in sys.modules:
            from .fsdp import refuse_fsdp1
            refuse_fsdp1(model)
    return model


def strategy_for(blocks: List[Block], opts: StrategyOptions, kind: InverseKind, *,
                 model: Optional[nn.Module] = None, params: Sequence[torch.Tensor] = (),
                 names: Optional[Dict[int, str]] = None) -> LocalComm:
    """The strategy for an engine's ``blocks`` (``opts``: its
    :class:`kfac_kernels.options.Options`; ``kind``: its inverse kind): a :class:`LocalComm`
    where K-FAC runs in a single process. ``model``, ``params`` (the parameters outside blocks)
    and ``names`` ({id(param): name}): what the FSDP2 strategy checks when the parameters are
    DTensors."""
    dist_opts = DistributedOptions.from_options(opts)
    fsdp = False
    if _HAVE_DIST and "torch.distributed.tensor" in sys.modules:   # only FSDP2 made DTensors
        from .fsdp import has_dtensors
        fsdp = has_dtensors([p for b in blocks for p in b.params] + list(params))
    if fsdp:
        if dist_opts.enabled is False:
            raise ValueError("the model's parameters are DTensors (sharded with fully_shard): "
                             "K-FAC must run distributed on it; drop distributed=False")
        from .fsdp import FSDPKFAC
        if model is None:
            raise ValueError("the parameters are DTensors (fully_shard): the FSDP2 strategy needs "
                             "the model, pass strategy_for(..., model=model)")
        group = _group(dist_opts)
        if dist.get_world_size(group) < 1:
            raise ValueError("this process is not a member of the process_group given to K-FAC")
        return FSDPKFAC(blocks, opts, kind, dist_opts, group, model=model, params=params,
                        names=names)
    if dist_opts.enabled is False:
        return LocalComm()
    if not (_HAVE_DIST and dist.is_initialized()):
        if dist_opts.enabled or dist_opts.process_group is not None:
            raise RuntimeError("distributed=True (or a process_group) was given but "
                               "torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group() first")
        return LocalComm()
    group = _group(dist_opts)
    size = dist.get_world_size(group)
    if size < 1:
        raise ValueError("this process is not a member of the process_group given to K-FAC")
    if size == 1 and not dist_opts.enabled:
        return LocalComm()
    from .ddp import DistributedKFAC
    return DistributedKFAC(blocks, opts, kind, dist_opts, group)


def _group(dist_opts: DistributedOptions) -> Any:
    return (dist_opts.process_group if dist_opts.process_group is not None
            else dist.group.WORLD)

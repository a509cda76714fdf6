"""Former home of the DDP strategy, kept so that existing imports work.

Everything moved into the package :mod:`kfac_kernels.comm` (issue 25): the strategy to
:mod:`kfac_kernels.comm.ddp`, the flat buffers to :mod:`kfac_kernels.comm.buckets`, the grid and
the assignment to :mod:`kfac_kernels.comm.assignment`, the factory to
:mod:`kfac_kernels.comm.factory`, :class:`MismatchError`, :class:`CommStats` and
:class:`DistributedOptions` to :mod:`kfac_kernels.comm.base`. This module re-exports the
names it used to define; new code imports from ``kfac_kernels.comm``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch.nn as nn

from .comm.assignment import assign, greedy_assignment, worker_grid
from .comm.base import CommStats, DistributedOptions, LocalComm, MismatchError
from .comm.buckets import factor_slot, pack_triu, unpack_triu
from .comm.ddp import DistributedKFAC, sampling_seed
from .comm.factory import strategy_for, unwrap_model
from .options import ASSIGNMENTS

__all__ = ["DistributedOptions", "DistributedKFAC", "MismatchError", "ASSIGNMENTS", "unwrap_model",
           "greedy_assignment", "worker_grid", "pack_triu", "unpack_triu", "sampling_seed",
           "CommStats", "assign", "factor_slot", "setup"]


def setup(blocks, options, kind, *, model: Optional[nn.Module] = None, params: Sequence = (),
          names: Optional[Dict[int, str]] = None) -> Optional[DistributedKFAC]:
    """The strategy :func:`kfac_kernels.comm.strategy_for` picks, or None where K-FAC runs in a
    single process (this function's former contract)."""
    strategy = strategy_for(blocks, options, kind, model=model, params=params, names=names)
    return None if type(strategy) is LocalComm else strategy   # type: ignore[return-value]

"""Communication strategies: the seam between the engine and the processes it runs in.

One file per part (docs/architecture.md):

* :mod:`~kfac_kernels.comm.base`: the interface, :class:`LocalComm` (one process, no
  communication; documents every call point), and the small types the strategies share
  (:class:`MismatchError`, :class:`CommStats`, :class:`DistributedOptions`);
* :mod:`~kfac_kernels.comm.factory`: :func:`strategy_for`, which picks the strategy of an
  engine, and :func:`unwrap_model`;
* :mod:`~kfac_kernels.comm.buckets`: flat buffers for collectives (upper triangles, buckets);
* :mod:`~kfac_kernels.comm.assignment`: the process grid and who decomposes what;
* :mod:`~kfac_kernels.comm.ddp`: :class:`DistributedKFAC`, data parallelism over
  torch.distributed (DDP, or gradients all-reduced by hand);
* :mod:`~kfac_kernels.comm.fsdp`: :class:`FSDPKFAC`, models sharded with FSDP2's
  ``fully_shard`` (and HSDP).

Imports go one way: ``factory`` -> ``fsdp`` -> ``ddp`` -> ``buckets``, ``assignment``, ``base``.
Importing this package loads ``base`` and ``factory`` only; the strategies are loaded when an
engine needs one (or when their names are read from here).
"""
from __future__ import annotations

import importlib
from typing import Any

from .base import CommStats, DistributedOptions, LocalComm, MismatchError
from .factory import strategy_for, unwrap_model

__all__ = ["LocalComm", "MismatchError", "CommStats", "DistributedOptions", "strategy_for",
           "unwrap_model", "DistributedKFAC", "FSDPKFAC"]

_LAZY = {"DistributedKFAC": ".ddp", "FSDPKFAC": ".fsdp"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

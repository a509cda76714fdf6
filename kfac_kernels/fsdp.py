"""Former home of the FSDP2 strategy, kept so that existing imports work: it moved to
:mod:`kfac_kernels.comm.fsdp` (issue 25), whose public names this module re-exports."""
from __future__ import annotations

from .comm.fsdp import FSDPKFAC, ShardLayout, has_dtensors, is_dtensor, refuse_fsdp1

__all__ = ["FSDPKFAC", "is_dtensor", "has_dtensors", "refuse_fsdp1", "ShardLayout"]

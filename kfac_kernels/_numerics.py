"""Small numerical helpers shared by the optimiser's parts."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

__all__ = ["flush_subnormals_", "flush_all_"]


def flush_subnormals_(t: torch.Tensor) -> torch.Tensor:
    """Set the entries of ``t`` whose magnitude is below the smallest normal number of its dtype
    to zero, in place (NaN and infinities stay). K-FAC's own state (factors, decompositions,
    per-step plans) goes through this, so that a model driven to zero loss (softmax probabilities
    of the wrong classes underflowing) does not leave subnormal numbers in it: on CPUs, products
    and decompositions of matrices holding subnormals run many times slower. The global
    floating-point state (``torch.set_flush_denormal``) is left as the user set it."""
    if t.is_floating_point() and t.numel():
        t.masked_fill_(t.abs() < torch.finfo(t.dtype).tiny, 0)
    return t


def flush_all_(tensors: Iterable[Optional[torch.Tensor]]) -> None:
    """:func:`flush_subnormals_` on each distinct storage: views of one flat buffer (the arena's
    running factors) are flushed through that buffer, once; None entries are skipped."""
    seen = set()
    for t in tensors:
        if t is None:
            continue
        base = t._base if t._base is not None else t
        if id(base) in seen:
            continue
        seen.add(id(base))
        flush_subnormals_(base)

"""Health: the one place that reads device flags on the host later and warns once.

A K-FAC step decides on the device whether a factor update or a whole step is rejected
(non-finite statistics, non-finite gradients, GradScaler overflow) and never waits for the
device to say so. The flags of those decisions are queued here with the message each set flag
stands for, copied to pinned host memory behind a CUDA event, and read when the device has
passed them (``poll``, called at the start of every phase), so a warning costs no host sync.
Every message is warned once per key (:class:`KFACWarning`).

Inside a compiled region nothing is queued: the device counters (``block.skipped``,
``opt.skipped_steps``) still count, the warning is not emitted.
"""
from __future__ import annotations

import warnings
from typing import Hashable, List, Sequence, Tuple

import torch

__all__ = ["KFACWarning", "Health"]


class KFACWarning(UserWarning):
    """Warnings about the curvature estimate (skipped updates, failed decompositions, ...)."""


class Health:
    """Deferred device flags and warn-once bookkeeping of one optimiser."""

    def __init__(self):
        # (cuda event or None, host copy of the flags, [(key, message)] one per flag entry)
        self._pending: List[Tuple[object, torch.Tensor, Sequence[Tuple[Hashable, str]]]] = []
        self._warned: set = set()

    def warn_once(self, key: Hashable, message: str, stacklevel: int = 3) -> None:
        """Warn ``message`` unless ``key`` has been warned about already."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"kfac_kernels: {message}", KFACWarning, stacklevel=stacklevel + 1)

    def push(self, flags: torch.Tensor, messages: Sequence[Tuple[Hashable, str]]) -> None:
        """Queue device ``flags`` (a 0-d flag, or one entry per item of ``messages``): a set entry
        warns its ``(key, message)`` once, when the device has produced it. Reports what is
        ready."""
        if torch.compiler.is_compiling():
            return
        if all(key in self._warned for key, _ in messages):
            return
        if flags.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._pending.append((ev, host, list(messages)))
        else:
            self._pending.append((None, flags.clone(), list(messages)))
        self.poll()

    def poll(self) -> None:
        """Warn about every queued flag the device has finished (no waiting)."""
        if torch.compiler.is_compiling():
            return
        keep = []
        for ev, host, messages in self._pending:
            if ev is not None and not ev.query():
                keep.append((ev, host, messages))
                continue
            values = host.numpy().reshape(-1).tolist()
            for (key, message), bad in zip(messages, values):
                if bad:
                    self.warn_once(key, message, stacklevel=4)
        self._pending = keep

    def __len__(self) -> int:
        return len(self._pending)

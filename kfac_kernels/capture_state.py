"""The per-step capture record of one block, owned by :class:`kfac_kernels.capture.Capture`.

Everything a step captures for a layer before it becomes part of the running factors lives
here, in one record per block, and only :class:`~kfac_kernels.capture.Capture` writes it (its
hooks, its micro-batch bookkeeping and its resets); other parts read it through
``capture.of(block)`` and hand their results back through the capture's methods. The block
itself keeps its layer maths and its saved state (factors, counts, decompositions).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

__all__ = ["BlockCapture"]


@dataclass(eq=False)
class BlockCapture:
    """What one block captured in the current step.

    ``inputs``: the layer inputs of the current micro-batch (what ``Block.prepare_input`` keeps
    of each call); ``G_hat``: the output-gradient statistics folded so far (the step's G
    estimate once the micro-batches are combined); ``A_acc`` / ``G_acc`` / ``examples``: the
    weighted sums of the micro-batches closed so far (gradient accumulation) and their example
    count; ``A_ready``: the step's A estimate once all micro-batches are in; ``at_backward``:
    how many of ``inputs`` were captured before the latest backward pass reached the layer;
    ``call_offset``: calls already dropped from ``inputs`` (a hook knows its absolute call
    index); ``per_call``: tensors a block derives from one call's input and reuses across the
    backward passes of the micro-batch (a normalisation layer's normalised input)."""
    inputs: List[torch.Tensor] = field(default_factory=list)
    G_hat: Optional[torch.Tensor] = None
    A_acc: Optional[torch.Tensor] = None
    G_acc: Optional[torch.Tensor] = None
    A_ready: Optional[torch.Tensor] = None
    examples: int = 0
    at_backward: int = 0
    call_offset: int = 0
    per_call: Dict[int, torch.Tensor] = field(default_factory=dict)

    def captured(self) -> bool:
        """Statistics captured this step: inputs of the current micro-batch, or micro-batches
        already combined."""
        return bool(self.inputs) or self.A_ready is not None

    def clear_micro_batch(self) -> None:
        """Forget the current micro-batch's inputs and estimate (not the combined sums)."""
        self.inputs = []
        self.G_hat = None
        self.at_backward = self.call_offset = 0
        self.per_call = {}

    def keep_from(self, mark: int) -> None:
        """Drop the first ``mark`` inputs (a closed or stale micro-batch's) and the micro-batch's
        estimate; the calls kept keep their absolute index."""
        self.inputs = self.inputs[mark:]
        self.G_hat = None
        self.call_offset += mark
        self.at_backward = 0
        self.per_call = {}

    def drop_step(self, mark: int) -> None:
        """A stale step: keep only the inputs captured after its backward pass (from ``mark``)."""
        self.keep_from(mark)
        self.A_acc = self.G_acc = self.A_ready = None
        self.examples = 0

    def clear(self) -> None:
        """Forget everything (the step's factor update is done, or the step was dropped)."""
        self.clear_micro_batch()
        self.A_acc = self.G_acc = self.A_ready = None
        self.examples = 0

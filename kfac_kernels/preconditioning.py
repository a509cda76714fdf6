"""Preconditioning: blocks of one gradient shape, stacked, through one batched call.

After every inverse update :meth:`Preconditioning.regroup` sorts the blocks that hold a
decomposition into shape groups (gradient shape, factor dtype, device, the keys of their
entries) and stacks each group's entries once (:class:`ShapeGroup`); a block's own entries
become views of the stack, so later in-place updates (EKFAC's scalings) are seen by both. Every
step, :meth:`Preconditioning.local` stacks the gradient matrices of each group and asks the
inverse kind for ``(U, <U, V>)`` in one batched op call.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List

import torch

from .blocks import Block

__all__ = ["Preconditioning", "ShapeGroup"]


class ShapeGroup:
    """Blocks of one gradient shape/dtype/device, preconditioned in one batched call.

    A stacked block (grouped convolution, normalisation layer) contributes ``num_stack``
    consecutive matrices to the stacks, a plain block one; ``slots`` records where each sits."""

    def __init__(self, key, blocks: List[Block]):
        self.key = key
        self.blocks = blocks
        self.stacks: Dict[str, torch.Tensor] = {}
        self.slots: Dict[Block, slice] = {}

    def restack(self) -> None:
        """Stack the members' decompositions and make each member's entries views of the stack."""
        names = self.blocks[0].inverse.keys()
        self.stacks = {k: torch.cat([b.inverse[k] if b.stacked else b.inverse[k].unsqueeze(0)
                                     for b in self.blocks]) for k in names}
        off = 0
        for b in self.blocks:
            sl = slice(off, off + b.num_stack)
            off += b.num_stack
            self.slots[b] = sl
            b.inverse = {k: (v[sl] if b.stacked else v[sl.start]) for k, v in self.stacks.items()}

    def rows(self, members: List[Block]) -> List[int]:
        return [i for b in members for i in range(self.slots[b].start, self.slots[b].stop)]


class Preconditioning:
    """The shape groups of one engine and the batched preconditioning over them (``kind``: the
    inverse kind, which knows its entries and its op)."""

    def __init__(self, kind):
        self.kind = kind
        self.groups: List[ShapeGroup] = []

    def regroup(self, blocks) -> None:
        groups: Dict[tuple, List[Block]] = OrderedDict()
        for b in blocks:
            if b.inverse:
                key = (b.shape[-2:], b.factor_dtype, b.weight.device, tuple(sorted(b.inverse)))
                groups.setdefault(key, []).append(b)
        self.groups = [ShapeGroup(k, v) for k, v in groups.items()]
        for g in self.groups:
            g.restack()

    def local(self, grads: Dict[Block, torch.Tensor], damping: float):
        """``({block: U}, {block: <U, V>})`` with the decompositions this process holds."""
        out_u: Dict[Block, torch.Tensor] = {}
        out_dot: Dict[Block, torch.Tensor] = {}
        for g in self.groups:
            members = [b for b in g.blocks if b in grads]
            if not members:
                continue
            if len(members) == len(g.blocks):
                st = g.stacks
            else:
                idx = torch.tensor(g.rows(members), device=next(iter(g.stacks.values())).device)
                st = {k: v.index_select(0, idx) for k, v in g.stacks.items()}
            if len(members) == 1:
                b0 = members[0]
                V = grads[b0] if b0.stacked else grads[b0].unsqueeze(0)
            else:
                V = torch.cat([grads[b] if b.stacked else grads[b].unsqueeze(0) for b in members])
            U, dot = self.kind.precondition(members, st, V, damping)
            off = 0
            for b in members:
                if b.stacked:
                    out_u[b] = U[off:off + b.num_stack]
                    out_dot[b] = dot[off:off + b.num_stack].sum()
                else:
                    out_u[b] = U[off]
                    out_dot[b] = dot[off]
                off += b.num_stack
        return out_u, out_dot

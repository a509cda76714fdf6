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
from typing import TYPE_CHECKING, Dict, List, Optional

import torch

from ._numerics import flush_all_
from .blocks import Block

if TYPE_CHECKING:    # for the annotations only
    from .inverses.base import InverseKind
    from .inverses.plan import StepPlan

__all__ = ["Preconditioning", "ShapeGroup"]


class ShapeGroup:
    """Blocks of one gradient shape/dtype/device, preconditioned in one batched call.

    A stacked block (grouped convolution, normalisation layer) contributes ``num_stack``
    consecutive matrices to the stacks, a plain block one; ``slots`` records where each sits.
    ``plan``: the group's per-step plan (kfac_kernels/inverses/plan.py) when its kind has one;
    ``single``: one unstacked matrix (plain [m, n] operands)."""

    def __init__(self, key, blocks: List[Block]):
        self.key = key
        self.blocks = blocks
        self.stacks: Dict[str, torch.Tensor] = {}
        self.slots: Dict[Block, slice] = {}
        self.single = len(blocks) == 1 and not blocks[0].stacked
        self.plan: Optional[StepPlan] = None

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
            b.state.set_decomposition({k: (v[sl] if b.stacked else v[sl.start])
                                       for k, v in self.stacks.items()})

    def rows(self, members: List[Block]) -> List[int]:
        return [i for b in members for i in range(self.slots[b].start, self.slots[b].stop)]


class Preconditioning:
    """The shape groups of one engine and the batched preconditioning over them (``kind``: the
    inverse kind, which knows its entries and its op)."""

    def __init__(self, kind: InverseKind):
        self.kind = kind
        self.groups: List[ShapeGroup] = []
        self._plan_damping: Optional[float] = None   # the damping the groups' plans were built for

    def regroup(self, blocks) -> None:
        groups: Dict[tuple, List[Block]] = OrderedDict()
        for b in blocks:
            if b.inverse:
                key = (b.shape[-2:], b.factor_dtype, b.weight.device, tuple(sorted(b.inverse)))
                groups.setdefault(key, []).append(b)
        self.groups = [ShapeGroup(k, v) for k, v in groups.items()]
        for g in self.groups:
            g.restack()
        self.invalidate()

    def invalidate(self) -> None:
        """The plans are out of date (new decompositions, or what they read changed)."""
        self._plan_damping = None

    def _build_plans(self, damping: float) -> None:
        for g in self.groups:
            plan = self.kind.plan(g.blocks, g.stacks, damping)
            if plan is not None:
                # no subnormal numbers in what the plan computed (its views of the group's
                # stacks are the decompositions, flushed when they were made)
                stacks = {id(t) for t in g.stacks.values()}
                flush_all_(t for t in (getattr(plan, k) for k in plan._TERMS)
                           if t is not None
                           and id(t if t._base is None else t._base) not in stacks)
            g.plan = plan.single() if (plan is not None and g.single) else plan
        self._plan_damping = damping

    def local(self, grads: Dict[Block, torch.Tensor], damping: float):
        """``({block: U}, {block: <U, V>})`` with the decompositions this process holds: a
        group whose members all have gradients runs its plan (built once per decomposition
        and damping), otherwise the kind's op."""
        compiling = torch.compiler.is_compiling()   # compiled: the custom ops, no plans
        if not compiling and self._plan_damping != damping:
            self._build_plans(damping)
        out_u: Dict[Block, torch.Tensor] = {}
        out_dot: Dict[Block, torch.Tensor] = {}
        for g in self.groups:
            members = [b for b in g.blocks if b in grads]
            if not members:
                continue
            full = len(members) == len(g.blocks)
            if full and g.plan is not None and not compiling:
                if g.single:
                    b0 = members[0]
                    out_u[b0], out_dot[b0] = g.plan(grads[b0])
                    continue
                U, dot = g.plan(torch.cat([grads[b] if b.stacked else grads[b].unsqueeze(0)
                                           for b in members]) if len(members) > 1
                                else grads[members[0]])
            else:
                U, dot = self._op_path(g, members, grads, damping, full)
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

    def _op_path(self, g: ShapeGroup, members, grads, damping: float, full: bool):
        """One call of the kind's op on the members' stack."""
        if full:
            st = g.stacks
        else:
            idx = torch.tensor(g.rows(members), device=next(iter(g.stacks.values())).device)
            st = {k: v.index_select(0, idx) for k, v in g.stacks.items()}
        if len(members) == 1:
            b0 = members[0]
            V = grads[b0] if b0.stacked else grads[b0].unsqueeze(0)
        else:
            V = torch.cat([grads[b] if b.stacked else grads[b].unsqueeze(0) for b in members])
        return self.kind.precondition(members, st, V, damping)

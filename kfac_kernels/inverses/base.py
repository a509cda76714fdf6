"""The interface of an inverse kind and what every kind shares (pi, stacked blocks, buckets)."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .. import ops
from .._numerics import flush_all_
from ..blocks.state import BlockState
from ..ops.reference import pinv_cut
from .plan import StepPlan, damped_inverse_from_eigh, reciprocal_or_zero, two_sided

__all__ = ["InverseKind", "Slice", "finite_each", "pi", "buckets", "select", "diagonal_side"]


def finite_each(stack: torch.Tensor) -> torch.Tensor:
    """[B] bool: whether each matrix of a [B, n, n] stack is finite (on the device): a sum is
    finite iff every entry is (or it overflowed, which also deserves the fallback), formed in at
    least float32 so that a half-precision stack of finite entries does not overflow."""
    wide = torch.float64 if stack.dtype == torch.float64 else torch.float32
    return torch.isfinite(stack.sum((-2, -1), dtype=wide))


def pi(b) -> torch.Tensor:
    """π = sqrt((tr A / dim A) / (tr G / dim G)) on the device (1 where undefined); one per
    member of a stacked block, and a diagonal A's trace is its sum."""
    diagA = b.A if b.diag_A else b.A.diagonal(dim1=-2, dim2=-1)
    diagG = b.G if getattr(b, "diag_G", False) else b.G.diagonal(dim1=-2, dim2=-1)
    ta = diagA.to(b.factor_dtype).sum(-1) / b.A.shape[-1]
    tg = diagG.to(b.factor_dtype).sum(-1) / b.G.shape[-1]
    p = torch.sqrt(ta / tg)
    return torch.where(torch.isfinite(p) & (p > 0), p, torch.ones_like(p))


def select(b, only: Optional[set]) -> Dict[str, torch.Tensor]:
    """A block's factors to decompose: all, or those listed in ``only`` as (block, which). A
    diagonal side (an embedding's A, a side over ``max_factor_dim``) needs no decomposition:
    its eigenvalues are its entries."""
    mats = {w: getattr(b, w) for w in ("A", "G") if not getattr(b, "diag_" + w)}
    # factors stored in a narrower dtype (factor_storage_dtype) are decomposed in factor_dtype
    return {w: f.to(b.factor_dtype) for w, f in mats.items() if only is None or (b, w) in only}


def diagonal_side(st: Dict[str, torch.Tensor]) -> Optional[str]:
    """"A" or "G" when the stacked entries ``st`` are those of a block with that side diagonal
    (its eigenvalues without an eigenbasis), else None."""
    for w in ("A", "G"):
        if "lam" + w in st and "Q" + w not in st:
            return w
    return None


def buckets(units, mats: Callable
            ) -> "OrderedDict[tuple, List[Tuple[Any, str, torch.Tensor]]]":
    """The factors of ``units`` by (size, dtype, device): one batched decomposition each."""
    out: "OrderedDict[tuple, list]" = OrderedDict()
    for b in units:
        for which, f in mats(b).items():
            out.setdefault((f.shape[-1], f.dtype, f.device), []).append((b, which, f))
    return out


class Slice:
    """One matrix of a stacked block, seen by the decompositions as a block of its own (so that
    batching by size and the fallback chain work per matrix)."""

    diag_A = diag_G = False

    def __init__(self, block, i: int):
        self.block, self.i = block, i
        self.name = f"{block.name}[{i}]"
        self.factor_dtype = block.factor_dtype
        # the member's factors and entries (views of the block's); what a decomposition of the
        # slice sets stays here until :meth:`InverseKind.decompose` stacks it into the block's
        self.state = BlockState(A=block.A[i], G=block.G[i],
                                inverse={k: v[i] for k, v in block.inverse.items() if k != "S"})

    @property
    def A(self) -> torch.Tensor:
        A = self.state.A
        assert A is not None              # a slice is made of a block with factors
        return A

    @property
    def G(self) -> torch.Tensor:
        G = self.state.G
        assert G is not None
        return G

    @property
    def inverse(self) -> Dict[str, torch.Tensor]:
        return self.state.inverse

    def is_diagonal(self, which: str) -> bool:
        return False


class InverseKind:
    """How one ``inverse=`` kind decomposes factors, what it stores in ``block.inverse`` and how
    it preconditions a stack of gradient matrices.

    A kind is built once per engine with the options, the health monitor (warn-once) and
    ``backend(op)`` (the backend to ask for, see ``ops._registry.op_backend``). The engine and
    the communication strategy talk to it only through the methods below."""

    name = "?"
    damping_modes: Tuple[str, ...] = ("eigen", "pi")
    default_damping_mode = "eigen"
    decomposition_op = "symeig"
    precondition_op = "kron_precondition_eigen"
    #: whether :meth:`on_pass` wants every backward pass's output-gradients
    wants_passes = False

    def __init__(self, opts, health, backend: Callable[[str], str]):
        self.opts = opts
        self.health = health
        self.backend = backend

    # ---------------------------------------------------------------- options
    @classmethod
    def check_options(cls, values: dict) -> None:
        """Refuse option combinations this kind cannot honour (``values``: every option)."""

    def check_distributed(self, k: int, world: int) -> None:
        """Raise NotImplementedError when this kind cannot run with ``k`` of ``world`` ranks
        holding each decomposition."""

    # ---------------------------------------------------------------- decompositions
    def entries(self, b, which: str) -> List[Tuple[str, Tuple[int, ...], bool]]:
        """(key, shape, symmetric) of what decomposing ``which`` ("A"/"G") of ``b`` stores in
        ``b.inverse`` (shape without the stack dim); what a strategy must share across ranks."""
        n = b.in_dim if which == "A" else b.out_dim
        if b.is_diagonal(which):
            return [("lam" + which, (n,), False)]
        return [("Q" + which, (n, n), False), ("lam" + which, (n,), False)]

    def extra_entries(self) -> Tuple[str, ...]:
        """Keys of ``b.inverse`` computed on every rank rather than shared (EKFAC's S)."""
        return ()

    def decompose(self, blocks, only: Optional[set], inverse_updates: int) -> None:
        """Decompose the factors of ``blocks`` (``only``: just these (block, "A"|"G") pairs; the
        others' entries in ``block.inverse`` are left as they are).

        A stacked block (groups, channels) is decomposed through one :class:`Slice` per member,
        so its matrices join the size buckets (one batched call with every other factor of that
        size) and the fallback chain works per matrix. A diagonal A is not decomposed: its
        entries are its eigenvalues."""
        units, slices = [], {}
        for b in blocks:
            if b.stacked:
                slices[b] = [Slice(b, i) for i in range(b.num_stack)]
                units += slices[b]
            else:
                units.append(b)
        if only is not None:
            only = set(only) | {(p, w) for b, parts in slices.items() for p in parts
                                for w in ("A", "G") if (b, w) in only}
        self.decompose_units(units, only, inverse_updates)
        for b, parts in slices.items():
            new = {k: torch.stack([p.inverse[k] for p in parts]) for k in parts[0].inverse}
            b.state.set_decomposition(new, keep_others=only is not None)
        for b in blocks:
            for w in ("A", "G"):
                if b.is_diagonal(w) and (only is None or (b, w) in only):
                    b.state.put_entries({"lam" + w: getattr(b, w).to(b.factor_dtype, copy=True)})
        # no subnormal numbers in the decompositions (they slow every product after)
        flush_all_(v for b in blocks for v in b.inverse.values()
                   if isinstance(v, torch.Tensor))

    def decompose_units(self, units, only: Optional[set], inverse_updates: int) -> None:
        raise NotImplementedError

    def restart_if_nonfinite(self, b, which: str, f: torch.Tensor) -> bool:
        """A running factor that is not finite (a corrupted checkpoint, an overflow) has no
        decomposition, and the running average would keep it non-finite for ever: it restarts,
        so that the block's next accepted estimate is taken whole (first-estimate rule). Read on
        the host: the inverse update synchronises anyway. Returns whether it restarted."""
        if bool(torch.isfinite(f).all()):
            return False
        src = getattr(b, which)
        if src is f or (src.dtype != f.dtype and src.shape == f.shape):  # f: a widened copy
            # a stacked block's members share one counter: the whole factor restarts
            (b.block if isinstance(b, Slice) else b).state.restart_factor(which)
        self.health.warn_once(("restart", b.name, which),
                              f"block {b.name!r}: the running factor {which} is not finite; it "
                              f"restarts from the next factor estimate")
        return True

    # ---------------------------------------------------------------- preconditioning
    def precondition(self, members, st: Dict[str, torch.Tensor], V: torch.Tensor,
                     damping: float):
        """``(U, <U, V>)`` for the stack ``V`` of ``members``' gradient matrices, from the
        stacked entries ``st`` (one batched op call)."""
        raise NotImplementedError

    def pi_damped(self, members, lamG, lamA, damping: float):
        """Eigenvalues with pi damping folded in: lamA + pi sqrt(gamma), lamG + sqrt(gamma)/pi."""
        root = math.sqrt(damping)
        pis = torch.cat([pi(b).reshape(-1) for b in members]).to(lamA.dtype)
        return lamG + (root / pis).unsqueeze(-1), lamA + (pis * root).unsqueeze(-1)

    def precondition_diag(self, members, st, V, damping: float):
        """Blocks with a diagonal side. A diagonal A: ``ops.kron_precondition_diag`` with
        scalings lamG a^T (eigenvalue damping) or the pi-damped product (damping_mode "pi", also
        under inverse="cholesky": the same update, with G's inverse through its eigenbasis). A
        diagonal G is the same op on the transposed gradients: U^T = QA [(QA^T V^T) /
        (lamA g^T + damping)] (docs/math.md, "Diagonal factor sides"); <U, V> is unchanged by
        the transposition."""
        lamG, lamA = st["lamG"].clamp_min(0), st["lamA"].clamp_min(0)
        if self.opts.damping_mode == "pi":
            lamG, lamA = self.pi_damped(members, lamG, lamA, damping)
            damping = 0.0
        backend = self.backend("kron_precondition_diag")
        if diagonal_side(st) == "G":
            Ut, dot = ops.kron_precondition_diag(
                V.transpose(-1, -2), st["QA"], lamA.unsqueeze(-1) * lamG.unsqueeze(-2),
                float(damping), return_dot=True, backend=backend)
            return Ut.transpose(-1, -2), dot
        return ops.kron_precondition_diag(V, st["QG"], lamG.unsqueeze(-1) * lamA.unsqueeze(-2),
                                          float(damping), return_dot=True, backend=backend)

    # ---------------------------------------------------------------- per-step plans
    def plan(self, members, st: Dict[str, torch.Tensor], damping: float) -> Optional[StepPlan]:
        """The shape group's per-step plan from its stacked entries ``st`` (batched;
        kfac_kernels/inverses/plan.py), or None to call the op every step (a backend other
        than torch, or a kind without one)."""
        return None

    def plan_reads_factors(self) -> bool:
        """Whether the plan reads what a factor update changes (the running factors through pi,
        EKFAC's scalings): it is then rebuilt after every factor update."""
        return self.opts.damping_mode == "pi"

    def torch_path(self, op: str, device) -> bool:
        """Whether ``op`` resolves to the torch backend on ``device`` (where a plan applies)."""
        return ops._registry.resolve(op, self.backend(op), device) == "torch"

    def plan_diag(self, members, st, damping: float) -> Optional[StepPlan]:
        """The plan of :meth:`precondition_diag` (a diagonal G: ``[(V QA) * R] QA^T``)."""
        if not self.torch_path("kron_precondition_diag", st["lamG"].device):
            return None
        lamG, lamA = st["lamG"].clamp_min(0), st["lamA"].clamp_min(0)
        side = diagonal_side(st)
        if self.opts.damping_mode == "pi":
            lamG, lamA = self.pi_damped(members, lamG, lamA, damping)
            if damping > 0:
                # pi damping factorises: the dense side's damped inverse once, the diagonal
                # side's reciprocals broadcast over the other dim (one product per step, no
                # [m, n] scalings)
                if side == "G":
                    return StepPlan(lamA.dtype, Ri=damped_inverse_from_eigh(st["QA"], lamA),
                                    R=reciprocal_or_zero(lamG).unsqueeze(-1), batched=True)
                return StepPlan(lamG.dtype, Li=damped_inverse_from_eigh(st["QG"], lamG),
                                R=reciprocal_or_zero(lamA).unsqueeze(-2), batched=True)
            damping = 0.0
        scal = pinv_cut(lamG.unsqueeze(-1) * lamA.unsqueeze(-2), damping, 2)
        R = reciprocal_or_zero(scal + float(damping))
        if side == "G":
            return StepPlan(st["QA"].dtype, Ri=st["QA"], R=R, Ro=st["QA"].transpose(-1, -2),
                            batched=True)
        return two_sided(st["QG"], None, R, batched=True)

    # ---------------------------------------------------------------- per-step hooks (EKFAC)
    def on_pass(self, block, inputs, grads, calls, alpha, n: int, basis_replaced: bool) -> None:
        """One backward pass's output-gradients of ``block`` (scaled by ``alpha``); ``inputs``:
        the layer inputs of the micro-batch (``calls[j]`` indexes them for ``grads[j]``)."""

    def after_factor_update(self, blocks, reject, comm) -> None:
        """After the running factors of ``blocks`` were updated (``reject``: the step's flag)."""

    def after_decomposition(self, blocks, comm) -> None:
        """After new decompositions of ``blocks`` exist on this rank."""

    def close_micro_batch(self, block, weight: float) -> None:
        """Gradient accumulation: the passes of one micro-batch are in; weigh what was kept of
        them by ``weight`` (:meth:`FactorStatistics.micro_batch_weight`)."""

    def finish_micro_batches(self, block, final, examples: int) -> None:
        """Gradient accumulation: every micro-batch is in; scale the weighted sums by ``final``
        (a float or a device scalar); ``examples``: the step's example count."""

    def end_step(self) -> None:
        """Forget per-step state."""

    def drop_capture(self) -> None:
        """The step's captures were dropped (a stale step): forget what was kept of them."""

"""The DDP strategy: K-FAC on torch.distributed (one code path for NCCL and gloo).

What every rank does (docs/distributed.md has the derivations, options and figures):

* **Factors** (every factor step). Each rank computes its local estimates A_r, G_r from its own
  examples. They are summed over ranks with ``all_reduce``, weighted by the local example count
  N_r, so every rank ends with the factors one process computes on the concatenated batch:
  ``A = sum_r N_r A_r / sum_r N_r`` and, for ``loss_reduction="mean"``,
  ``G = sum_r N_r G_r / sum_r N_r`` (each rank's G_r already holds its per-example gradients
  ``g_n``: the engine rescales the local mean loss's gradients by the local N_r); for ``"sum"``,
  ``G = sum_r G_r``. The weights travel in the same buffer as the factors, so unequal local
  batches cost no host synchronisation. Symmetric factors are sent as upper triangles, in buckets
  of at most ``bucket_cap_mb``, each an asynchronous collective. The A reduction is launched as
  soon as the backward pass begins (first output-gradient of the step for "empirical", the start
  of the curvature passes for "fisher"/"ggn") and so overlaps with the backward pass; for
  "fisher"/"ggn" the G reduction is launched when their passes end and overlaps with
  ``loss.backward()``; for "empirical" G is complete only after the backward pass and is reduced
  in ``step()``. A non-finite statistic on any rank makes the sum non-finite on every rank, so
  the engine's guard rejects that update on all ranks alike.
* **Inverses** (every inverse step). Factors (``grad_worker_fraction == 1``) or blocks (``< 1``)
  are assigned to ranks once, greedily, largest cost first (``assignment``: "compute" = n^3,
  "memory" = n^2, "round_robin"). Each rank decomposes its share; the results are broadcast to
  the ranks that precondition with them.
* **Preconditioning** (every step). With ``grad_worker_fraction = k / world`` the ranks form a
  k x (world / k) grid: a block's decomposition lives on the k ranks of its owner's column, each
  preconditions the block's gradient for its row and broadcasts the result along the row. k =
  world (fraction 1): decompositions everywhere, no per-step communication; k = 1 (fraction
  1/world): each decomposition on one rank, which broadcasts the preconditioned gradient.

Nothing here runs unless torch.distributed is initialised with more than one process (or
``distributed=True``); a single process takes the engine's own path and pays nothing
(:func:`kfac_kernels.comm.factory.strategy_for` picks the strategy). The flat buffers are
:mod:`kfac_kernels.comm.buckets`, the grid and the assignment :mod:`kfac_kernels.comm.assignment`.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, defaultdict
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from .assignment import assign, decomposition_cost, worker_grid
from .base import (CommStats, Directions, DistributedOptions, FactorSet, LocalComm,
                   MismatchError, Stats, StrategyOptions)
from .buckets import MB, Bucket, factor_slot, split_buckets

if TYPE_CHECKING:
    from ..blocks import Block
    from ..capture import Capture
    from ..inverses.base import InverseKind

__all__ = ["DistributedKFAC", "sampling_seed"]


def sampling_seed(base: int, rank: int, step: int) -> int:
    """Seed of rank ``rank``'s Fisher sampler on optimiser step ``step`` (splitmix64 of the
    three): independent draws on every rank, reproducible from a checkpoint."""
    mask = (1 << 64) - 1
    x = (int(base) * 0x9E3779B97F4A7C15 + (int(rank) + 1) * 0xBF58476D1CE4E5B9
         + (int(step) + 1) * 0x94D049BB133111EB) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) & ((1 << 62) - 1)


class _Pending:
    """Launched reductions of one factor side (A or G) of the current step."""

    def __init__(self, snapshot, buckets, flats, works, weights):
        self.snapshot, self.buckets, self.flats, self.works = snapshot, buckets, flats, works
        self.weights = weights

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works = []


_GROUPS: Dict[tuple, Any] = {}


def _subgroup(ranks: Tuple[int, ...]):
    """A process group over these global ranks, created once (only its members call this)."""
    g = _GROUPS.get(ranks)
    if g is None:
        g = _GROUPS[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return g


class DistributedKFAC(LocalComm):
    """The torch.distributed communication strategy of one
    :class:`kfac_kernels.engine.KFACEngine` (see the module docstring; the interface is
    :class:`kfac_kernels.comm.LocalComm`'s). Created by the engine from the optimiser's options;
    everything else it needs is passed in at the call points."""

    #: preconditioning broadcasts directions (grad_worker_fraction < 1), so ``opt.compile()``
    #: compiles only the local part
    precondition_collectives = True

    def __init__(self, blocks: List[Block], opts: StrategyOptions, kind: InverseKind,
                 dist_opts: DistributedOptions, group: Any):
        self.opts = opts           # the optimiser's Options (agreement, seed, loss_reduction)
        self.kind = kind
        self.dist_opts = dist_opts     # the distributed ones among them, checked
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.global_ranks = list(dist.get_process_group_ranks(group))
        self.backend = str(dist.get_backend(group))
        self.stats = CommStats()
        self.blocks = blocks = list(blocks)
        self.index = {b: i for i, b in enumerate(blocks)}
        devices = {b.weight.device for b in blocks}
        if len(devices) > 1:
            raise ValueError(f"distributed K-FAC needs every block on one device per process, "
                             f"got {sorted(map(str, devices))}")
        self.device = next(iter(devices))
        if "nccl" in self.backend and self.device.type != "cuda":
            raise ValueError(f"the process group uses NCCL but the model is on {self.device}: move "
                             f"the model to this rank's GPU before creating the optimiser")
        self.cap = max(1, int(dist_opts.bucket_cap_mb * MB))

        # --- the grid and the static assignment of decompositions
        self.k, self.m = worker_grid(self.world, dist_opts.grad_worker_fraction)
        self.row, self.col = divmod(self.rank, self.m)
        self.units = assign(blocks, self.k, self.world, dist_opts.assignment)
        self.owner_col: Dict[Any, int] = {}    # block -> column that holds its decomposition
        for b, whichs, owner in self.units:
            self.owner_col.setdefault(b, owner % self.m)
        self.row_ranks = [self.row * self.m + j for j in range(self.m)]
        self.col_ranks = [i * self.m + self.col for i in range(self.k)]
        self.base_seed = 0
        self._agree()       # before any subgroup: ranks that disagree must not create groups
        kind.check_distributed(self.k, self.world)   # every rank raises alike
        self.row_group = self._group_for(self.row_ranks)
        self.col_group = self._group_for(self.col_ranks)

        # --- static layouts of the factor reduction
        sum_g = opts.loss_reduction == "sum"
        self.g_divided = not sum_g
        self.a_buckets = split_buckets(
            [((b, "A"), *factor_slot(b, "A"), b.factor_dtype, self.device) for b in blocks],
            self.cap, lambda key: [("w", key[0])])
        self.g_buckets = split_buckets(
            [((b, "G"), *factor_slot(b, "G"), b.factor_dtype, self.device) for b in blocks],
            self.cap, lambda key: [("w", key[0]), ("p", key[0])])
        # EKFAC's scalings (grad_worker_fraction 1 only): reduced like G, one [out, in] per block
        self.s_buckets = (split_buckets(
            [((b, "S"), tuple(b.shape), False, b.factor_dtype, self.device) for b in blocks],
            self.cap, lambda key: [("w", key[0]), ("p", key[0])])
            if "S" in kind.extra_entries() else [])
        self._a: Optional[_Pending] = None
        self._g: Optional[_Pending] = None
        self._mismatch: List[Tuple[Bucket, torch.Tensor]] = []
        self._decomposed: set = set()
        self._gathered: Optional[Tuple[int, Dict]] = None

    @property
    def comm(self) -> CommStats:
        """The former name of :attr:`stats` (what this rank sent, per phase), kept so that code
        reading ``opt.engine.dist.comm`` still works."""
        return self.stats

    # ------------------------------------------------------------------ set-up
    def _group_for(self, ranks: List[int]):
        if len(ranks) == self.world:
            return self.group
        if len(ranks) == 1:
            return None
        return _subgroup(tuple(self.global_ranks[r] for r in ranks))

    def _signature(self) -> List[str]:
        """What ranks must agree on, one line each: every option marked ``agree`` in
        kfac_kernels/options.py, then every block."""
        lines = self.opts.agreement_lines()
        for b in self.blocks:
            lines.append(f"block {b.name!r}: {type(b.module).__name__} grad {tuple(b.shape)} "
                         f"{str(b.weight.dtype).replace('torch.', '')} factors "
                         f"{str(b.factor_dtype).replace('torch.', '')}")
        return lines

    def _agree(self) -> None:
        """Check that every rank built the same K-FAC (a clear error instead of a hang later) and
        take rank 0's base seed for the Fisher sampler. Construction only: syncs the host."""
        sig = self._signature()
        digest = int.from_bytes(hashlib.sha256("\n".join(sig).encode()).digest()[:7], "little")
        o = self.opts
        seed = o.seed if o.seed is not None else int(
            torch.randint(0, 2 ** 62, (1,)).item()) if o.curvature == "fisher" else 0
        mine = torch.tensor([digest, len(self.blocks), seed], dtype=torch.int64,
                            device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        self.stats.add("setup", mine)
        dist.all_gather(everyone, mine, group=self.group)
        rows = [t.cpu().tolist() for t in everyone]
        if any(r[0] != rows[0][0] for r in rows):
            sigs: List[Any] = [None] * self.world
            dist.all_gather_object(sigs, sig, group=self.group)
            raise MismatchError(_describe_mismatch(sigs))
        self.base_seed = rows[0][2]

    # ------------------------------------------------------------------ factor phase
    def _reduce(self, buckets: List[Bucket], values: Dict, weights: Dict, scale: bool,
                phase: str = "factor") -> _Pending:
        """Sum ``weight * value`` (``scale``) or ``value`` over ranks, asynchronously; each
        bucket carries the weights (and presence flags) of its blocks after its data."""
        flats, works = [], []
        for bk in buckets:
            ws = []
            for key in bk.scalars:
                tag, b = key
                ws.append(weights.get(b, 0.0) if tag == "w" else float(b in weights))
            flat = bk.pack(values, ws)
            if scale:    # absent blocks are zeros: any multiplier leaves them so
                bw = {weights[key[0]] for key, *_ in bk.slots if key[0] in weights}
                if len(bw) == 1:
                    w = bw.pop()
                    if w != 1.0:
                        flat[:bk.data_numel].mul_(w)
                else:
                    for key, _, _, off, numel in bk.slots:
                        w = weights.get(key[0], 1.0)
                        if w != 1.0:
                            flat[off:off + numel].mul_(w)
            self.stats.add(phase, flat)
            works.append(dist.all_reduce(flat, group=self.group, async_op=True))
            flats.append(flat)
        return _Pending(None, buckets, flats, works, weights)

    def average(self, values: "OrderedDict[Any, torch.Tensor]", weight: float = 1.0,
                symmetric: bool = False) -> Dict[Any, torch.Tensor]:
        """``sum_r weight_r * x_r / sum_r weight_r`` for each tensor, every rank passing the same
        keys in the same order with the same shapes and dtypes (e.g. per-block statistics that a
        new curvature type adds; ``weight``: this rank's example count). Bucketed collectives,
        waited on before returning; no host synchronisation. ``symmetric``: send upper triangles
        of square matrices."""
        slots = [(key, tuple(v.shape), symmetric, v.dtype, v.device) for key, v in values.items()]
        buckets = split_buckets(slots, self.cap, lambda key: [("w", key)])
        pending = []
        for bk in buckets:
            flat = bk.pack(values, [float(weight)] * len(bk.scalars))
            if weight != 1.0:
                flat[:bk.data_numel].mul_(float(weight))
            self.stats.add("factor", flat)
            pending.append((bk, flat, dist.all_reduce(flat, group=self.group, async_op=True)))
        out = {}
        for bk, flat, work in pending:
            work.wait()
            out.update(bk.unpack(flat, {key: bk.scalar(flat, ("w", key))
                                        for key, *_ in bk.slots}))
        return out

    def _launch_a(self, capture: "Capture") -> Optional[_Pending]:
        captured = [b for b in self.blocks if capture.of(b).captured()]
        if not captured:
            return None
        a_hats = capture.a_statistics(captured)
        weights = {b: float(capture.examples(b)) for b in captured}
        pend = self._reduce(self.a_buckets, {(b, "A"): a for b, a in a_hats.items()}, weights,
                            scale=True)
        pend.snapshot = capture.input_counts()
        return pend

    def _launch_g(self, capture: "Capture") -> _Pending:
        ready = {b: capture.of(b).G_hat for b in self.blocks
                 if capture.of(b).captured() and capture.of(b).G_hat is not None}
        weights = {b: float(capture.examples(b)) for b in ready}
        pend = self._reduce(self.g_buckets, {(b, "G"): g for b, g in ready.items()}, weights,
                            scale=self.g_divided)
        pend.snapshot = capture.pending_passes
        return pend

    def backward_started(self, capture: "Capture") -> None:
        """First output-gradient of a capture step: the forward pass is over, reduce A now."""
        if self._a is None:
            self._a = self._launch_a(capture)

    def curvature_started(self, capture: "Capture") -> None:
        if self._a is None:
            self._a = self._launch_a(capture)

    def sampler(self, generator: Optional[torch.Generator], device: torch.device,
                step: int) -> torch.Generator:
        """This rank's own draws, reproducible per step (:func:`sampling_seed`)."""
        if generator is None or generator.device != torch.device(device):
            generator = torch.Generator(device=device)
        generator.manual_seed(sampling_seed(self.base_seed, self.rank, step))
        return generator

    def curvature_finished(self, capture: "Capture") -> None:
        if self._g is not None:
            self._g.wait()
        self._g = self._launch_g(capture)

    def agree(self, found: torch.Tensor) -> torch.Tensor:
        """Every rank takes the same skip decision (the running factors must stay identical):
        the found-inf flags are summed over the group (one number, no host sync)."""
        found = found.clone()
        dist.all_reduce(found, group=self.group)
        return found

    def clear(self) -> None:
        """The engine dropped this step's capture: forget reductions launched for it."""
        self._a = self._g = None

    def factor_statistics(self, captured: List[Block], capture: "Capture") -> Stats:
        """{block: (A, G)} averaged over ranks, for the blocks with statistics on this step
        (reductions launched during the backward pass are reused when nothing was captured
        since)."""
        a, g = self._a, self._g
        self._a = self._g = None
        if a is None or a.snapshot != capture.input_counts():
            if a is not None:         # inputs captured after the launch (several forward passes)
                a.wait()
            a = self._launch_a(capture)
        if g is None or g.snapshot != capture.pending_passes:
            if g is not None:
                g.wait()
            g = self._launch_g(capture)
        assert a is not None, "factor_statistics called without captured blocks"
        a.wait()
        g.wait()
        a_vals: Dict = {}
        for bk, flat in zip(a.buckets, a.flats):
            a_vals.update(bk.unpack(flat, {key: bk.scalar(flat, ("w", key[0]))
                                           for key, *_ in bk.slots if key[0] in a.weights}))
        g_vals: Dict = {}
        for bk, flat in zip(g.buckets, g.flats):
            div = ({key: bk.scalar(flat, ("w", key[0])) for key, *_ in bk.slots
                    if key[0] in g.weights} if self.g_divided else None)
            g_vals.update(bk.unpack(flat, div))
            p = flat[bk.data_numel:].view(-1, 2)[:, 1]
            bad = (p > 0) & (p < self.world)
            self._mismatch.append((bk, bad))
        if len(self._mismatch) > 4 * len(self.g_buckets):
            self._fold_mismatch()
        stats = OrderedDict()
        for b in captured:
            if b in g.weights:
                stats[b] = (a_vals[(b, "A")], g_vals[(b, "G")])
        return stats

    def reduce_scalings(self, s_hats: Dict[Block, torch.Tensor],
                        counts: Mapping[Block, int]) -> Dict[Block, torch.Tensor]:
        """EKFAC's per-block estimates {block: S_hat} combined like G: weighted by each rank's
        example count and divided by their sum (a mean loss), or summed (a summed loss)."""
        weights = {b: float(counts[b]) for b in s_hats}
        pend = self._reduce(self.s_buckets, {(b, "S"): s for b, s in s_hats.items()}, weights,
                            scale=self.g_divided)
        pend.wait()
        vals: Dict = {}
        for bk, flat in zip(pend.buckets, pend.flats):
            div = ({key: bk.scalar(flat, ("w", key[0])) for key, *_ in bk.slots
                    if key[0] in weights} if self.g_divided else None)
            vals.update(bk.unpack(flat, div))
        return OrderedDict((b, vals[(b, "S")]) for b in s_hats)

    def _fold_mismatch(self) -> None:
        acc: Dict[Bucket, torch.Tensor] = {}
        for bk, bad in self._mismatch:
            acc[bk] = bad if bk not in acc else acc[bk] | bad
        self._mismatch = list(acc.items())

    def _check_presence(self) -> None:
        """Raise (on every rank alike) if some block had statistics on some ranks only. Reads the
        flags gathered since the last inverse update: one host sync, inverse phase only."""
        if not self._mismatch:
            return
        self._fold_mismatch()
        names = []
        for bk, bad in self._mismatch:
            for (key, *_), flag in zip(bk.slots, bad.cpu().numpy().tolist()):
                if flag:
                    names.append(key[0].name)
        self._mismatch = []
        if names:
            raise MismatchError(
                f"blocks {names} had statistics on some ranks but not on others in a factor step: "
                f"distributed K-FAC needs every rank to run the same layers (and get gradients "
                f"for them) on factor steps; the ranks' factors now differ, so training stops here")

    # ------------------------------------------------------------------ inverse phase
    def has_inverse(self, b: Block) -> bool:
        return b in self._decomposed

    def holds(self, b: Block) -> bool:
        """Whether this rank keeps block ``b``'s decompositions."""
        return self.k == self.world or self.owner_col[b] == self.col

    def _entries(self, b, whichs) -> List[tuple]:
        """(key, shape, symmetric) of the decomposition entries of ``whichs`` of block ``b``, as
        the inverse kind stores them (with a leading ``num_stack`` dim for a stacked block)."""
        lead = (b.num_stack,) if b.stacked else ()
        return [(key, (shape if key == "lam" + w and b.is_diagonal(w) else lead + tuple(shape)),
                 sym)
                for w in whichs for key, shape, sym in self.kind.entries(b, w)]

    def _check_entries(self, units) -> None:
        # entries the kind computes on every rank (EKFAC's S, from the shared basis) stay local
        extra_ok = set(self.kind.extra_entries())
        for b, whichs, _ in units:
            known = {k for k, *_ in self._entries(b, ("A", "G"))} | extra_ok
            extra = set(b.inverse) - known
            if extra:
                raise NotImplementedError(
                    f"block {b.name!r}: decomposition entries {sorted(extra)} are not shared "
                    f"across ranks yet (declare them in the inverse kind's entries(), "
                    f"kfac_kernels/inverses)")

    def _layout(self, units, source: int) -> List[Bucket]:
        slots = []
        for b, whichs, owner in units:
            if owner == source:
                for key, shape, sym in self._entries(b, whichs):
                    slots.append(((b, key), shape, sym, b.factor_dtype, self.device))
        return split_buckets(slots, self.cap)

    def _share(self, units, sources: List[int], group, phase: str) -> None:
        """Broadcast the entries of the units owned by each of ``sources`` (group-local ranks)."""
        pending = []
        for s in sources:
            for bk in self._layout(units, s):
                if s == self.rank:
                    flat = bk.pack({(b, key): b.inverse[key] for (b, key), *_ in bk.slots})
                else:
                    flat = torch.empty(bk.numel, dtype=bk.dtype, device=self.device)
                self.stats.add(phase, flat)
                work = dist.broadcast(flat, src=self.global_ranks[s], group=group, async_op=True)
                pending.append((s, bk, flat, work))
        new: Dict[Any, dict] = defaultdict(dict)
        for s, bk, flat, work in pending:
            work.wait()
            # the source takes the copy it sent too: a symmetric entry went as its upper
            # triangle, and every rank must precondition with bit-identical decompositions
            for (b, key), t in bk.unpack(flat).items():
                new[b][key] = t
        for b, entries in new.items():
            b.state.set_decomposition(entries, keep_others=True)

    def _ready_units(self, ready: List[Block]) -> list:
        ready_set = set(ready)
        return [u for u in self.units if u[0] in ready_set]

    def decompose_here(self, ready: List[Block]) -> FactorSet:
        self._check_presence()
        return {(b, w) for b, whichs, owner in self._ready_units(ready) if owner == self.rank
                for w in whichs}

    def share_inverses(self, ready: List[Block]) -> None:
        units = self._ready_units(ready)
        self._check_entries([u for u in units if u[2] == self.rank])
        if self.k == self.world:
            self._share(units, list(range(self.world)), self.group, "inverse")
        elif self.k > 1:
            self._share(units, self.col_ranks, self.col_group, "inverse")
        self._decomposed.update(ready)
        for b in ready:
            if not self.holds(b):
                b.state.clear_decomposition()

    # ------------------------------------------------------------------ preconditioning
    def precondition_here(self, grads: Dict[Block, torch.Tensor]) -> Dict[Block, torch.Tensor]:
        """The blocks of this rank's column of the grid (all of them at k = world)."""
        if self.k == self.world:
            return grads
        return {b: V for b, V in grads.items() if self.owner_col[b] == self.col}

    def share_directions(self, grads: Dict[Block, torch.Tensor], U: Dict[Block, torch.Tensor],
                         dots: Dict[Block, torch.Tensor]) -> Directions:
        """Each rank broadcasts its column's directions along its row of the grid."""
        if self.k == self.world:
            return U, dots
        pending = []
        for s in self.row_ranks:
            col = s % self.m
            slots = []
            for b in self.blocks:
                if self.owner_col[b] == col and b in self._decomposed:
                    slots.append(((b, "U"), tuple(b.shape), False, b.weight.dtype, self.device))
            slots += [((b, "dot"), (), False, b.factor_dtype, self.device)
                      for (b, _), *_ in list(slots)]
            for bk in split_buckets(slots, self.cap):
                if s == self.rank:
                    flat = bk.pack({(b, key): (U.get(b) if key == "U" else dots.get(b))
                                    for (b, key), *_ in bk.slots})
                else:
                    flat = torch.empty(bk.numel, dtype=bk.dtype, device=self.device)
                self.stats.add("precondition", flat)
                work = dist.broadcast(flat, src=self.global_ranks[s], group=self.row_group,
                                      async_op=True)
                pending.append((s, bk, flat, work))
        out_u, out_dot = dict(U), dict(dots)
        for s, bk, flat, work in pending:
            work.wait()
            if s == self.rank:
                continue
            for (b, key), t in bk.unpack(flat).items():
                if b in grads:
                    (out_u if key == "U" else out_dot)[b] = t
        return ({b: out_u[b] for b in grads if b in out_u},
                {b: out_dot[b] for b in grads if b in out_dot})

    # ------------------------------------------------------------------ state
    def consolidate(self, to: int, inverse_updates: int) -> None:
        """Collective: gather every decomposition on rank ``to`` of the group (for its
        state_dict). A no-op at grad_worker_fraction 1, where every rank holds them all."""
        if self.k == self.world:
            return
        if not 0 <= to < self.world:
            raise ValueError(f"to={to} is not a rank of the process group (size {self.world})")
        to_row = to // self.m
        units = [u for u in self.units if u[0] in self._decomposed]
        gathered: Dict[Any, dict] = defaultdict(dict)
        for j in range(self.m):
            src = to_row * self.m + j            # the member of column j in to's row
            if src == to:
                continue
            col_units = [(b, w, src) for b, w, o in units if o % self.m == j]
            for bk in self._layout(col_units, src):
                if self.rank == src:
                    flat = bk.pack({(b, key): b.inverse[key] for (b, key), *_ in bk.slots})
                    self.stats.add("checkpoint", flat)
                    dist.send(flat, dst=self.global_ranks[to], group=self.group)
                elif self.rank == to:
                    flat = torch.empty(bk.numel, dtype=bk.dtype, device=self.device)
                    self.stats.add("checkpoint", flat)
                    dist.recv(flat, src=self.global_ranks[src], group=self.group)
                    for (b, key), t in bk.unpack(flat).items():
                        gathered[b][key] = t
        if self.rank == to:
            self._gathered = (inverse_updates, dict(gathered))

    def fill_state_dict(self, sd: dict, inverse_updates: int) -> None:
        missing = [b for b in self._decomposed if not b.inverse]
        if missing:
            got = self._gathered
            if got is None or got[0] != inverse_updates:
                raise RuntimeError(
                    f"with grad_worker_fraction={self.dist_opts.grad_worker_fraction} this rank "
                    f"holds only its share of the decompositions: call "
                    f"opt.consolidate_state_dict(to={self.rank}) on every rank (after the last "
                    f"step), then opt.state_dict() on rank {self.rank}")
            for b in missing:
                sd["blocks"][b.name]["inverse"] = {k: v.clone() for k, v in got[1][b].items()}
        sd["distributed"] = {"base_seed": self.base_seed, "world_size": self.world,
                             "grad_worker_fraction": self.dist_opts.grad_worker_fraction,
                             "assignment": self.dist_opts.assignment}

    def load_state_dict(self, sd: dict) -> None:
        self._a = self._g = None
        self._mismatch = []
        self._gathered = None
        info = sd.get("distributed")
        if info is not None:
            self.base_seed = int(info["base_seed"])
        self._decomposed = {b for b in self.blocks if b.inverse}
        for b in self.blocks:
            if not self.holds(b):
                b.state.clear_decomposition()

    # ------------------------------------------------------------------ description
    def describe(self) -> str:
        mine = [u for u in self.units if u[2] == self.rank]
        cost = lambda u: decomposition_cost(u[0], u[1], 3)   # noqa: E731
        total = sum(cost(u) for u in self.units) or 1
        how = ("decompositions broadcast to every rank" if self.k == self.world else
               "each decomposition on one rank, preconditioned gradients broadcast"
               if self.k == 1 else f"decompositions on {self.k} ranks each, preconditioned "
               f"gradients broadcast to groups of {self.m}")
        return (f"distributed: {self.backend}, world {self.world}, rank {self.rank}; "
                f"grad_worker_fraction={self.dist_opts.grad_worker_fraction} ({how}); assignment="
                f"{self.dist_opts.assignment!r}: this rank decomposes {len(mine)} of "
                f"{len(self.units)} {'factors' if self.k == self.world else 'blocks'} "
                f"({100.0 * sum(cost(u) for u in mine) / total:.0f}% of the n^3 cost); factor "
                f"buckets: {len(self.a_buckets)} A + {len(self.g_buckets)} G "
                f"({sum(b.nbytes for b in self.a_buckets + self.g_buckets) / MB:.2f} MB)")


def _describe_mismatch(sigs: List[List[str]]) -> str:
    ref = sigs[0]
    for r, sig in enumerate(sigs[1:], start=1):
        if sig == ref:
            continue
        for i in range(max(len(ref), len(sig))):
            a = ref[i] if i < len(ref) else "<nothing>"
            b = sig[i] if i < len(sig) else "<nothing>"
            if a != b:
                return (f"the ranks built different K-FAC optimisers (every rank must wrap the "
                        f"same model with the same options): rank 0 has {a!r}, rank {r} has {b!r}"
                        + (f" (rank 0: {_n_blocks(ref)} blocks, rank {r}: {_n_blocks(sig)})"
                           if len(ref) != len(sig) else ""))
    return "the ranks built different K-FAC optimisers"


def _n_blocks(sig: List[str]) -> int:
    return sum(line.startswith("block ") for line in sig)


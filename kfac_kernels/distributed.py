"""Distributed K-FAC on torch.distributed (one code path for NCCL and gloo).

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
``distributed=True``); a single process takes the engine's own path and pays nothing.
"""
from __future__ import annotations

import hashlib
import math
import sys
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .comm import LocalComm
from .options import ASSIGNMENTS

try:  # some builds of torch have no torch.distributed at all
    import torch.distributed as dist
    _HAVE_DIST = dist.is_available()
except ImportError:  # pragma: no cover
    dist = None
    _HAVE_DIST = False

__all__ = ["DistributedOptions", "DistributedKFAC", "MismatchError", "ASSIGNMENTS", "unwrap_model",
           "greedy_assignment", "worker_grid", "pack_triu", "unpack_triu", "sampling_seed",
           "CommStats"]

_MB = 1 << 20


class MismatchError(ValueError):
    """Ranks disagree about something that must be identical (model, options, layers used)."""


# ============================================================================ options
@dataclass(frozen=True)
class DistributedOptions:
    """How K-FAC uses torch.distributed: the optimisers' options ``distributed`` (here
    ``enabled``), ``process_group``, ``grad_worker_fraction``, ``assignment`` and
    ``bucket_cap_mb``, declared and documented in :mod:`kfac_kernels.options` (which also checks
    them). ``k = grad_worker_fraction * world`` must divide the world size."""
    enabled: Optional[bool] = None
    process_group: Any = None
    grad_worker_fraction: float = 1.0
    assignment: str = "compute"
    bucket_cap_mb: float = 25.0

    def __post_init__(self):
        from . import options as o
        for name, value in (("distributed", self.enabled),
                            ("grad_worker_fraction", self.grad_worker_fraction),
                            ("assignment", self.assignment), ("bucket_cap_mb", self.bucket_cap_mb)):
            o.OPTION[name].check(name, value)

    @classmethod
    def from_options(cls, opts) -> "DistributedOptions":
        return cls(enabled=opts.distributed, process_group=opts.process_group,
                   grad_worker_fraction=opts.grad_worker_fraction, assignment=opts.assignment,
                   bucket_cap_mb=opts.bucket_cap_mb)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module DistributedDataParallel wraps (K-FAC names blocks without "module."). Raises
    for the FSDP1 wrapper (FSDP2's ``fully_shard`` is supported: kfac_kernels.fsdp)."""
    if _HAVE_DIST:
        from torch.nn.parallel import DistributedDataParallel
        while isinstance(model, DistributedDataParallel):
            model = model.module
        if "torch.distributed.fsdp" in sys.modules:
            from .fsdp import refuse_fsdp1
            refuse_fsdp1(model)
    return model


def setup(blocks, options, kind, *, model: Optional[nn.Module] = None, params: Sequence = (),
          names: Optional[Dict[int, str]] = None) -> Optional["DistributedKFAC"]:
    """The strategy for an engine's ``blocks`` (``options``: its
    :class:`kfac_kernels.options.Options`; ``kind``: its inverse kind), or None where K-FAC runs
    in a single process. ``model``, ``params`` (the parameters outside blocks) and ``names``
    ({id(param): name}): what the FSDP2 strategy checks when the parameters are DTensors."""
    opts = DistributedOptions.from_options(options)
    fsdp = False
    if _HAVE_DIST and "torch.distributed.tensor" in sys.modules:   # only FSDP2 made DTensors
        from .fsdp import has_dtensors
        fsdp = has_dtensors([p for b in blocks for p in b.params] + list(params))
    if fsdp:
        if opts.enabled is False:
            raise ValueError("the model's parameters are DTensors (sharded with fully_shard): "
                             "K-FAC must run distributed on it; drop distributed=False")
        from .fsdp import FSDPKFAC
        group = opts.process_group if opts.process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) < 1:
            raise ValueError("this process is not a member of the process_group given to K-FAC")
        return FSDPKFAC(blocks, options, kind, opts, group, model=model, params=params,
                        names=names)
    if opts.enabled is False:
        return None
    if not (_HAVE_DIST and dist.is_initialized()):
        if opts.enabled or opts.process_group is not None:
            raise RuntimeError("distributed=True (or a process_group) was given but "
                               "torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group() first")
        return None
    group = opts.process_group if opts.process_group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    if size < 1:
        raise ValueError("this process is not a member of the process_group given to K-FAC")
    if size == 1 and not opts.enabled:
        return None
    return DistributedKFAC(blocks, options, kind, opts, group)


# ============================================================================ pure helpers
def greedy_assignment(costs: Sequence[float], workers: int) -> List[int]:
    """Largest-first greedy (LPT) assignment of items to ``workers``: items in decreasing cost
    (ties keep their order), each to the least loaded worker (ties: the lowest). Deterministic,
    so every rank computes the same assignment without communicating."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    load = [0.0] * workers
    owner = [0] * len(costs)
    for i in order:
        w = min(range(workers), key=lambda r: (load[r], r))
        owner[i] = w
        load[w] += costs[i]
    return owner


def worker_grid(world: int, fraction: float) -> Tuple[int, int]:
    """(k, m): k = round(fraction * world) gradient workers per block, in a k x m grid of ranks
    (rank = row * m + column); k must divide world."""
    k = min(world, max(1, int(round(fraction * world))))
    if world % k:
        raise ValueError(f"grad_worker_fraction={fraction} gives {k} gradient workers per block, "
                         f"which does not divide the world size {world}; choose k / {world} with k "
                         f"a divisor of {world}")
    return k, world // k


def sampling_seed(base: int, rank: int, step: int) -> int:
    """Seed of rank ``rank``'s Fisher sampler on optimiser step ``step`` (splitmix64 of the
    three): independent draws on every rank, reproducible from a checkpoint."""
    mask = (1 << 64) - 1
    x = (int(base) * 0x9E3779B97F4A7C15 + (int(rank) + 1) * 0xBF58476D1CE4E5B9
         + (int(step) + 1) * 0x94D049BB133111EB) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) & ((1 << 62) - 1)


_TRIU: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def _triu_index(n: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    key = (n, str(device))
    idx = _TRIU.get(key)
    if idx is None:
        r, c = torch.triu_indices(n, n, device=device)
        idx = _TRIU[key] = (r * n + c, c * n + r)
    return idx


def pack_triu(F: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The upper triangle (row by row, diagonal included) of symmetric [..., n, n] matrices as
    [..., n (n + 1) / 2]."""
    n = F.shape[-1]
    up, _ = _triu_index(n, F.device)
    flat = F.reshape(*F.shape[:-2], n * n)
    if out is None:
        return flat.index_select(-1, up)
    return torch.index_select(flat, -1, up, out=out)


def unpack_triu(v: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_triu`: the full symmetric [..., n, n] matrices."""
    up, lo = _triu_index(n, v.device)
    full = torch.empty(*v.shape[:-1], n * n, dtype=v.dtype, device=v.device)
    full.index_copy_(-1, up, v)
    full.index_copy_(-1, lo, v)
    return full.reshape(*v.shape[:-1], n, n)


def _slot_numel(shape, sym: bool) -> int:
    """Elements a slot takes in a flat buffer: symmetric [..., n, n] slots go as upper triangles."""
    if sym:
        return math.prod(shape[:-2]) * (shape[-1] * (shape[-1] + 1) // 2)
    return math.prod(shape)


def factor_slot(b, which: str) -> Tuple[Tuple[int, ...], bool]:
    """(shape, symmetric) of block ``b``'s factor ``which`` ("A" or "G") as the engine computes
    it: [n, n], [num_stack, n, n] for a stacked block, or a vector [n] for a diagonal side."""
    n = b.in_dim if which == "A" else b.out_dim
    if b.is_diagonal(which):
        return (n,), False
    return ((b.num_stack, n, n) if b.stacked else (n, n)), True


def _nbytes(numel: int, dtype) -> int:
    return numel * torch.empty((), dtype=dtype).element_size()


class CommStats:
    """Payload bytes and collective calls issued by this rank, per phase ("factor", "inverse",
    "precondition", "checkpoint", "setup")."""

    def __init__(self):
        self.bytes: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)

    def add(self, kind: str, t: torch.Tensor) -> None:
        self.bytes[kind] += t.numel() * t.element_size()
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


# ============================================================================ flat buffers
class _Bucket:
    """One flat buffer of one dtype: tensor slots (``sym`` ones as upper triangles) followed by a
    region of scalars written from the host."""

    def __init__(self, dtype, device, slots, scalars=()):
        self.dtype, self.device = dtype, device
        self.slots = []           # (key, shape, sym, offset, numel)
        off = 0
        for key, shape, sym in slots:
            numel = _slot_numel(shape, sym)
            self.slots.append((key, tuple(shape), sym, off, numel))
            off += numel
        self.data_numel = off
        self.scalars = list(scalars)
        self.scalar_index = {k: off + i for i, k in enumerate(self.scalars)}
        self.numel = off + len(self.scalars)
        self._scalar_cache: Dict[tuple, torch.Tensor] = {}   # host scalars already on the device

    @property
    def nbytes(self) -> int:
        return _nbytes(self.numel, self.dtype)

    def pack(self, values: Dict[Any, Optional[torch.Tensor]],
             scalars: Sequence[float] = ()) -> torch.Tensor:
        flat = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        zeros = None
        stack, stack_start = [], None
        for key, shape, sym, off, numel in self.slots:
            seg = flat[off:off + numel]
            v = values.get(key)
            if not shape:        # 0-d slots (they come last) are stacked in one call
                if stack_start is None:
                    stack_start = off
                if v is None:
                    if zeros is None:
                        zeros = torch.zeros((), dtype=self.dtype, device=self.device)
                    v = zeros
                stack.append(v.to(self.dtype))
            elif v is None:
                seg.zero_()
            elif sym:      # [..., n, n] -> upper triangles, leading (stack) dims kept
                pack_triu(v.to(self.dtype), out=seg.view(*shape[:-2], -1))
            else:
                seg.view(shape).copy_(v)
        if stack:
            torch.stack(stack, out=flat[stack_start:stack_start + len(stack)])
        if self.scalars:   # the weights rarely change: keep each distinct set on the device
            key = tuple(scalars)
            dev = self._scalar_cache.get(key)
            if dev is None:
                if len(self._scalar_cache) >= 8:
                    self._scalar_cache.clear()
                host = torch.tensor(key, dtype=self.dtype)
                if self.device.type == "cuda":   # asynchronous upload, no host sync
                    dev = torch.empty_like(host, device=self.device)
                    dev.copy_(host.pin_memory(), non_blocking=True)
                else:
                    dev = host
                self._scalar_cache[key] = dev
            flat[self.data_numel:].copy_(dev)
        return flat

    def unpack(self, flat: torch.Tensor, divisors: Optional[Dict[Any, torch.Tensor]] = None
               ) -> Dict[Any, torch.Tensor]:
        out = {}
        for key, shape, sym, off, numel in self.slots:
            seg = flat[off:off + numel]
            if divisors is not None and key in divisors:
                seg.div_(divisors[key])
            out[key] = (unpack_triu(seg.view(*shape[:-2], -1), shape[-1]) if sym
                        else seg.view(shape))
        return out

    def scalar(self, flat: torch.Tensor, key) -> torch.Tensor:
        return flat[self.scalar_index[key]]


def _split_buckets(slots, cap_bytes: int, scalars_of=None) -> List[_Bucket]:
    """Consecutive slots ``(key, shape, sym, dtype, device)`` into buckets of one dtype/device and
    at most ``cap_bytes`` (a larger slot gets a bucket of its own). ``scalars_of(key)`` lists the
    host scalars a slot brings along."""
    out, cur, cur_key, cur_bytes = [], [], None, 0

    def close():
        if cur:
            sc = [s for key, *_ in cur for s in (scalars_of(key) if scalars_of else ())]
            out.append(_Bucket(cur_key[0], cur_key[1], [(k, sh, sy) for k, sh, sy, *_ in cur], sc))

    for key, shape, sym, dtype, device in slots:
        numel = _slot_numel(shape, sym)
        nb = _nbytes(numel, dtype)
        bk = (dtype, torch.device(device))
        if cur and (bk != cur_key or cur_bytes + nb > cap_bytes):
            close()
            cur, cur_bytes = [], 0
        cur_key = bk
        cur.append((key, shape, sym, dtype, device))
        cur_bytes += nb
    close()
    return out


class _Pending:
    """Launched reductions of one kind (A or G) of the current step."""

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


# ============================================================================ strategy
class DistributedKFAC(LocalComm):
    """The torch.distributed communication strategy of one
    :class:`kfac_kernels.engine.KFACEngine` (see the module docstring; the interface is
    :class:`kfac_kernels.comm.LocalComm`'s). Created by the engine from the optimiser's options;
    everything else it needs is passed in at the call points."""

    #: preconditioning broadcasts directions (grad_worker_fraction < 1), so ``opt.compile()``
    #: compiles only the local part
    precondition_collectives = True

    def __init__(self, blocks, options, kind, opts: DistributedOptions, group):
        self.options = options     # the optimiser's Options (agreement, seed, loss_reduction)
        self.kind = kind
        self.opts = opts
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.global_ranks = list(dist.get_process_group_ranks(group))
        self.backend = str(dist.get_backend(group))
        self.comm = CommStats()
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
        self.cap = max(1, int(opts.bucket_cap_mb * _MB))

        # --- the grid and the static assignment of decompositions
        self.k, self.m = worker_grid(self.world, opts.grad_worker_fraction)
        self.row, self.col = divmod(self.rank, self.m)
        self.units = assign(blocks, self.k, self.world, opts.assignment)
        self.owner_col = {}                    # block -> column that holds its decomposition
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
        sum_g = options.loss_reduction == "sum"
        self.g_divided = not sum_g
        self.a_buckets = _split_buckets(
            [((b, "A"), *factor_slot(b, "A"), b.factor_dtype, self.device) for b in blocks],
            self.cap, lambda key: [("w", key[0])])
        self.g_buckets = _split_buckets(
            [((b, "G"), *factor_slot(b, "G"), b.factor_dtype, self.device) for b in blocks],
            self.cap, lambda key: [("w", key[0]), ("p", key[0])])
        # EKFAC's scalings (grad_worker_fraction 1 only): reduced like G, one [out, in] per block
        self.s_buckets = (_split_buckets(
            [((b, "S"), tuple(b.shape), False, b.factor_dtype, self.device) for b in blocks],
            self.cap, lambda key: [("w", key[0]), ("p", key[0])])
            if "S" in kind.extra_entries() else [])
        self._a: Optional[_Pending] = None
        self._g: Optional[_Pending] = None
        self._mismatch: List[Tuple[_Bucket, torch.Tensor]] = []
        self._decomposed: set = set()
        self._gathered: Optional[Tuple[int, Dict]] = None

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
        lines = self.options.agreement_lines()
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
        o = self.options
        seed = o.seed if o.seed is not None else int(
            torch.randint(0, 2 ** 62, (1,)).item()) if o.curvature == "fisher" else 0
        mine = torch.tensor([digest, len(self.blocks), seed], dtype=torch.int64,
                            device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        self.comm.add("setup", mine)
        dist.all_gather(everyone, mine, group=self.group)
        rows = [t.cpu().tolist() for t in everyone]
        if any(r[0] != rows[0][0] for r in rows):
            sigs: List[Any] = [None] * self.world
            dist.all_gather_object(sigs, sig, group=self.group)
            raise MismatchError(_describe_mismatch(sigs))
        self.base_seed = rows[0][2]

    # ------------------------------------------------------------------ factor phase
    def _reduce(self, buckets: List[_Bucket], values: Dict, weights: Dict, scale: bool,
                kind: str = "factor") -> _Pending:
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
            self.comm.add(kind, flat)
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
        buckets = _split_buckets(slots, self.cap, lambda key: [("w", key)])
        pending = []
        for bk in buckets:
            flat = bk.pack(values, [float(weight)] * len(bk.scalars))
            if weight != 1.0:
                flat[:bk.data_numel].mul_(float(weight))
            self.comm.add("factor", flat)
            pending.append((bk, flat, dist.all_reduce(flat, group=self.group, async_op=True)))
        out = {}
        for bk, flat, work in pending:
            work.wait()
            out.update(bk.unpack(flat, {key: bk.scalar(flat, ("w", key))
                                        for key, *_ in bk.slots}))
        return out

    def _input_counts(self):
        return tuple((len(b.inputs), b.A_ready is not None) for b in self.blocks)

    def _launch_a(self, a_statistics) -> Optional[_Pending]:
        captured = [b for b in self.blocks if b.captured()]
        if not captured:
            return None
        a_hats = a_statistics(captured)
        weights = {b: float(b.step_examples()) for b in captured}
        pend = self._reduce(self.a_buckets, {(b, "A"): a for b, a in a_hats.items()}, weights,
                            scale=True)
        pend.snapshot = self._input_counts()
        return pend

    def _launch_g(self, pending_passes: int) -> _Pending:
        ready = {b: b.G_hat for b in self.blocks if b.captured() and b.G_hat is not None}
        weights = {b: float(b.step_examples()) for b in ready}
        pend = self._reduce(self.g_buckets, {(b, "G"): g for b, g in ready.items()}, weights,
                            scale=self.g_divided)
        pend.snapshot = pending_passes
        return pend

    def backward_started(self, a_statistics) -> None:
        """First output-gradient of a capture step: the forward pass is over, reduce A now."""
        if self._a is None:
            self._a = self._launch_a(a_statistics)

    def curvature_started(self, a_statistics) -> None:
        if self._a is None:
            self._a = self._launch_a(a_statistics)

    def sampler(self, generator, device, step: int):
        """This rank's own draws, reproducible per step (:func:`sampling_seed`)."""
        if generator is None or generator.device != torch.device(device):
            generator = torch.Generator(device=device)
        generator.manual_seed(sampling_seed(self.base_seed, self.rank, step))
        return generator

    def curvature_finished(self, pending_passes: int) -> None:
        if self._g is not None:
            self._g.wait()
        self._g = self._launch_g(pending_passes)

    def agree(self, found: torch.Tensor) -> torch.Tensor:
        """Every rank takes the same skip decision (the running factors must stay identical):
        the found-inf flags are summed over the group (one number, no host sync)."""
        found = found.clone()
        dist.all_reduce(found, group=self.group)
        return found

    def clear(self) -> None:
        """The engine dropped this step's capture: forget reductions launched for it."""
        self._a = self._g = None

    def factor_statistics(self, captured, pending_passes: int, factors) -> "OrderedDict":
        """{block: (A, G)} averaged over ranks, for the blocks with statistics on this step
        (reductions launched during the backward pass are reused when nothing was captured
        since)."""
        a, g = self._a, self._g
        self._a = self._g = None
        if a is None or a.snapshot != self._input_counts():
            if a is not None:         # inputs captured after the launch (several forward passes)
                a.wait()
            a = self._launch_a(factors.a_statistics)
        if g is None or g.snapshot != pending_passes:
            if g is not None:
                g.wait()
            g = self._launch_g(pending_passes)
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

    def reduce_scalings(self, s_hats: "OrderedDict", counts: Dict) -> "OrderedDict":
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
        acc: Dict[_Bucket, torch.Tensor] = {}
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
    def has_inverse(self, b) -> bool:
        return b in self._decomposed

    def holds(self, b) -> bool:
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

    def _layout(self, units, source: int) -> List[_Bucket]:
        slots = []
        for b, whichs, owner in units:
            if owner == source:
                for key, shape, sym in self._entries(b, whichs):
                    slots.append(((b, key), shape, sym, b.factor_dtype, self.device))
        return _split_buckets(slots, self.cap)

    def _share(self, units, sources: List[int], group, kind: str) -> None:
        """Broadcast the entries of the units owned by each of ``sources`` (group-local ranks)."""
        pending = []
        for s in sources:
            for bk in self._layout(units, s):
                if s == self.rank:
                    flat = bk.pack({(b, key): b.inverse[key] for (b, key), *_ in bk.slots})
                else:
                    flat = torch.empty(bk.numel, dtype=bk.dtype, device=self.device)
                self.comm.add(kind, flat)
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
            b.inverse = {**b.inverse, **entries}

    def update_inverses(self, ready, decompose, inverse_updates: int) -> None:
        self._check_presence()
        ready_set = set(ready)
        units = [u for u in self.units if u[0] in ready_set]
        only = {(b, w) for b, whichs, owner in units if owner == self.rank for w in whichs}
        decompose(ready, only)
        self._check_entries([u for u in units if u[2] == self.rank])
        if self.k == self.world:
            self._share(units, list(range(self.world)), self.group, "inverse")
        elif self.k > 1:
            self._share(units, self.col_ranks, self.col_group, "inverse")
        self._decomposed |= ready_set
        for b in ready:
            if not self.holds(b):
                b.inverse = {}

    # ------------------------------------------------------------------ preconditioning
    def precondition(self, grads: Dict, local):
        if self.k == self.world:
            return local(grads)
        mine = {b: V for b, V in grads.items() if self.owner_col[b] == self.col}
        U, dots = local(mine)
        pending = []
        for s in self.row_ranks:
            col = s % self.m
            slots = []
            for b in self.blocks:
                if self.owner_col[b] == col and b in self._decomposed:
                    slots.append(((b, "U"), tuple(b.shape), False, b.weight.dtype, self.device))
            slots += [((b, "dot"), (), False, b.factor_dtype, self.device)
                      for (b, _), *_ in list(slots)]
            for bk in _split_buckets(slots, self.cap):
                if s == self.rank:
                    flat = bk.pack({(b, key): (U.get(b) if key == "U" else dots.get(b))
                                    for (b, key), *_ in bk.slots})
                else:
                    flat = torch.empty(bk.numel, dtype=bk.dtype, device=self.device)
                self.comm.add("precondition", flat)
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
                    self.comm.add("checkpoint", flat)
                    dist.send(flat, dst=self.global_ranks[to], group=self.group)
                elif self.rank == to:
                    flat = torch.empty(bk.numel, dtype=bk.dtype, device=self.device)
                    self.comm.add("checkpoint", flat)
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
                    f"with grad_worker_fraction={self.opts.grad_worker_fraction} this rank holds "
                    f"only its share of the decompositions: call opt.consolidate_state_dict(to="
                    f"{self.rank}) on every rank (after the last step), then opt.state_dict() on "
                    f"rank {self.rank}")
            for b in missing:
                sd["blocks"][b.name]["inverse"] = {k: v.clone() for k, v in got[1][b].items()}
        sd["distributed"] = {"base_seed": self.base_seed, "world_size": self.world,
                             "grad_worker_fraction": self.opts.grad_worker_fraction,
                             "assignment": self.opts.assignment}

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
                b.inverse = {}

    # ------------------------------------------------------------------ description
    def describe(self) -> str:
        mine = [u for u in self.units if u[2] == self.rank]
        cost = lambda u: _cost(u[0], u[1], 3)   # noqa: E731
        total = sum(cost(u) for u in self.units) or 1
        how = ("decompositions broadcast to every rank" if self.k == self.world else
               "each decomposition on one rank, preconditioned gradients broadcast"
               if self.k == 1 else f"decompositions on {self.k} ranks each, preconditioned "
               f"gradients broadcast to groups of {self.m}")
        return (f"distributed: {self.backend}, world {self.world}, rank {self.rank}; "
                f"grad_worker_fraction={self.opts.grad_worker_fraction} ({how}); assignment="
                f"{self.opts.assignment!r}: this rank decomposes {len(mine)} of {len(self.units)} "
                f"{'factors' if self.k == self.world else 'blocks'} "
                f"({100.0 * sum(cost(u) for u in mine) / total:.0f}% of the n^3 cost); factor "
                f"buckets: {len(self.a_buckets)} A + {len(self.g_buckets)} G "
                f"({sum(b.nbytes for b in self.a_buckets + self.g_buckets) / _MB:.2f} MB)")


def assign(blocks, k: int, world: int, assignment: str) -> List[Tuple[Any, Tuple[str, ...], int]]:
    """[(block, factors, owner rank)]: one unit per factor when every rank holds every
    decomposition (k == world), one per block below it; owners by ``assignment``."""
    units = []
    for b in blocks:
        if k < world:
            units.append((b, ("A", "G")))
        else:
            units += [(b, ("A",)), (b, ("G",))]
    if assignment == "round_robin":
        owners = [i % world for i in range(len(units))]
    else:
        p = 3 if assignment == "compute" else 2
        owners = greedy_assignment([_cost(b, whichs, p) for b, whichs in units], world)
    return [(b, w, o) for (b, w), o in zip(units, owners)]


def _cost(b, whichs, p: int) -> float:
    """Cost model of decomposing ``whichs`` of block ``b``: n^p per matrix (p = 3: compute,
    2: memory), times the stack of a stacked block; a diagonal side costs n (nothing to
    decompose)."""
    total = 0.0
    for w in whichs:
        n = b.in_dim if w == "A" else b.out_dim
        total += float(n) if b.is_diagonal(w) else float(b.num_stack) * float(n) ** p
    return total


def _describe_mismatch(sigs: List[List[str]]) -> str:
    ref = sigs[0]
    for r, sig in enumerate(sigs[1:], start=1):
        if sig == ref:
            continue
        for i in range(max(len(ref), len(sig))):
            a = ref[i] if i < len(ref) else "<nothing>"
            b = sig[i] if i < len(sig) else "<nothing>"
            if a != b:
                return (f"the ranks built different K-FAC optimisers (every rank must wrap the same "
                        f"model with the same options): rank 0 has {a!r}, rank {r} has {b!r}"
                        + (f" (rank 0: {_n_blocks(ref)} blocks, rank {r}: {_n_blocks(sig)})"
                           if len(ref) != len(sig) else ""))
    return "the ranks built different K-FAC optimisers"


def _n_blocks(sig: List[str]) -> int:
    return sum(line.startswith("block ") for line in sig)

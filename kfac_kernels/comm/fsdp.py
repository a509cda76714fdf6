"""K-FAC on FSDP2 (``torch.distributed.fsdp.fully_shard``) and HSDP: :class:`FSDPKFAC`.

FSDP2 stores every parameter it manages as a DTensor sharded on dim 0 over the mesh's shard
dimension (HSDP: replicated over a second, "replicate" dimension), and its gradients likewise.
For the forward and backward passes it all-gathers each module's parameters, so the capture's
hooks see this rank's whole local batch: the layer inputs and output-gradients are plain tensors
of the local examples, exactly as under DDP. What changes is only where the parameters live.

The scheme (docs/distributed.md, "FSDP2 and HSDP"):

* **Factors**: reduced over every data-parallel rank exactly as :class:`DistributedKFAC` does
  (this class subclasses it): A and G are example-weighted averages over the whole mesh.
* **Inverses**: ``grad_worker_fraction=1`` (KAISA's communication-optimal end): every rank
  decomposes its share of the factors and every rank receives all decompositions.
* **Gradients** (every step): the block gradients are sharded by rows of ``weight`` and
  ``bias``. :meth:`FSDPKFAC.full_tensors` all-gathers them (and the parameter values, for weight
  decay) over each mesh's shard dimension, bucketed in flat buffers (one collective per bucket,
  padded FSDP2-style to equal chunks per rank), so every rank holds each block's full gradient
  matrix. Preconditioning then runs on full matrices, identically on every rank (the same
  inputs and the same decompositions), and :meth:`FSDPKFAC.local_part` cuts each direction to
  the rows of this rank's shard, as a DTensor shaped like the parameter: the optimiser's
  update, momentum buffers included, stays sharded.
* **Fallback parameters** (no block) take the plain first-order rule on their DTensors.
* **Checkpoints**: the K-FAC state (factors, decompositions) is replicated; the momentum buffers
  are sharded, so ``opt.consolidate_state_dict(to=r)`` (collective) gathers them for rank r,
  whose ``opt.state_dict()`` is then complete (full tensors) and loads on any rank.

Refused at construction, naming the alternative: DTensor parameters outside a ``fully_shard``
module or sharded on a dim other than 0, or over more than one mesh dimension (tensor
parallelism); ``grad_worker_fraction < 1``; the adaptive options; the FSDP1
``FullyShardedDataParallel`` wrapper.

Nothing here is imported unless the model holds DTensor parameters (``import kfac_kernels``
does not import ``torch.distributed.fsdp``).
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from typing import (TYPE_CHECKING, Any, Collection, Dict, List, Mapping, Optional, Sequence, Set,
                    Tuple, cast)

import torch
import torch.distributed as dist
import torch.nn as nn

from .base import CommStats, DistributedOptions, StrategyOptions
from .buckets import MB
from .ddp import DistributedKFAC

if TYPE_CHECKING:
    from ..blocks import Block
    from ..inverses.base import InverseKind

__all__ = ["FSDPKFAC", "is_dtensor", "has_dtensors", "refuse_fsdp1"]


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (without importing torch.distributed.tensor)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def has_dtensors(params) -> bool:
    return "torch.distributed.tensor" in sys.modules and any(is_dtensor(p) for p in params)


def refuse_fsdp1(model) -> None:
    """Raise for a model wrapped by (or holding) the FSDP1 ``FullyShardedDataParallel``: its
    flat parameters hide the layers' weights from K-FAC."""
    if "torch.distributed.fsdp" not in sys.modules:
        return
    from torch.distributed.fsdp import FullyShardedDataParallel
    for name, m in model.named_modules():
        if isinstance(m, FullyShardedDataParallel):
            raise TypeError(
                f"K-FAC does not support the FSDP1 wrapper FullyShardedDataParallel (module "
                f"{name or '<model>'!r}): it flattens the layers' parameters into one "
                f"FlatParameter. Shard the model with FSDP2 instead: "
                f"torch.distributed.fsdp.fully_shard(layer) on each layer and on the root, then "
                f"build kk.KFAC on it (docs/distributed.md, 'FSDP2 and HSDP')")


class ShardLayout:
    """Where one DTensor parameter lives: its mesh, the mesh dimension it is sharded over (None:
    replicated everywhere), the group and size of that dimension, and this rank's rows."""

    def __init__(self, name: str, p):
        from torch.distributed.tensor import Replicate, Shard
        self.name = name
        self.mesh = p.device_mesh
        self.placements = tuple(p.placements)
        self.shape = tuple(p.shape)
        self.stride = tuple(p.stride())
        shard_dims = []
        for i, pl in enumerate(self.placements):
            if type(pl) is Shard and pl.dim == 0:
                shard_dims.append(i)
            elif type(pl) is not Replicate:
                raise NotImplementedError(
                    f"parameter {name!r} is a DTensor placed as {list(self.placements)} on mesh "
                    f"{self.mesh}: K-FAC supports DTensors sharded on dim 0 over one mesh "
                    f"dimension (FSDP2's fully_shard, HSDP) and replicated over the others; "
                    f"tensor parallelism (sharding on another dim, or over two mesh dimensions) "
                    f"is not supported. Use fully_shard alone (data parallelism), or DDP")
        if len(shard_dims) > 1:
            raise NotImplementedError(
                f"parameter {name!r} is sharded over mesh dimensions {shard_dims} of {self.mesh} "
                f"({list(self.placements)}): K-FAC supports one shard dimension (FSDP2, HSDP); "
                f"FSDP combined with tensor parallelism is not supported")
        # a shard dimension of size 1 holds everything: nothing to gather
        self.dim = shard_dims[0] if shard_dims and self.mesh.size(shard_dims[0]) > 1 else None
        n = self.shape[0] if self.shape else 1
        if self.dim is None:
            self.world, self.coord, self.group = 1, 0, None
        else:
            self.world = self.mesh.size(self.dim)
            self.coord = self.mesh.get_local_rank(self.dim)
            self.group = self.mesh.get_group(self.dim)
        # FSDP2 / DTensor chunking: ceil(n / S) rows per rank, the last ones short or empty
        self.chunk = -(-n // self.world)
        self.offset = min(n, self.coord * self.chunk)
        self.rows = min(n, self.offset + self.chunk) - self.offset
        self.rest = 1
        for s in self.shape[1:]:
            self.rest *= s
        # check the chunked layout against DTensor's own (private helper: the public local
        # shape is checked where it is missing)
        try:
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
            local_shape, offset = compute_local_shape_and_global_offset(
                p.shape, self.mesh, list(self.placements))
            local_shape, offset = tuple(local_shape)[:1], tuple(offset)[:1]
        except ImportError:   # pragma: no cover - other torch versions
            local_shape, offset = tuple(p.to_local().shape)[:1], (self.offset,)
        if self.shape and (local_shape != (self.rows,) or offset != (self.offset,)):
            raise NotImplementedError(
                f"parameter {name!r}: this rank holds rows {offset} + {local_shape} of its "
                f"DTensor, not the chunked layout ({self.offset} + {self.rows}) K-FAC's gradient "
                f"gather assumes")
        # the data-parallel ranks of the mesh (global ranks)
        self.mesh_ranks = tuple(sorted(int(r) for r in self.mesh.mesh.flatten().tolist()))

    def describe(self) -> str:
        pl = ", ".join(type(p).__name__ + (f"({p.dim})" if hasattr(p, "dim") else "")
                       for p in self.placements)
        return f"{tuple(self.mesh.mesh.shape)}[{pl}]"


class _Gather:
    """One flat all-gather over a shard group: slots of ``chunk * rest`` elements per rank (the
    local rows, zero-padded), so that rank s's chunk of every slot lands at row s."""

    def __init__(self, group, world: int, dtype, device, slots):
        self.group, self.world, self.dtype, self.device = group, world, dtype, device
        self.slots = []             # (key, layout, offset, numel per rank)
        off = 0
        for key, lay in slots:
            numel = lay.chunk * lay.rest
            self.slots.append((key, lay, off, numel))
            off += numel
        self.numel = off

    def launch(self, locals_: Dict[Any, torch.Tensor], stats: CommStats
               ) -> Tuple[torch.Tensor, Any]:
        flat = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        for key, lay, off, numel in self.slots:
            t = locals_[key]
            if t.numel():
                flat[off:off + t.numel()].copy_(t.reshape(-1))
        out = torch.empty(self.world * self.numel, dtype=self.dtype, device=self.device)
        stats.add("gradient", flat)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return out, gather(out, flat, group=self.group, async_op=True)

    def unpack(self, out: torch.Tensor) -> Dict[Any, torch.Tensor]:
        rows = out.view(self.world, self.numel)
        full = {}
        for key, lay, off, numel in self.slots:
            seg = rows[:, off:off + numel].reshape(self.world * lay.chunk, lay.rest)
            full[key] = seg[:lay.shape[0] if lay.shape else 1].reshape(lay.shape)
        return full


class FSDPKFAC(DistributedKFAC):
    """The communication strategy for models sharded with FSDP2's ``fully_shard`` (or HSDP):
    DDP's factor reduction and decomposition sharing (``grad_worker_fraction=1``), plus the
    gather of sharded block gradients and the cut of the directions back to the local shards
    (see the module docstring). Blocks whose parameters are plain tensors (modules left
    unsharded) take the DDP path unchanged."""

    #: the curvature passes of "fisher"/"ggn" differentiate with respect to the parameters the
    #: forward pass used: FSDP2's unsharded ones, recorded by a forward pre-hook
    records_used_weights = True

    def __init__(self, blocks: List[Block], opts: StrategyOptions, kind: InverseKind,
                 dist_opts: DistributedOptions, group: Any, *, model: nn.Module,
                 params: Sequence[torch.Tensor] = (), names: Optional[Dict[int, str]] = None):
        names = names or {}
        if getattr(opts, "adaptive_lr", False) or getattr(opts, "adaptive_momentum", False) \
                or getattr(opts, "adaptive_damping", False):
            raise NotImplementedError(
                "the adaptive options (adaptive_lr / adaptive_momentum / adaptive_damping) are "
                "not supported on a fully_shard model (their quadratic model differentiates "
                "through the sharded parameters); use a fixed lr with kl_clip, or DDP")
        self.layouts: Dict[int, ShardLayout] = {}
        seen = set()
        for b in blocks:
            for i, p in enumerate(b.params):
                if is_dtensor(p):
                    name = f"{b.name}.{'weight' if i == 0 else 'bias'}"
                    self.layouts[id(p)] = ShardLayout(name, p)
                seen.add(id(p))
        for p in params:
            if id(p) not in seen and is_dtensor(p):
                self.layouts[id(p)] = ShardLayout(names.get(id(p), f"param {tuple(p.shape)}"), p)
        self.sharded_blocks = [b for b in blocks if any(id(p) in self.layouts for p in b.params)]
        self._sharded_set = set(self.sharded_blocks)
        _check_fsdp_managed(model, blocks, self.layouts)
        for b in self.sharded_blocks:
            plain = [p for p in b.params if id(p) not in self.layouts]
            if plain:
                raise NotImplementedError(
                    f"block {b.name!r} holds both DTensor and plain parameters; shard the whole "
                    f"module with fully_shard")
        group_ranks = tuple(sorted(dist.get_process_group_ranks(group)))
        for lay in self.layouts.values():
            if lay.mesh_ranks != group_ranks:
                raise ValueError(
                    f"parameter {lay.name!r} lives on a device mesh over ranks "
                    f"{list(lay.mesh_ranks)}, but K-FAC reduces its factors over the process "
                    f"group of ranks {list(group_ranks)}: every data-parallel rank of the mesh "
                    f"must take part; pass process_group= a group over the mesh's ranks")
        self._gathers: Dict[tuple, List[_Gather]] = {}
        self._full_state: Optional[Tuple[int, int, Dict]] = None
        super().__init__(blocks, opts, kind, dist_opts, group)

    # ------------------------------------------------------------------ set-up
    def _signature(self) -> List[str]:
        lines = super()._signature()
        for lay in self.layouts.values():
            lines.append(f"dtensor {lay.name!r}: {lay.shape} on mesh {lay.describe()}")
        return lines

    def _agree(self) -> None:
        super()._agree()       # every rank raises alike below, after agreeing on the options
        if self.dist_opts.grad_worker_fraction != 1.0:
            raise NotImplementedError(
                f"grad_worker_fraction={self.dist_opts.grad_worker_fraction} is not supported on a "
                f"fully_shard model: there every rank all-gathers the block gradients and "
                f"preconditions them with every decomposition (grad_worker_fraction=1, KAISA's "
                f"communication-optimal setting). Use grad_worker_fraction=1, or DDP to split "
                f"the decompositions among ranks")

    # ------------------------------------------------------------------ gradients
    def full_tensors(self, blocks: Sequence[Block], values_for: Collection[Block]
                     ) -> Dict[Block, Tuple[List[Optional[torch.Tensor]],
                                            Optional[List[torch.Tensor]]]]:
        """{block: (grads, values)}: full tensors, in ``block.params`` order, of the sharded
        blocks among ``blocks`` (``values`` only for the blocks in ``values_for``, else None);
        one bucketed all-gather per shard group and dtype. Blocks left out read their own
        (plain) parameters."""
        keys = []
        local: Dict[Any, torch.Tensor] = {}
        for b in blocks:
            if b not in self._sharded_set or b.weight.grad is None:
                continue
            for p in b.params:
                if p.grad is not None:
                    keys.append((id(p), "grad"))
                    local[(id(p), "grad")] = _local(p.grad, self.layouts[id(p)])
                if b in values_for:
                    keys.append((id(p), "value"))
                    local[(id(p), "value")] = _local(p.detach(), self.layouts[id(p)])
        if not keys:
            return {}
        sig = tuple(keys)
        gathers = self._gathers.get(sig)
        if gathers is None:
            if len(self._gathers) >= 16:
                self._gathers.clear()
            gathers = self._gathers[sig] = self._gather_buckets(keys, local)
        pending = [(g, *g.launch(local, self.stats)) for g in gathers]
        full: Dict[Any, torch.Tensor] = {k: local[k] for k in keys
                                         if self.layouts[k[0]].dim is None}
        for g, out, work in pending:
            work.wait()
            full.update(g.unpack(out))
        res = {}
        for b in blocks:
            if b not in self._sharded_set or b.weight.grad is None:
                continue
            grads = [full.get((id(p), "grad")) for p in b.params]
            values = ([full[(id(p), "value")] for p in b.params] if b in values_for else None)
            res[b] = (grads, values)
        return res

    def _gather_buckets(self, keys, local) -> List[_Gather]:
        """Buckets of at most bucket_cap_mb per rank, one shard group and dtype each, in block
        order (every rank builds the same plan from the same keys)."""
        groups: "OrderedDict[tuple, List]" = OrderedDict()
        for key in keys:
            lay = self.layouts[key[0]]
            if lay.dim is None:
                continue
            t = local[key]
            gk = (id(lay.group), lay.world, t.dtype, t.device)
            groups.setdefault(gk, [lay.group]).append((key, lay))
        plans = []
        for (_, world, dtype, device), items in groups.items():
            grp, slots = items[0], items[1:]
            cur: List[Tuple[Any, ShardLayout]] = []
            cur_bytes = 0
            esize = torch.empty((), dtype=dtype).element_size()
            for key, lay in slots:
                nb = lay.chunk * lay.rest * esize
                if cur and cur_bytes + nb > self.cap:
                    plans.append(_Gather(grp, world, dtype, device, cur))
                    cur, cur_bytes = [], 0
                cur.append((key, lay))
                cur_bytes += nb
            if cur:
                plans.append(_Gather(grp, world, dtype, device, cur))
        return plans

    def local_part(self, p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``full`` (a tensor of parameter ``p``'s global shape), as a
        DTensor placed like ``p``; ``full`` itself for a plain parameter."""
        lay = self.layouts.get(id(p))
        if lay is None:
            return full
        from torch.distributed.tensor import DTensor
        local = full if lay.dim is None else full.narrow(0, lay.offset, lay.rows)
        return DTensor.from_local(local.contiguous(), lay.mesh, lay.placements, run_check=False,
                                  shape=torch.Size(lay.shape), stride=lay.stride)

    # ------------------------------------------------------------------ optimiser state
    def consolidate_optimizer_state(self, params: Sequence[torch.Tensor],
                                    state: Mapping[torch.Tensor, Dict[str, Any]], to: int,
                                    steps: int) -> None:
        """Collective: full tensors of the sharded optimiser state (momentum buffers), for rank
        ``to`` of the group."""
        if not 0 <= to < self.world:
            raise ValueError(f"to={to} is not a rank of the process group (size {self.world})")
        full = {}
        for i, p in enumerate(params):
            st = state.get(p, {})
            for k in sorted(st):
                v = st[k]
                if is_dtensor(v):
                    t = v.full_tensor()
                    self.stats.add("checkpoint", t)
                    if self.rank == to:
                        full[(i, k)] = t
        self._full_state = (to, steps, full) if self.rank == to else None

    def fill_optimizer_state(self, sd_state: dict, steps: int) -> dict:
        """``sd_state`` (torch's ``state_dict()["state"]``) with the DTensor entries replaced by
        the full tensors gathered by :meth:`consolidate_optimizer_state`."""
        out = {}
        got = self._full_state
        for i, st in sd_state.items():
            new = {}
            for k, v in st.items():
                if is_dtensor(v):
                    if got is None or got[1] != steps or (i, k) not in got[2]:
                        raise RuntimeError(
                            "on a fully_shard model each rank holds only its shard of the "
                            "momentum buffers: call opt.consolidate_state_dict(to=r) on every "
                            f"rank (after the last step), then opt.state_dict() on rank r "
                            f"(this is rank {self.rank})")
                    v = got[2][(i, k)].clone()
                new[k] = v
            out[i] = new
        return out

    def load_optimizer_state(self, params: Sequence[torch.Tensor],
                             state: Mapping[torch.Tensor, Dict[str, Any]]) -> None:
        """After torch's ``load_state_dict``: full tensors of a sharded parameter's shape become
        this rank's shard (no communication: every rank loaded the same file)."""
        for p in params:
            if id(p) not in self.layouts or p not in state:
                continue
            st = state[p]
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and not is_dtensor(v) and tuple(v.shape) == \
                        self.layouts[id(p)].shape:
                    st[k] = self.local_part(p, v.to(device=self.device))

    # ------------------------------------------------------------------ state, description
    def fill_state_dict(self, sd: dict, inverse_updates: int) -> None:
        super().fill_state_dict(sd, inverse_updates)
        sd["distributed"]["fsdp"] = True

    def describe(self) -> str:
        meshes = sorted({lay.describe() for lay in self.layouts.values()})
        per_step = sum(self.layouts[id(p)].chunk * self.layouts[id(p)].rest * p.element_size()
                       for b in self.sharded_blocks for p in b.params
                       if self.layouts[id(p)].dim is not None)
        size = (f"{per_step / MB:.2f} MB" if per_step >= MB else f"{per_step / 1024:.1f} KiB")
        return (super().describe() + f"\nfsdp: {len(self.sharded_blocks)} of {len(self.blocks)} "
                f"blocks sharded (meshes {', '.join(meshes) or 'none'}); every step each rank "
                f"all-gathers their gradients ({size} from this rank, twice that with weight "
                f"decay: the parameter values too), preconditions whole matrices and keeps its "
                f"own rows")


def _local(t, lay: ShardLayout) -> torch.Tensor:
    """The local tensor of a DTensor gradient or parameter laid out like ``lay``."""
    if tuple(t.placements) != lay.placements:
        raise RuntimeError(f"{lay.name!r}: its gradient is placed as {list(t.placements)}, its "
                           f"parameter as {list(lay.placements)}; K-FAC expects FSDP2's "
                           f"reduce-scattered gradients (placed like the parameter)")
    return t.to_local()


def _check_fsdp_managed(model, blocks, layouts) -> None:
    """DTensor parameters of blocks must belong to a module that fully_shard manages (a DTensor
    elsewhere means tensor parallelism or hand-made DTensors)."""
    if not layouts:
        return
    from torch.distributed.fsdp import FSDPModule
    inside: Set[int] = set()
    for m in model.modules():
        if isinstance(m, FSDPModule):
            inside.update(id(x) for x in cast(nn.Module, m).modules())
    for b in blocks:
        if id(b.weight) in layouts and id(b.module) not in inside:
            raise NotImplementedError(
                f"block {b.name!r}: its weight is a DTensor but no fully_shard module manages "
                f"it (tensor parallelism, or DTensors made by hand); K-FAC supports DTensor "
                f"parameters from FSDP2's fully_shard only. Use fully_shard (data parallelism), "
                f"or DDP")

"""Code that runs inside the gloo ranks of tests/distributed/test_fsdp.py (see dist_harness.py).

Every rank builds the same float64 model from the same seed, shards it with FSDP2's
``fully_shard`` (per layer and/or at the root, or on a 2-D HSDP mesh) and takes its contiguous
shard of a global batch; the single-process reference (``distributed=False``, a plain model) runs
on the whole batch inside each rank, so a rank compares itself with it directly.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import kfac_kernels as kk
from dist_scenarios import _opt_kwargs, _rel, global_batch, make_model, shard

# per model: which modules get their own fully_shard (the root may get one too)
LAYERS = {"mlp": ["0", "3", "5"], "mixed": ["conv", "gn", "emb", "fc", "ln", "out"]}


def _mesh(cfg, world):
    if cfg.get("hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        return init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard"))
    return None


def sharded_model(cfg, world, seed=0):
    """The model of ``cfg`` sharded as ``cfg["shard"]`` says: "layers+root" (every block module,
    then the root), "root" (the root only), "layers" (some layers only: the rest stays plain)."""
    kind = cfg.get("model", "mixed")
    model = make_model(width=cfg.get("width", 7), seed=seed, kind=kind)
    how = cfg.get("shard", "layers+root")
    mesh = _mesh(cfg, world)
    kw = {} if mesh is None else {"mesh": mesh}
    mods = dict(model.named_modules())
    if how in ("layers+root", "layers"):
        names = LAYERS[kind] if how == "layers+root" else cfg.get("sharded", ["fc", "out"])
        for n in names:
            fully_shard(mods[n], **kw)
    if how in ("layers+root", "root"):
        fully_shard(model, **kw)
    return model


def _build(model, cfg, distributed=None):
    kw = _opt_kwargs(cfg)
    if cfg.get("wd") is not None:
        kw["weight_decay"] = cfg["wd"]
    if cfg.get("kind", "kfac") == "kfac":
        return kk.KFAC(model, distributed=distributed, **kw), None
    kl = kw.pop("kl_clip")
    pre = kk.KFACPreconditioner(model, kl_clip=kl, lr=0.05, distributed=distributed, **kw)
    return pre, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)


def _full(p):
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def _train(model, opt, base, cfg, steps, sizes, rank, start=0):
    """``rank=None``: the single process on the concatenated batch. Plain (unsharded) parameters
    of a sharded model get their gradients averaged by hand (FSDP2 reduces only its own)."""
    red = cfg.get("red", "mean")
    plain = ([] if rank is None else
             [p for p in model.parameters() if not isinstance(p, DTensor)])
    for s in range(start, start + steps):
        x, y = global_batch(s, sum(sizes))
        if rank is not None:
            x, y = shard(x, sizes, rank), shard(y, sizes, rank)
        (base or opt).zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y, reduction=red), out)
        for p in plain:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(len(sizes))
        opt.step()
        if base is not None:
            base.step()


def equivalence(rank, world, configs):
    """For each config: parameters (full_tensor) and factors after k steps vs the single process
    on the concatenated batch; the data for the cross-rank comparison."""
    out = {}
    for cfg in configs:
        sizes = [cfg.get("per_rank", 4)] * world
        steps = cfg.get("steps", 3)
        model = sharded_model(cfg, world)
        opt, base = _build(model, cfg)
        strategy = type(opt.engine.comm).__name__
        _train(model, opt, base, cfg, steps, sizes, rank)
        ref_model = make_model(width=cfg.get("width", 7), kind=cfg.get("model", "mixed"))
        ref, ref_base = _build(ref_model, cfg, False)
        _train(ref_model, ref, ref_base, cfg, steps, sizes, None)
        params = [_full(p) for p in model.parameters()]
        err = max(_rel(p, q.detach()) for p, q in zip(params, ref_model.parameters()))
        ferr = max(max(_rel(b.A, ref.blocks[n].A), _rel(b.G, ref.blocks[n].G))
                   for n, b in opt.blocks.items())
        init = make_model(width=cfg.get("width", 7), kind=cfg.get("model", "mixed"))
        moved = _rel(torch.cat([p.flatten() for p in params]),
                     torch.cat([q.detach().flatten() for q in init.parameters()]))
        local = {n: p.to_local().clone() for n, p in model.named_parameters()
                 if isinstance(p, DTensor)}
        momentum = {}
        if base is None:
            for n, p in model.named_parameters():
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    momentum[n] = type(buf).__name__
        out[cfg["name"]] = dict(
            err=err, factor_err=ferr, moved=moved, strategy=strategy, params=params,
            factors=[(b.A.clone(), b.G.clone()) for b in opt.blocks.values()],
            local=local, momentum=momentum, describe=opt.describe(),
            comm=dict(opt.engine.dist.stats.bytes),
            dtensors=sum(isinstance(p, DTensor) for p in model.parameters()),
            coord=None if not cfg.get("hsdp") else (rank // 2, rank % 2))
    return out


def fisher_matches_ddp(rank, world, cfg):
    """curvature="fisher" draws per rank (sampling_seed): the FSDP2 run equals the DDP-style run
    of the same data and seeds (plain model, gradients all-reduced by hand)."""
    sizes = [4] * world
    model = sharded_model(cfg, world)
    opt, _ = _build(model, cfg)
    _train(model, opt, None, cfg, 3, sizes, rank)
    plain = make_model(width=7, kind=cfg.get("model", "mixed"))
    opt2, _ = _build(plain, cfg)
    assert type(opt2.engine.comm).__name__ == "DistributedKFAC"
    for s in range(3):
        x, y = global_batch(s, sum(sizes))
        x, y = shard(x, sizes, rank), shard(y, sizes, rank)
        opt2.zero_grad()
        out = plain(x)
        opt2.backward(F.cross_entropy(out, y), out)
        for p in plain.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        opt2.step()
    init = make_model(width=7, kind=cfg.get("model", "mixed"))
    full = [_full(p) for p in model.parameters()]
    return dict(err=max(_rel(p, q.detach()) for p, q in zip(full, plain.parameters())),
                moved=_rel(torch.cat([p.flatten() for p in full]),
                           torch.cat([q.detach().flatten() for q in init.parameters()])))


def nonfinite(rank, world):
    """Rank 1 sees a NaN on step 1: every rank skips that step (parameters, momentum and factors
    unchanged), counts it, and trains on afterwards."""
    cfg = dict(curvature="empirical", inverse="eigh", inv=1)
    model = sharded_model(cfg, world)
    opt, _ = _build(model, cfg)
    sizes = [4] * world
    before = None
    caught = []
    for s in range(3):
        x, y = global_batch(s, sum(sizes))
        x, y = shard(x, sizes, rank), shard(y, sizes, rank)
        if s == 1 and rank == 1:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        if s == 1:
            before = ([_full(p) for p in model.parameters()],
                      [(b.A.clone(), b.G.clone()) for b in opt.blocks.values()])
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.step()
            opt.engine.health.poll()
        caught += [str(m.message) for m in w]
        if s == 1:
            after = ([_full(p) for p in model.parameters()],
                     [(b.A.clone(), b.G.clone()) for b in opt.blocks.values()])
    unchanged = (all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
                 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                         for a, b in zip(before[1], after[1])))
    final = [_full(p) for p in model.parameters()]
    return dict(unchanged=unchanged, skipped=opt.skipped_steps,
                finite=all(bool(torch.isfinite(p).all()) for p in final),
                moved_after=any(not torch.equal(a, b) for a, b in zip(after[0], final)),
                warned=any("non-finite" in m for m in caught), params=final)


def checkpoint(rank, world, cfg, path):
    """6 steps straight vs 3 steps, a full checkpoint saved on rank 0 (the model through
    torch.distributed.checkpoint's full state dict, the optimiser after
    consolidate_state_dict), loaded on every rank into fresh sharded objects, 3 more steps."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)
    sizes = [4] * world
    straight = sharded_model(cfg, world)
    opt, base = _build(straight, cfg)
    _train(straight, opt, base, cfg, 6, sizes, rank)

    part = sharded_model(cfg, world)
    opt, base = _build(part, cfg)
    _train(part, opt, base, cfg, 3, sizes, rank)
    refused = None
    try:
        opt.state_dict()
    except RuntimeError as exc:
        refused = str(exc)
    msd = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        osd = opt.state_dict()
        assert not any(isinstance(v, DTensor) for st in osd["state"].values() for v in st.values())
        torch.save({"model": msd, "opt": osd}, path)
    dist.barrier()
    ckpt = torch.load(path, weights_only=False)
    resumed = sharded_model(cfg, world, seed=99)
    # (set_model_state_dict replaces the values of the dict it is given by DTensors: a copy)
    set_model_state_dict(resumed, dict(ckpt["model"]),
                         options=StateDictOptions(full_state_dict=True))
    opt2, base2 = _build(resumed, cfg)
    opt2.load_state_dict(ckpt["opt"])
    kinds = {type(v).__name__ for st in opt2.state.values() for v in st.values()}
    _train(resumed, opt2, base2, cfg, 3, sizes, rank, start=3)
    same = all(torch.equal(_full(a), _full(b))
               for a, b in zip(straight.parameters(), resumed.parameters()))
    # control: the same resume without the momentum buffers must differ (the test can fail)
    control = sharded_model(cfg, world, seed=97)
    set_model_state_dict(control, dict(ckpt["model"]),
                         options=StateDictOptions(full_state_dict=True))
    opt3, base3 = _build(control, cfg)
    opt3.load_state_dict({**ckpt["opt"], "state": {}})
    _train(control, opt3, base3, cfg, 3, sizes, rank, start=3)
    control_same = all(torch.equal(_full(a), _full(b))
                       for a, b in zip(straight.parameters(), control.parameters()))
    # the checkpoint is complete: one process (a plain model) loads it and trains on
    single = make_model(width=7, seed=98, kind=cfg.get("model", "mixed"))
    single.load_state_dict(ckpt["model"])
    opt1, base1 = _build(single, cfg, False)
    opt1.load_state_dict(ckpt["opt"])
    before = [p.detach().clone() for p in single.parameters()]
    _train(single, opt1, base1, cfg, 1, sizes, None, start=3)
    single_moved = any(not torch.equal(a, b.detach()) for a, b in zip(before, single.parameters()))
    return dict(same=same, control_same=control_same, refused=refused,
                state_kinds=sorted(kinds), single_moved=single_moved,
                params=[_full(p) for p in resumed.parameters()])


# ---------------------------------------------------------------------------- refusals
def _expect(fn):
    try:
        fn()
    except Exception as exc:   # reported to the test
        return (type(exc).__name__, str(exc))
    return ("no error", "")


def refusals(rank, world):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    out = {}
    cfg = dict(curvature="empirical", inverse="eigh")
    out["fraction"] = _expect(lambda: kk.KFAC(sharded_model(cfg, world), lr=0.1,
                                              grad_worker_fraction=0.5))
    out["adaptive"] = _expect(lambda: kk.KFAC(sharded_model(cfg, world), lr=0.1,
                                              adaptive_lr=True))
    out["local"] = _expect(lambda: kk.KFAC(sharded_model(cfg, world), lr=0.1,
                                           distributed=False))
    mesh = init_device_mesh("cpu", (world,))

    def tensor_parallel(dim):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
        m[0].weight = nn.Parameter(distribute_tensor(m[0].weight.detach(), mesh, [Shard(dim)]))
        return kk.KFAC(m, lr=0.1)
    out["tp-dim1"] = _expect(lambda: tensor_parallel(1))
    out["tp-dim0"] = _expect(lambda: tensor_parallel(0))
    out["fsdp1"] = _expect(_fsdp1)
    return out


def _fsdp1():
    from torch.distributed.fsdp import FullyShardedDataParallel
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = FullyShardedDataParallel(m, device_id=torch.device("cpu"))
    return kk.KFAC(wrapped, lr=0.1)


def mixed_precision(rank, world, curvature):
    """FSDP2's MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32): the layers run
    (and K-FAC captures) in bfloat16, the factors stay float32, and the run tracks the float32
    run of the same data to bfloat16 accuracy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    out = {}
    policies = {"fp32": None, "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                           reduce_dtype=torch.float32)}
    sizes = [8] * world
    for name, pol in policies.items():
        model = make_model(width=7, kind="mixed").float()
        kw = {} if pol is None else {"mp_policy": pol}
        for n in LAYERS["mixed"]:
            fully_shard(dict(model.named_modules())[n], **kw)
        fully_shard(model, **kw)
        seen = set()
        model.fc.register_forward_hook(lambda m, a, o: seen.add(str(a[0].dtype)))
        opt = kk.KFAC(model, lr=0.05, momentum=0.5, curvature=curvature,
                      likelihood="categorical", inverse_every=2, damping=1e-2)
        for s in range(6):
            x, y = global_batch(s, sum(sizes))
            x, y = shard(x, sizes, rank).float(), shard(y, sizes, rank)
            opt.zero_grad()
            o = model(x)
            opt.backward(F.cross_entropy(o.float(), y), o)
            opt.step()
        out[name] = dict(params=[_full(p) for p in model.parameters()], inputs=sorted(seen),
                         factors={str(b.A.dtype) for b in opt.blocks.values()}
                         | {str(b.G.dtype) for b in opt.blocks.values()},
                         params_dtype={str(p.dtype) for p in model.parameters()},
                         skipped=opt.skipped_steps)
    rel = max(_rel(a, b) for a, b in zip(out["bf16"]["params"], out["fp32"]["params"]))
    init = [p.float() for p in make_model(width=7, kind="mixed").parameters()]
    moved = max(_rel(a, b.detach()) for a, b in zip(out["fp32"]["params"], init))
    for d in out.values():
        d.pop("params")
    return dict(rel=rel, moved=moved, **out)


def mesh_subgroup(rank, world):
    """A model sharded over ranks 0 and 1 of 3: K-FAC over the default (3-rank) group raises;
    given a process group over the mesh's ranks it runs there (rank 2 stays out)."""
    from torch.distributed.tensor import DeviceMesh
    sub = dist.new_group([0, 1])
    if rank == 2:
        return None
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    fully_shard(m, mesh=DeviceMesh("cpu", [0, 1]))
    refused = _expect(lambda: kk.KFAC(m, lr=0.1))
    opt = kk.KFAC(m, lr=0.1, process_group=sub, curvature="empirical", inverse_every=1)
    for s in range(2):
        x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
        opt.zero_grad()
        F.cross_entropy(m(x), torch.arange(4) % 3).backward()
        opt.step()
    return dict(refused=refused, world=opt.engine.comm.world, updates=opt.engine.factor_updates)


def no_host_sync(rank, world, curvature):
    """A factor step between inverse updates of a sharded model reads no tensor on the host:
    the factor reduction, the gradient all-gather and the cut back to shards stay on device."""
    from helpers import host_sync_forbidden
    cfg = dict(curvature=curvature, inverse="eigh", inv=100, kl=1e-3, seed=3)
    model = sharded_model(cfg, world)
    opt, _ = _build(model, cfg)
    sizes = [4] * world
    for s in range(2):
        x, y = global_batch(s, sum(sizes))
        x, y = shard(x, sizes, rank), shard(y, sizes, rank)
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        with (host_sync_forbidden() if s == 1 else contextlib.nullcontext()):
            opt.step()
    return opt.engine.factor_updates


def foreign_probe(rank, world, curvature):
    """An input-gradient probe (torch.autograd.grad) on the sharded model between two K-FAC steps
    leaves parameters and factors bit-identical to the run without it."""
    cfg = dict(model="mlp", curvature=curvature, inverse="eigh", seed=0)
    sizes = [4] * world

    def run(probe):
        model = sharded_model(cfg, world)
        opt, _ = _build(model, cfg)
        for s in range(3):
            if probe and s == 1:
                x, y = global_batch(100, sum(sizes))
                x, y = shard(x, sizes, rank), shard(y, sizes, rank)
                # an input-gradient probe (FSDP2's sharded parameters are not in the graph,
                # and its resharded weights do not support a double backward)
                x = x.clone().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(model(x), y), x)
            _train(model, opt, None, cfg, 1, sizes, rank, start=s)
        out = [_full(p) for p in model.parameters()]
        out += [t.detach().clone() for b in opt.blocks.values() for t in (b.A, b.G)]
        opt.close()
        return out

    ref, got = run(False), run(True)
    return all(torch.equal(a, b) for a, b in zip(ref, got)) and len(ref) == len(got)

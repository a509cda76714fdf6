"""Code that runs inside the gloo ranks of tests/distributed/test_ddp.py (see dist_harness.py).

Every rank builds the same float64 model from the same seed and takes its contiguous shard of a
global batch; the single-process reference (``distributed=False``) runs on the whole batch inside
each rank, so a rank can compare itself with it directly.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import kfac_kernels as kk
from kfac_kernels.distributed import MismatchError, sampling_seed
from helpers import host_sync_forbidden

CLASSES = 4


def make_model(width=6, seed=0, kind="mlp"):
    torch.manual_seed(seed)
    if kind == "mixed":
        return MixedNet(width).double()
    if kind == "wide":     # with max_factor_dim=24: a diagonal A, a diagonal G, a diagonal A
        return nn.Sequential(nn.Flatten(), nn.Linear(32, width), nn.Tanh(),
                             nn.Linear(width, 30), nn.Tanh(), nn.Linear(30, CLASSES)).double()
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, width), nn.Tanh(),
                         nn.Linear(width, CLASSES)).double()


class MixedNet(nn.Module):
    """Every block family the distributed strategy must reduce and share: a grouped convolution
    and a GroupNorm (stacked blocks), an embedding (diagonal A) of tokens read off the input's
    signs (two slots of 4 bits: every token occurs, so the Linear after it sees full-rank
    inputs given enough examples), a LayerNorm (stacked 2x2 blocks) and plain Linears."""

    def __init__(self, width=6):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.emb = nn.Embedding(16, 3)
        self.fc = nn.Linear(4 * 16 + 2 * 3, width)
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, CLASSES)

    def forward(self, x):
        n = x.shape[0]
        bits = (x[:, 0].reshape(n, -1)[:, :8] > 0).long().reshape(n, 2, 4)
        tokens = (bits * torch.tensor([1, 2, 4, 8])).sum(-1)          # [n, 2], 16 values
        h = torch.cat([torch.tanh(self.gn(self.conv(x))).flatten(1),
                       self.emb(tokens).flatten(1)], 1)
        return self.out(torch.tanh(self.ln(self.fc(h))))


def global_batch(step, n, seed=1000):
    g = torch.Generator().manual_seed(seed + step)
    x = torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)
    w = torch.randn(2 * 16, CLASSES, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64)
    y = (x.reshape(n, -1) @ w).argmax(1)
    return x, y


def shard(t, sizes, rank):
    off = sum(sizes[:rank])
    return t[off:off + sizes[rank]]


def _opt_kwargs(cfg):
    kw = dict(damping=cfg.get("damping", 1e-2), curvature=cfg["curvature"],
              likelihood="categorical", inverse=cfg["inverse"], inverse_every=cfg.get("inv", 2),
              factor_every=cfg.get("fe", 1), ema_decay=0.9, loss_reduction=cfg.get("red", "mean"),
              kl_clip=cfg.get("kl"), seed=cfg.get("seed"),
              full_eigh_every=cfg.get("full_every", 1),
              max_factor_dim=cfg.get("maxdim", 8192))
    if cfg.get("kind", "kfac") == "kfac":
        kw.update(lr=cfg.get("lr", 0.05), momentum=0.5, weight_decay=1e-3)
    return kw


def _build(model, cfg, distributed, **dist_kw):
    kw = _opt_kwargs(cfg)
    if cfg.get("kind", "kfac") == "kfac":
        return kk.KFAC(model, distributed=distributed, **kw, **dist_kw), None
    kl = kw.pop("kl_clip")
    pre = kk.KFACPreconditioner(model, kl_clip=kl, lr=0.05, distributed=distributed, **kw,
                                **dist_kw)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    return pre, base


def _loss(out, y, red):
    return F.cross_entropy(out, y, reduction=red)


def _micro_batches(step, sizes, rank, accum):
    """This rank's micro-batches of a step (``rank=None``: the single process, whose k-th
    micro-batch concatenates every rank's k-th micro-batch)."""
    x, y = global_batch(step, sum(sizes))
    ranks = range(len(sizes)) if rank is None else [rank]
    out = []
    for k in range(accum):
        xs, ys = [], []
        for r in ranks:
            xr, yr = shard(x, sizes, r), shard(y, sizes, r)
            c = -(-sizes[r] // accum)
            xs.append(xr[k * c:(k + 1) * c])
            ys.append(yr[k * c:(k + 1) * c])
        out.append((torch.cat(xs), torch.cat(ys)))
    return out


def _train(net, params, opt, base, cfg, steps, sizes, rank, start=0, plain_allreduce=False,
           group=None):
    """``steps`` optimiser steps; ``rank=None`` is the single-process run on the concatenated
    batch. With ``accum`` micro-batches per step the loss is divided by their number."""
    red = cfg.get("red", "mean")
    accum = cfg.get("accum", 1)
    N = sum(sizes)
    for s in range(start, start + steps):
        if base is not None:
            base.zero_grad()
        else:
            opt.zero_grad()
        for k, (x, y) in enumerate(_micro_batches(s, sizes, rank, accum)):
            # DDP's no_sync: the gradients are reduced in the last micro-batch's backward only
            quiet = rank is not None and cfg.get("no_sync") and k < accum - 1
            with (net.no_sync() if quiet else contextlib.nullcontext()):
                out = net(x)
                opt.backward(_loss(out, y, red) / accum, out)
        if plain_allreduce:   # the user's own gradient reduction (no DDP)
            for p in params:
                if red == "mean":   # the global mean loss: weight each rank's mean by N_r / N
                    p.grad.mul_(sizes[rank] / N)
                dist.all_reduce(p.grad, group=group)
        opt.step()
        if base is not None:
            base.step()


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def equivalence(rank, world, configs, group=None):
    """For each config: parameters and factors after k steps vs the single-process run on the
    concatenated batch. Returns {name: dict(err=..., params=[...], ...)}. ``group``: run in this
    process group (``rank``, ``world``: within it) instead of the default one."""
    out = {}
    for cfg in configs:
        sizes = cfg.get("sizes") or [6] * world
        steps = cfg.get("steps", 4)
        dist_kw = dict(grad_worker_fraction=cfg.get("frac", 1.0),
                       assignment=cfg.get("assign", "compute"))
        if group is not None:
            dist_kw["process_group"] = group
        kind = cfg.get("model", "mlp")
        model = make_model(kind=kind)
        net = DDP(model, process_group=group) if cfg.get("ddp") else model
        opt, base = _build(net, cfg, None, **dist_kw)
        assert opt.engine.dist is not None and opt.engine.dist.world == world
        _train(net, list(model.parameters()), opt, base, cfg, steps, sizes, rank,
               plain_allreduce=not cfg.get("ddp"), group=group)
        ref_model = make_model(kind=kind)
        ref, ref_base = _build(ref_model, cfg, False)
        assert ref.engine.dist is None
        _train(ref_model, None, ref, ref_base, cfg, steps, sizes, None)
        err = max(_rel(p.detach(), q.detach())
                  for p, q in zip(model.parameters(), ref_model.parameters()))
        ferr = max(max(_rel(b.A, ref.blocks[n].A), _rel(b.G, ref.blocks[n].G))
                   for n, b in opt.blocks.items())
        # how far the whole parameter vector moved (per tensor, a zero-initialised bias would
        # make any move look infinite)
        moved = _rel(torch.cat([p.detach().flatten() for p in model.parameters()]),
                     torch.cat([q.detach().flatten() for q in make_model(kind=kind).parameters()]))
        out[cfg["name"]] = dict(err=err, factor_err=ferr, moved=moved,
                                blocks=sorted(opt.blocks),
                                params=[p.detach().clone() for p in model.parameters()],
                                comm=dict(opt.engine.dist.stats.bytes),
                                comm_alias=opt.engine.dist.comm is opt.engine.dist.stats,
                                describe=opt.describe())
    return out


def fisher_factors(rank, world, sizes, seed, frac):
    """One "fisher" factor step: the averaged factors equal the example-weighted average of
    single-process estimates on each shard drawn with sampling_seed(seed, rank, step 0)."""
    N = sum(sizes)
    cfg = dict(curvature="fisher", inverse="eigh", seed=seed, kind="kfac", lr=0.0)
    model = make_model()
    opt, _ = _build(model, cfg, None, grad_worker_fraction=frac)
    _train(model, list(model.parameters()), opt, None, cfg, 1, sizes, rank, plain_allreduce=True)
    x, y = global_batch(0, N)
    want = {}
    for r in range(world):
        m = make_model()
        single = kk.KFAC(m, **{**_opt_kwargs(cfg), "seed": sampling_seed(seed, r, 0)},
                         distributed=False)
        out = m(shard(x, sizes, r))
        single.zero_grad()
        single.backward(_loss(out, shard(y, sizes, r), "mean"), out)
        single.step()
        for n, b in single.blocks.items():
            a, g = want.get(n, (0.0, 0.0))
            want[n] = (a + sizes[r] / N * b.A, g + sizes[r] / N * b.G)
    err = max(max(_rel(b.A, want[n][0]), _rel(b.G, want[n][1])) for n, b in opt.blocks.items())
    return dict(err=err, G=[b.G.clone() for b in opt.blocks.values()])


def checkpoint(rank, world, cfg, path):
    """6 steps straight vs 3 steps, save on rank 0, load everywhere into fresh objects, 3 steps."""
    sizes = cfg.get("sizes") or [5] * world
    dist_kw = dict(grad_worker_fraction=cfg.get("frac", 1.0), assignment=cfg.get("assign",
                                                                                 "compute"))
    kind = cfg.get("model", "mlp")
    straight = make_model(kind=kind)
    opt, base = _build(straight, cfg, None, **dist_kw)
    _train(straight, list(straight.parameters()), opt, base, cfg, 6, sizes, rank,
           plain_allreduce=True)

    part = make_model(kind=kind)
    opt, base = _build(part, cfg, None, **dist_kw)
    _train(part, list(part.parameters()), opt, base, cfg, 3, sizes, rank, plain_allreduce=True)
    refused = None
    if cfg.get("frac", 1.0) < 1.0 and rank == 0:
        try:
            opt.state_dict()
        except RuntimeError as exc:
            refused = str(exc)
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": part.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()
    ckpt = torch.load(path, weights_only=False)
    resumed = make_model(seed=99, kind=kind)
    resumed.load_state_dict(ckpt["model"])
    opt2, base2 = _build(resumed, cfg, None, **dist_kw)
    opt2.load_state_dict(ckpt["opt"])
    held = sum(1 for b in opt2.blocks.values() if b.inverse)
    _train(resumed, list(resumed.parameters()), opt2, base2, cfg, 3, sizes, rank, start=3,
           plain_allreduce=True)
    same = all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    # the consolidated checkpoint is complete: a single process (another world size) loads it
    # with every decomposition and trains on from it
    single = make_model(seed=98, kind=kind)
    single.load_state_dict(ckpt["model"])
    opt1, base1 = _build(single, cfg, False)
    opt1.load_state_dict(ckpt["opt"])
    complete = all(b.inverse for b in opt1.blocks.values())
    _train(single, None, opt1, base1, cfg, 1, sizes, None, start=3)
    return dict(same=same, refused=refused, held=held, blocks=len(opt2.blocks),
                single_complete=complete,
                params=[p.detach().clone() for p in resumed.parameters()])


def no_host_sync(rank, world, frac, kind="mlp"):
    """A factor step between inverse updates reads no tensor on the host (collectives included)."""
    cfg = dict(curvature="fisher", inverse="eigh", kl=1e-3, seed=3, inv=100)
    model = make_model(kind=kind).float()
    opt = kk.KFAC(model, grad_worker_fraction=frac, **{**_opt_kwargs(cfg), "lr": 0.1})
    x, y = global_batch(0, 8)
    x = x.float()
    for step in range(2):
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        opt.backward(loss, out)
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        with (host_sync_forbidden() if step == 1 else contextlib.nullcontext()):
            opt.step()
    return opt.engine.factor_updates


def nonfinite(rank, world):
    """Rank 1 sees a NaN on the second factor step: every rank rejects that update alike."""
    model = make_model()
    opt = kk.KFAC(model, lr=0.1, curvature="empirical", inverse_every=100)
    eng = opt.engine
    before = None
    caught = []
    for step in range(2):
        x, y = global_batch(step, 4 * world)
        x, y = shard(x, [4] * world, rank), shard(y, [4] * world, rank)
        if step == 1 and rank == 1:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        out = model(x)
        opt.zero_grad()
        F.cross_entropy(out, y).backward()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            eng.finish_factor_update()
            eng.health.poll()
        caught += [str(m.message) for m in w]
        if step == 0:
            before = {n: (b.A.clone(), b.G.clone()) for n, b in opt.blocks.items()}
        eng.end_step()
    unchanged = all(torch.equal(b.A, before[n][0]) and torch.equal(b.G, before[n][1])
                    for n, b in opt.blocks.items())
    return dict(unchanged=unchanged, counts=[float(b.count) for b in opt.blocks.values()],
                skipped=[int(b.skipped) for b in opt.blocks.values()],
                warned=any("non-finite" in m for m in caught))


def mismatched_model(rank, world):
    kk.KFAC(make_model(width=6 + (rank == world - 1)), curvature="empirical")


def mismatched_options(rank, world):
    kk.KFAC(make_model(), curvature="empirical", inverse_every=10 + (rank == 1))


def mismatched_warmup(rank, world):
    kk.KFAC(make_model(), curvature="empirical", inverse_warmup=(rank == 1))


def mismatched_skip_nonfinite(rank, world):
    kk.KFAC(make_model(), curvature="empirical", skip_nonfinite=(rank == 0))


def bad_fraction(rank, world, frac, inverse="eigh"):
    kk.KFAC(make_model(), curvature="empirical", grad_worker_fraction=frac, inverse=inverse)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(5, 6).double()
        self.extra = nn.Linear(6, 6).double()
        self.head = nn.Linear(6, 3).double()

    def forward(self, x, extra):
        h = torch.tanh(self.body(x))
        if extra:
            h = torch.tanh(self.extra(h))
        return self.head(h)


def layer_use_mismatch(rank, world):
    """On step 1 only rank 0 runs the 'extra' layer: the next inverse update (step 2) raises on
    every rank, instead of the ranks silently diverging or hanging."""
    model = TwoHeads()
    opt = kk.KFAC(model, lr=0.1, curvature="empirical", inverse_every=2)
    for step in range(4):
        x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        y = torch.arange(4) % 3
        out = model(x, extra=(step != 1 or rank == 0))
        opt.zero_grad()
        F.cross_entropy(out, y).backward()
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        try:
            opt.step()
        except MismatchError as exc:
            return dict(step=step, message=str(exc))
    return dict(step=None, message="")


def mismatched_fraction(rank, world):
    """Ranks disagreeing on the grid must fail the agreement check before creating subgroups."""
    kk.KFAC(make_model(), curvature="empirical", grad_worker_fraction=0.5 if rank else 1.0)


def subgroup(rank, world, configs):
    """K-FAC in a process group of global ranks 1 and 2 (of 3); rank 0 stays out of it."""
    g = dist.new_group([1, 2])
    if rank == 0:
        return None
    return equivalence(rank - 1, 2, configs, group=g)


def average_helper(rank, world):
    """DistributedKFAC.average: the example-weighted mean of per-rank tensors, any shapes."""
    opt = kk.KFAC(make_model(), curvature="empirical")
    g = torch.Generator().manual_seed(0)
    xs = [{"s": torch.randn(3, 5, generator=g, dtype=torch.float64),
           "t": torch.randn(4, 4, generator=g, dtype=torch.float64)} for _ in range(world)]
    for x in xs:
        x["t"] = x["t"] + x["t"].T
    w = [2.0, 5.0, 1.0][:world]
    got = opt.engine.dist.average({"s": xs[rank]["s"], "t": xs[rank]["t"]}, weight=w[rank])
    sym = opt.engine.dist.average({"t": xs[rank]["t"]}, weight=w[rank], symmetric=True)
    want = {k: sum(wr * x[k] for wr, x in zip(w, xs)) / sum(w) for k in ("s", "t")}
    return max(_rel(got["s"], want["s"]), _rel(got["t"], want["t"]), _rel(sym["t"], want["t"]))

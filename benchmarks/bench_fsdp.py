"""K-FAC on FSDP2 (fully_shard): memory and communication per rank against world size.

    python benchmarks/bench_fsdp.py [--worlds 1 2 4] [--width 512] [--markdown out.md]

For each world size W it starts W local processes (gloo on CPU, or NCCL with one GPU per process
where W GPUs are present) and trains the MLP of ``bench_distributed.py`` twice with ``kk.KFAC``
(momentum 0.9, eigh, curvature "empirical", a fixed per-rank batch: weak scaling): once with every
``nn.Linear`` and the root sharded by ``fully_shard`` (strategy ``FSDPKFAC``), once as a plain
model whose gradients are all-reduced by hand (DDP's arithmetic, strategy ``DistributedKFAC``).
It reports, per rank (the largest rank where they differ):

* **memory held**, counted tensor by tensor (not the process RSS): parameters, gradients and
  momentum buffers (the local shards under FSDP2), K-FAC's factors and decompositions (replicated
  under both), and the transient buffers of one FSDP2 step (the all-gather output and the full
  gradient matrices that are preconditioned);
* **communication payload** this rank passes to collectives (``engine.dist.stats``): per factor
  step (the factor all-reduce), per inverse update (the decomposition broadcasts) and per step
  (FSDP2: the gradient all-gather, this rank's zero-padded shard; a ring all-gather then moves
  (W - 1) times it in and out of each rank), *computed* from the block shapes as well;
* **time** per step with a factor update and no inverse update (median on rank 0, between
  barriers, one thread per process on CPU).

It does not count FSDP2's own traffic (parameter all-gathers in forward/backward, the gradient
reduce-scatter): those are FSDP2's, identical with any optimiser. CPU figures with more processes
than cores are oversubscribed and flagged. Writes a markdown table with machine, versions, date.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from datetime import timedelta

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)           # bench_distributed (the process launcher)


def _model(width, depth, dim_in, classes, device):
    import torch.nn as nn
    torch.manual_seed(0)
    layers, d = [], dim_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers).to(device)


def _nbytes(t):
    if t is None:
        return 0
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def _rank_main(rank, world, args, store, out):
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard
    import kfac_kernels as kk
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=300))
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)   # noqa: E731
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.dim, generator=g).to(dev)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(dev)
    kw = dict(lr=0.01, momentum=0.9, damping=1e-2, curvature="empirical", inverse="eigh",
              inverse_every=10 ** 6, weight_decay=args.weight_decay,
              distributed=True)

    def run(sharded):
        model = _model(args.width, args.depth, args.dim, args.classes, dev)
        if sharded:
            for m in model:
                if isinstance(m, torch.nn.Linear):
                    fully_shard(m)
            fully_shard(model)
        opt = kk.KFAC(model, **kw)
        times = []
        steps = 2 + args.steps
        for i in range(steps):
            dist.barrier()
            sync()
            t = time.perf_counter()
            out_ = model(x)
            loss = F.cross_entropy(out_, y)
            opt.zero_grad()
            loss.backward()
            if not sharded:     # DDP's gradient average, by hand
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
            opt.step()
            sync()
            if i >= 2:
                times.append(time.perf_counter() - t)
        eng = opt.engine
        cs = eng.dist.stats
        row = dict(strategy=type(eng.comm).__name__, t_step=statistics.median(times),
                   factor=cs.bytes.get("factor", 0) / steps,
                   gradient=cs.bytes.get("gradient", 0) / steps,
                   gradient_calls=cs.calls.get("gradient", 0) / steps)
        before = cs.bytes.get("inverse", 0)
        eng.update_inverses()
        row["inverse"] = cs.bytes.get("inverse", 0) - before
        params = list(model.parameters())
        row["params"] = sum(_nbytes(p) for p in params)
        row["grads"] = sum(_nbytes(p.grad) for p in params)
        row["momentum"] = sum(_nbytes(opt.state[p].get("momentum_buffer")) for p in params)
        row["factors"] = sum(_nbytes(b.A) + _nbytes(b.G) for b in eng.blocks.values())
        row["decomp"] = sum(_nbytes(v) for b in eng.blocks.values() for v in b.inverse.values())
        elt = 4
        row["full_grads"] = (sum(b.out_dim * b.in_dim for b in eng.blocks.values()) * elt
                             if sharded else 0)
        if sharded:       # the all-gather's send and receive buffers of one step
            lays = [eng.comm.layouts[id(p)] for b in eng.blocks.values() for p in b.params]
            per_rank = sum(lay.chunk * lay.rest for lay in lays if lay.dim is not None) * elt
            if args.weight_decay:
                per_rank *= 2
            row["gather_buffers"] = per_rank * (1 + world)
            row["computed_gradient"] = per_rank
        else:
            row["gather_buffers"] = row["computed_gradient"] = 0
        tri = lambda n: n * (n + 1) // 2   # noqa: E731
        row["computed_factor"] = sum(tri(b.in_dim) + tri(b.out_dim) + 3
                                     for b in eng.blocks.values()) * elt
        row["computed_inverse"] = sum(b.in_dim ** 2 + b.in_dim + b.out_dim ** 2 + b.out_dim
                                      for b in eng.blocks.values()) * elt
        for key in ("params", "grads", "momentum", "factors", "decomp", "full_grads",
                    "gather_buffers"):
            t = torch.tensor([row[key]], dtype=torch.float64, device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            row[key] = float(t)
        opt.close()
        return row

    res = {"device": torch.cuda.get_device_name(rank) if cuda else platform.processor() or "cpu",
           "rows": []}
    for sharded in (True, False):
        r = run(sharded)
        r["world"] = world
        res["rows"].append(r)
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()


def launch(world, args):
    from bench_distributed import launch as launch_ranks
    return launch_ranks(world, args, _rank_main)


def main(argv=None):
    from bench_distributed import _kb, model_args
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(ap)
    ap.add_argument("--weight-decay", type=float, default=0.0,
                    help="> 0: the parameter values are gathered too")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--markdown", help="write the table with provenance here")
    args = ap.parse_args(argv)
    mp.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch._dynamo", "torch.distributed", "torch.distributed.fsdp", "kfac_kernels",
         "kfac_kernels.optimizer", "kfac_kernels.comm.fsdp"])
    cores = os.cpu_count() or 1
    rows, device = [], None
    for w in args.worlds:
        res = launch(w, args)
        device = res["device"]
        for r in res["rows"]:
            r["oversubscribed"] = (not torch.cuda.is_available()) and w > cores
            rows.append(r)
    header = ["world", "strategy", "params KiB", "grads KiB", "momentum KiB", "factors KiB",
              "decompositions KiB", "per-step transient KiB (full grad matrices + gather buffers)",
              "factor step: computed / measured KiB", "inverse update: computed / measured KiB",
              "per step gradient all-gather: computed / measured KiB (collectives)",
              "K-FAC step ms (factor update, no inverse)"]
    body = []
    for r in rows:
        fsdp = r["strategy"] == "FSDPKFAC"
        body.append([
            f"{r['world']}" + (" (*)" if r["oversubscribed"] else ""),
            "FSDP2 (FSDPKFAC)" if fsdp else "DDP arithmetic (DistributedKFAC)",
            _kb(r["params"]), _kb(r["grads"]), _kb(r["momentum"]), _kb(r["factors"]),
            _kb(r["decomp"]),
            _kb(r["full_grads"] + r["gather_buffers"]) if fsdp else "0",
            f"{_kb(r['computed_factor'])} / {_kb(r['factor'])}",
            f"{_kb(r['computed_inverse'])} / {_kb(r['inverse'])}",
            (f"{_kb(r['computed_gradient'])} / {_kb(r['gradient'])} "
             f"({r['gradient_calls']:.0f})") if fsdp else "-",
            f"{r['t_step'] * 1e3:.1f}"])
    from bench_distributed import _commit, provenance, write_report
    prov = provenance(device, cores, f"{'NCCL' if torch.cuda.is_available() else 'gloo'}, "
                      f"commit {_commit()}. ") + (
        f"MLP {args.dim}-" + "-".join([str(args.width)] * args.depth) + f"-{args.classes} "
        f"({args.depth + 1} blocks), {args.batch} examples per rank, float32, momentum 0.9, "
        f"weight_decay={args.weight_decay}, inverse=eigh, curvature=empirical; medians of "
        f"{args.steps} steps.")
    write_report(prov, header, body, rows, args.markdown)


if __name__ == "__main__":
    main()

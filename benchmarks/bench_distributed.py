"""Distributed K-FAC: communication volume and step time against world size.

    python benchmarks/bench_distributed.py [--worlds 1 2 4] [--width 512] [--markdown out.md]

For each world size W and gradient-worker fraction (1 and 1/W) it starts W local processes
(gloo on CPU, or NCCL with one GPU per process where W GPUs are present), trains an MLP with
``kk.KFAC`` on a fixed per-rank batch (weak scaling), and measures:

* bytes per factor step and per inverse step: *computed* from the block shapes (upper triangles of
  the factors plus one weight and one presence scalar per block; the decompositions; the
  preconditioned gradients) and *measured* as the payload this rank passed to collectives
  (``engine.dist.stats``); the wire estimate for a ring all-reduce is 2 (W - 1) / W of the payload;
* memory for decompositions held per rank (largest rank);
* time per step: a step with a factor update but no inverse update, an inverse update alone
  (``engine.update_inverses()``: this rank's decompositions plus the broadcasts), and a plain SGD
  step of the same model for scale (medians, on rank 0, between barriers; one thread per process
  on CPU).

CPU figures with more processes than cores are oversubscribed and flagged; real scaling figures
need one GPU per process. Writes a markdown table with the machine, versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _model(width, depth, dim_in, classes, device):
    import torch.nn as nn
    torch.manual_seed(0)
    layers, d = [], dim_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers).to(device)


def _computed_bytes(opt, world):
    """(factor step, inverse step, precondition per step) payload from the block shapes."""
    eng = opt.engine
    elt = 4 if next(iter(eng.blocks.values())).factor_dtype == torch.float32 else 8
    tri = lambda n: n * (n + 1) // 2   # noqa: E731
    factor = sum(tri(b.in_dim) + tri(b.out_dim) + 3 for b in eng.blocks.values()) * elt
    d = eng.dist
    if d is None or d.k == 1:
        inverse = 0
    elif eng.opts.inverse == "cholesky":
        inverse = sum(tri(b.in_dim) + tri(b.out_dim) for b in eng.blocks.values()) * elt
    else:
        inverse = sum(b.in_dim ** 2 + b.in_dim + b.out_dim ** 2 + b.out_dim
                      for b in eng.blocks.values()) * elt
    if d is not None and 1 < d.k < world:   # only the column's decompositions move
        inverse = inverse * d.k // world
    pre = 0
    if d is not None and d.k < world:
        pre = sum(b.out_dim * b.in_dim + 1 for b in eng.blocks.values()) * elt
    return factor, inverse, pre


def _rank_main(rank, world, args, store, out):
    import torch.distributed as dist
    import torch.nn.functional as F
    import kfac_kernels as kk
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if cuda:
        torch.cuda.set_device(rank)
    else:   # one thread per process: the processes share the cores
        torch.set_num_threads(1)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=300))
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)   # noqa: E731
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.dim, generator=g).to(dev)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(dev)

    def run(opt_fn, steps, warm=2):
        model = _model(args.width, args.depth, args.dim, args.classes, dev)
        opt = opt_fn(model)
        times = []
        for i in range(warm + steps):
            dist.barrier()
            sync()
            t = time.perf_counter()
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            if hasattr(opt, "engine"):
                opt.backward(loss, out)
            else:
                loss.backward()
            for p in model.parameters():     # the gradient all-reduce DDP would do
                dist.all_reduce(p.grad)
                p.grad.div_(world)
            opt.step()
            sync()
            if i >= warm:
                times.append(time.perf_counter() - t)
        return opt, statistics.median(times)

    def time_inverse(opt, reps):
        """Median time of the inverse phase alone, and its payload bytes per update."""
        eng = opt.engine
        before = eng.dist.stats.bytes.get("inverse", 0) if eng.dist is not None else 0
        times = []
        for _ in range(reps):
            dist.barrier()
            sync()
            t = time.perf_counter()
            eng.update_inverses()
            sync()
            times.append(time.perf_counter() - t)
        after = eng.dist.stats.bytes.get("inverse", 0) if eng.dist is not None else 0
        return statistics.median(times), (after - before) / reps

    res = {"device": torch.cuda.get_device_name(rank) if cuda else platform.processor() or "cpu",
           "rows": []}
    _, t_sgd = run(lambda m: torch.optim.SGD(m.parameters(), lr=0.01), args.steps)
    fracs = sorted({1.0, 1.0 / world})
    for frac in fracs:
        kw = dict(lr=0.01, damping=1e-2, curvature="empirical", inverse=args.inverse,
                  grad_worker_fraction=frac, distributed=True if world > 1 else None)
        # factor steps only (the first step decomposes; it is among the warm-up steps)
        opt_f, t_factor = run(lambda m: kk.KFAC(m, inverse_every=10 ** 6, **kw), args.steps)
        t_inv, inv_bytes = time_inverse(opt_f, max(3, args.steps // 2))
        row = dict(world=world, frac=frac, t_sgd=t_sgd, t_factor=t_factor, t_inverse=t_inv,
                   measured_inverse=inv_bytes)
        if opt_f.engine.dist is not None:
            steps = 2 + args.steps
            cf = opt_f.engine.dist.stats
            row["measured_factor"] = cf.bytes.get("factor", 0) / steps
            row["measured_pre"] = cf.bytes.get("precondition", 0) / steps
            row["calls_factor"] = cf.calls.get("factor", 0) / steps
        else:
            row.update(measured_factor=0, measured_pre=0, calls_factor=0)
        cfac, cinv, cpre = _computed_bytes(opt_f, world)
        if opt_f.engine.dist is None:
            cfac = 0
        row.update(computed_factor=cfac, computed_inverse=cinv, computed_pre=cpre)
        held = sum(v.numel() * v.element_size() for b in opt_f.blocks.values()
                   for v in b.inverse.values())
        t = torch.tensor([held], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        row["held_max"] = float(t)
        res["rows"].append(row)
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()


def launch(world, args, rank_main=None):
    """Run ``rank_main(rank, world, args, store, out)`` (default: this benchmark's) on ``world``
    local processes; returns what rank 0 saved to ``out`` (bench_fsdp.py uses it too)."""
    rank_main = rank_main or _rank_main
    ctx = mp.get_context("forkserver")
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "out.pt")
        procs = [ctx.Process(target=rank_main, args=(r, world, args, store, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        if any(p.is_alive() for p in procs):
            for p in procs:
                p.kill()
            raise TimeoutError(f"world {world}: did not finish within {args.timeout} s")
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"world {world}: exit codes {[p.exitcode for p in procs]}")
        return torch.load(out, weights_only=False)


def _kb(v):
    return f"{v / 1024:.1f}"


def model_args(ap: argparse.ArgumentParser) -> None:
    """The world sizes and the MLP every rank trains (shared with bench_fsdp.py)."""
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128, help="examples per rank")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(ap)
    ap.add_argument("--inverse", default="eigh", choices=("eigh", "cholesky"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--markdown", help="write the table with provenance here")
    args = ap.parse_args(argv)
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch._dynamo",
                                                         "torch.distributed", "kfac_kernels",
                                                         "kfac_kernels.optimizer"])
    cores = os.cpu_count() or 1
    rows, device = [], None
    for w in args.worlds:
        res = launch(w, args)
        device = res["device"]
        for r in res["rows"]:
            r["oversubscribed"] = (not torch.cuda.is_available()) and w > cores
            rows.append(r)
    header = ["world", "fraction", "factor step: computed KiB", "measured KiB", "collectives",
              "inverse step: computed KiB", "measured KiB", "per step (U broadcast): computed KiB",
              "measured KiB", "decompositions held, max rank KiB", "SGD step ms",
              "K-FAC step ms (factor update, no inverse)", "inverse update ms"]
    body = []
    for r in rows:
        body.append([f"{r['world']}" + (" (*)" if r["oversubscribed"] else ""),
                     "1" if r["frac"] == 1.0 else f"1/{round(1 / r['frac'])}",
                     _kb(r["computed_factor"]), _kb(r["measured_factor"]),
                     f"{r['calls_factor']:.0f}",
                     _kb(r["computed_inverse"]), _kb(r["measured_inverse"]),
                     _kb(r["computed_pre"]), _kb(r["measured_pre"]), _kb(r["held_max"]),
                     f"{r['t_sgd'] * 1e3:.1f}", f"{r['t_factor'] * 1e3:.1f}",
                     f"{r['t_inverse'] * 1e3:.1f}"])
    prov = provenance(device, cores, f"commit {_commit()}. ") + (
        f"MLP {args.dim}-" + "-".join([str(args.width)] * args.depth) + f"-{args.classes} "
        f"({args.depth + 1} blocks), {args.batch} examples per rank, float32, "
        f"inverse={args.inverse}, curvature=empirical; medians of {args.steps} steps.")
    write_report(prov, header, body, rows, args.markdown)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=HERE,
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def provenance(device, cores, extra: str = "") -> str:
    """The first sentence of a results page: date, machine, versions (bench_fsdp.py too)."""
    return (f"Measured {datetime.date.today().isoformat()} on {device} "
            f"({cores} CPU cores{', CUDA' if torch.cuda.is_available() else ', no GPU'}); "
            f"torch {torch.__version__}, Python {platform.python_version()}, {extra}")


def write_report(prov: str, header, body, rows, markdown) -> None:
    """Print the markdown table (and write it to ``markdown`` when given); rows run with more
    processes than cores are flagged."""
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in body]
    text = prov + "\n\n" + "\n".join(table) + "\n"
    if any(r["oversubscribed"] for r in rows):
        text += ("\n(*) more processes than CPU cores: the times measure contention, not "
                 "scaling.\n")
    print(text)
    if markdown:
        with open(markdown, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()

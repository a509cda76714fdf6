"""K-FAC with DistributedDataParallel: ``torchrun --standalone --nproc_per_node=2 -m kfac_kernels.examples.ddp``.

Runs as written on CPU (gloo) or on GPUs (NCCL, one per process). Trains an MLP classifier on a
synthetic task (labels from a fixed random teacher network, so nothing is downloaded) with
``kk.KFAC`` on a DDP-wrapped model: DDP averages the gradients, K-FAC averages its Kronecker factors
over the ranks and splits the eigendecompositions among them (``--fraction``: the share of ranks
that hold each decomposition, 1 = all of them). Every rank sees its own shard of each global batch.
At the end it checks that all ranks hold the same parameters.
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import kfac_kernels as kk


def teacher_batch(step: int, n: int, dim: int, classes: int, device) -> tuple:
    """The global batch of a step (identical on every rank; each rank takes its slice)."""
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(n, dim, generator=g)
    t = torch.Generator().manual_seed(0)
    w1 = torch.randn(dim, 64, generator=t) / dim ** 0.5
    w2 = torch.randn(64, classes, generator=t) / 8.0
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return x.to(device), y.to(device)


def training_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options the DDP and FSDP2 examples share (same task, same defaults)."""
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64, help="examples per rank per step")
    ap.add_argument("--curvature", default="fisher", choices=("empirical", "fisher", "ggn"))
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.0,
                    help="heavy-ball momentum (0: with the KL clip binding, momentum 0.9 "
                         "overshoots on this task and plateaus)")
    ap.add_argument("--log-every", type=int, default=20)
    return ap


#: K-FAC's settings in both examples, besides lr, momentum and curvature from the command line
KFAC_SETTINGS = dict(damping=1e-2, likelihood="categorical", inverse_every=10, kl_clip=1e-2,
                     seed=0)


def held_out_loss(model, dim: int, classes: int, device) -> float:
    """Cross-entropy on 2,048 held-out examples of the teacher task (the same on every rank)."""
    xt, yt = teacher_batch(-1, 2048, dim, classes, device)
    with torch.no_grad():
        return float(F.cross_entropy(model(xt), yt))


def main(argv=None) -> int:
    ap = training_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--fraction", type=float, default=1.0, help="grad_worker_fraction")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    dim, classes = 32, 10
    torch.manual_seed(0)                    # the same initial model on every rank
    model = nn.Sequential(nn.Linear(dim, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                          nn.Linear(128, classes)).to(device)
    ddp = DDP(model, device_ids=[local_rank] if cuda else None)
    opt = kk.KFAC(ddp, lr=args.lr, momentum=args.momentum, curvature=args.curvature,
                  grad_worker_fraction=args.fraction, **KFAC_SETTINGS)
    if rank == 0:
        print(opt.describe(), flush=True)

    def test_loss() -> float:
        return held_out_loss(model, dim, classes, device)

    first = test_loss()
    if rank == 0:
        print(f"test loss before training {first:.4f}", flush=True)
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = teacher_batch(step, args.batch * world, dim, classes, device)
        x, y = x[rank::world], y[rank::world]          # this rank's shard
        out = ddp(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        opt.backward(loss, out)                        # DDP all-reduces the gradients here
        opt.step()                                     # K-FAC all-reduces its factors
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            if rank == 0:
                print(f"step {step + 1:5d}  loss {float(avg) / world:.4f}  "
                      f"({(time.perf_counter() - start) / (step + 1) * 1e3:.1f} ms/step)",
                      flush=True)

    last = test_loss()
    if rank == 0:
        print(f"test loss {first:.4f} -> {last:.4f}", flush=True)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    spread = flat.clone()
    lo = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    diff = float((spread - lo).abs().max())
    if rank == 0:
        print(f"ranks agree: max |parameter difference| across {world} ranks = {diff:.3g}",
              flush=True)
    # DDP and K-FAC hold the process group: release them first, so that destroy_process_group()
    # really shuts gloo's threads down now rather than during interpreter teardown
    opt.close()
    del opt, ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0 if diff == 0.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

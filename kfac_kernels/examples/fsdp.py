"""K-FAC with FSDP2 (fully_shard): ``torchrun --standalone --nproc_per_node=2 -m kfac_kernels.examples.fsdp``.

Runs as written on CPU (gloo) or on GPUs (NCCL, one per process). Trains the MLP classifier of
``kfac_kernels.examples.ddp`` (labels from a fixed random teacher network, nothing downloaded)
with every ``nn.Linear`` and the root sharded by ``fully_shard``: each rank stores 1/world of
every weight, bias and momentum buffer. ``kk.KFAC`` is built on the sharded model exactly as on
a plain one; it averages its Kronecker factors over the ranks, gathers each layer's gradient to
precondition it and keeps its own rows of the update. Halfway through it saves a checkpoint
(the model's full state through ``torch.distributed.checkpoint``, the optimiser's after
``consolidate_state_dict``) on rank 0, and at the end it resumes from it into fresh objects and
checks that the second half comes out bit-identical.
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)
from torch.distributed.fsdp import fully_shard

import kfac_kernels as kk
from kfac_kernels.examples.ddp import KFAC_SETTINGS, held_out_loss, teacher_batch, training_args


def build(device, dim: int, classes: int, args):
    torch.manual_seed(0)                    # the same initial model on every rank
    model = nn.Sequential(nn.Linear(dim, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                          nn.Linear(128, classes)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)              # parameters become DTensors sharded on dim 0
    fully_shard(model)
    opt = kk.KFAC(model, lr=args.lr, momentum=args.momentum, curvature=args.curvature,
                  **KFAC_SETTINGS)
    return model, opt


def train(model, opt, steps, start, args, world, rank, dim, classes, device, log=True):
    t0 = time.perf_counter()
    for step in range(start, start + steps):
        x, y = teacher_batch(step, args.batch * world, dim, classes, device)
        x, y = x[rank::world], y[rank::world]          # this rank's shard
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        opt.backward(loss, out)                        # FSDP2 reduce-scatters the gradients
        opt.step()                                     # K-FAC all-reduces its factors
        if log and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            if rank == 0:
                print(f"step {step + 1:5d}  loss {float(avg) / world:.4f}  "
                      f"({(time.perf_counter() - t0) / (step + 1 - start) * 1e3:.1f} ms/step)",
                      flush=True)


def main(argv=None) -> int:
    ap = training_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
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
    model, opt = build(device, dim, classes, args)
    if rank == 0:
        print(opt.describe(), flush=True)
    first = held_out_loss(model, dim, classes, device)
    if rank == 0:
        print(f"test loss before training {first:.4f}", flush=True)
    half = args.steps // 2
    train(model, opt, half, 0, args, world, rank, dim, classes, device)

    # checkpoint: every rank takes part in gathering, rank 0 writes one file of full tensors
    path = [os.path.join(tempfile.mkdtemp(prefix="kfac_fsdp_"), "ckpt.pt") if rank == 0 else None]
    dist.broadcast_object_list(path)
    model_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": model_sd, "opt": opt.state_dict()}, path[0])
    dist.barrier()

    train(model, opt, args.steps - half, half, args, world, rank, dim, classes, device)
    last = held_out_loss(model, dim, classes, device)
    if rank == 0:
        print(f"test loss {first:.4f} -> {last:.4f}", flush=True)

    # resume from the checkpoint into fresh objects and replay the second half
    ckpt = torch.load(path[0], map_location=device, weights_only=False)
    model2, opt2 = build(device, dim, classes, args)
    set_model_state_dict(model2, ckpt["model"], options=StateDictOptions(full_state_dict=True))
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, args.steps - half, half, args, world, rank, dim, classes, device,
          log=False)
    diff = max(float((a.detach().full_tensor() - b.detach().full_tensor()).abs().max())
               for a, b in zip(model.parameters(), model2.parameters()))
    if rank == 0:
        print(f"checkpoint resumed bit-identically: max |parameter difference| = {diff:.3g}"
              if diff == 0.0 else f"checkpoint resume DIFFERS: max |difference| = {diff:.3g}",
              flush=True)
        os.remove(path[0])
        os.rmdir(os.path.dirname(path[0]))
    # the optimisers and FSDP's modules hold the process group: release them first, so that
    # destroy_process_group() shuts gloo's threads down now rather than at interpreter teardown
    opt.close()
    opt2.close()
    del opt, opt2, model, model2
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0 if diff == 0.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

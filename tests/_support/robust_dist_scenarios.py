"""Code that runs inside gloo ranks for tests/test_faults.py (see dist_harness.py)."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kfac_kernels as kk
from dist_scenarios import global_batch, make_model, shard


def nonfinite_gradient_on_one_rank(rank, world):
    """No DDP: every rank steps on its own gradients. At step 1 rank 1's gradient of one
    parameter is NaN (its captured statistics are finite): every rank must skip that step's
    parameter and factor update, so the replicas stay identical."""
    model = make_model()
    opt = kk.KFAC(model, lr=0.1, momentum=0.0, curvature="empirical", inverse_every=1)
    unchanged = None
    for step in range(3):
        x, y = global_batch(step, 4 * world)
        x, y = shard(x, [4] * world, rank), shard(y, [4] * world, rank)
        out = model(x)
        opt.zero_grad()
        F.cross_entropy(out, y).backward()
        for p in model.parameters():      # the user's own gradient averaging
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        if step == 1 and rank == 1:
            model[-1].bias.grad[0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        if step == 1:
            unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return dict(unchanged=unchanged, skipped=opt.skipped_steps,
                params=[p.detach().clone() for p in model.parameters()],
                A=[b.A.clone() for b in opt.blocks.values()],
                counts=[float(b.count) for b in opt.blocks.values()])

"""Run a function on N local gloo ranks (CPU, localhost only) with a hard timeout.

Ranks are forked from a multiprocessing *forkserver* that has imported torch and kfac_kernels once,
so a scenario costs well under a second instead of a fresh interpreter per rank (torch._dynamo is
preloaded too: torch.optim.Optimizer imports it on first use, ~5 s). Rendezvous goes
through a file store in a temporary directory (no port to pick); gloo talks over the loopback
interface. Each rank writes its result (or the exception it raised, with the traceback) to a file;
a rank that does not finish within the timeout is killed and reported as hung.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from datetime import timedelta

import torch

_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "torch.nn.parallel", "kfac_kernels",
            "kfac_kernels.optimizer", "kfac_kernels.comm.ddp", "dist_scenarios",
            "fsdp_scenarios"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX


class RankError(Exception):
    """An exception raised on one rank, re-created in the test process."""

    def __init__(self, rank, type_name, message, tb):
        super().__init__(f"rank {rank}: {type_name}: {message}\n{tb}")
        self.rank, self.type_name, self.message, self.tb = rank, type_name, message, tb


def _entry(module, name, rank, world, store, out, args, collective_timeout):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist
    import importlib
    result = None
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world,
                                timeout=timedelta(seconds=collective_timeout))
        fn = getattr(importlib.import_module(module), name)
        result = ("ok", fn(rank, world, *args))
    except BaseException as exc:  # reported to the test process
        result = ("error", type(exc).__name__, str(exc), traceback.format_exc())
    try:
        torch.save(result, out)
    finally:
        result = None
        gc.collect()   # optimisers and DDP hold the group: let it go before shutting gloo down
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(fn, world, *args, timeout=60.0, collective_timeout=30.0):
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; returns the per-rank results, or
    raises RankError (the first rank that raised) / TimeoutError (ranks that hung)."""
    outcomes = run_ranks_raw(fn, world, *args, timeout=timeout,
                             collective_timeout=collective_timeout)
    for r, res in enumerate(outcomes):
        if res[0] == "error":
            raise RankError(r, *res[1:])
    return [res[1] for res in outcomes]


def run_ranks_raw(fn, world, *args, timeout=60.0, collective_timeout=30.0):
    """Like :func:`run_ranks` but returns ``("ok", value)`` or ``("error", type, msg, tb)`` per
    rank, so tests can check errors raised on purpose."""
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="kfac_dist_") as tmp:
        store = os.path.join(tmp, "store")
        outs = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
        procs = [ctx.Process(target=_entry, args=(fn.__module__, fn.__name__, r, world, store,
                                                  outs[r], args, collective_timeout),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
        for p in procs:
            p.join(5)
        if hung:
            raise TimeoutError(f"{fn.__name__} on {world} ranks: ranks {hung} did not finish "
                               f"within {timeout:.0f} s (a hang)")
        results = []
        for r, path in enumerate(outs):
            if not os.path.exists(path):
                raise RuntimeError(f"{fn.__name__}: rank {r} exited with code "
                                   f"{procs[r].exitcode} without a result")
            results.append(torch.load(path, weights_only=False))
        return results

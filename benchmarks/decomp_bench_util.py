"""Shared plumbing of bench_symeig.py and bench_inverse.py: the factor stacks of a model on the
benchmark device, synchronisation, accuracy figures and backend availability.

On a machine without a GPU the sizes are divided by 64 (at least 2) so that the benchmarks still
run end to end as smoke tests (``--benchmark-disable``); their timings mean nothing there.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List

import pytest
import torch

from kfac_factor_sizes import MODELS, buckets, factor_sizes
from kfac_kernels import ops

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
#: models to run, comma-separated (KK_BENCH_MODELS=resnet50 to halve the GPU time)
SELECTED_MODELS = [m for m in os.environ.get("KK_BENCH_MODELS", ",".join(MODELS)).split(",") if m]


def scaled(n: int) -> int:
    return n if ON_GPU else max(2, n // 64)


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def spd_stack(n: int, count: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """``count`` symmetric positive semi-definite n x n matrices shaped like K-FAC factors:
    ``X X^T / k`` with k = n + 16 samples (spectrum spread over several decades)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed * 7919 + n)
    k = n + 16
    x = torch.randn(count, n, k, generator=g, device=DEVICE, dtype=torch.float32)
    f = (x @ x.transpose(-1, -2)) / k
    return (0.5 * (f + f.transpose(-1, -2))).to(dtype)


@functools.lru_cache(maxsize=4)
def model_factors(model: str, dtype=torch.float32) -> Dict[int, torch.Tensor]:
    """{n: [count, n, n] stack} holding every factor of ``model`` (scaled down on CPU)."""
    sizes = [scaled(n) for n in factor_sizes(model)]
    out = {n: spd_stack(n, c, dtype) for n, c in buckets(sizes).items()}
    sync()
    return out


def n_factors(stacks: Dict[int, torch.Tensor]) -> int:
    return sum(s.shape[0] for s in stacks.values())


def eig_residual(f: torch.Tensor, lam: torch.Tensor, q: torch.Tensor) -> float:
    """max over the stack of ||F Q - Q diag(lam)||_F / ||F||_F, in fp64."""
    fd, qd, ld = f.double(), q.double(), lam.double()
    r = (fd @ qd - qd * ld.unsqueeze(-2)).flatten(-2).norm(dim=-1) / fd.flatten(-2).norm(dim=-1)
    return float(r.max())


def inverse_error(f: torch.Tensor, damping: float, inv: torch.Tensor) -> float:
    """max over the stack of ||inv - (F + damping I)^{-1}||_F / ||(F + damping I)^{-1}||_F."""
    eye = torch.eye(f.shape[-1], dtype=torch.float64, device=f.device)
    ref = torch.linalg.inv(f.double() + damping * eye)
    return float(((inv.double() - ref).flatten(-2).norm(dim=-1)
                  / ref.flatten(-2).norm(dim=-1)).max())


def require_backend(name: str) -> None:
    ok, why = ops.backend_status(name)
    if not ok:
        pytest.skip(f"backend {name!r} unavailable: {why}")


def smem_limit(kind: str, dtype=torch.float32) -> int:
    """Largest n of the cuda backend's one-block-per-matrix kernels here (0 without it)."""
    if not ops.backend_status("cuda")[0]:
        return 0
    from kfac_kernels.ops.cuda._common import smem_limit as limit

    return limit(kind, dtype, True, torch.cuda.current_device())


def fmt(x: float) -> str:
    return f"{x:.1e}"


def stacks_case(model: str, stacks: Dict[int, torch.Tensor]) -> str:
    return f"{model} all {n_factors(stacks)} factors, {len(stacks)} sizes, fp32"


@pytest.fixture(autouse=False)
def cpu_single_thread():
    """On CPU (smoke runs) use one thread: these small ops only lose time to thread wake-ups."""
    if ON_GPU:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pedantic(benchmark, fn, rounds: int):
    """Time ``fn`` (which synchronises) after one warm-up call; returns its last result."""
    return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)


__all__: List[str] = [
    "ON_GPU", "DEVICE", "SELECTED_MODELS", "scaled", "sync", "spd_stack", "model_factors",
    "n_factors", "eig_residual", "inverse_error", "require_backend", "smem_limit", "fmt",
    "stacks_case", "pedantic", "cpu_single_thread"]

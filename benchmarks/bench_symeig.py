"""symeig over every K-FAC factor of ResNet-50 and a 12-layer GPT-2-small (sizes listed in
kfac_factor_sizes.py), and over the small size buckets the Jacobi kernels are for.

Providers: ``torch-loop`` (the baseline: torch.linalg.eigh on each factor in turn), ``torch-bucketed``
(one batched torch.linalg.eigh per size bucket), ``auto`` (kfac_kernels.ops.symeig, method "auto",
per bucket: the dispatch policy's choice), ``refresh-skip`` / ``refresh-moved`` (method "refresh"
from the previous eigenvectors, when the factors did not / did move), and on single buckets
``cuda-jacobi`` (cold), ``cuda-jacobi-warm`` (warm start from the previous eigenvectors after a
5% move), ``cupy-syevj`` (n <= 32). The target (benchmarks/README.md, "Performance targets"):
>= 10x over torch-loop for all factors of a model, eigenvector residual ||FQ - QL|| / ||F|| <= 1e-4
(reported in "metric").

GPU: ~1.5 min on an H100 (KK_BENCH_MODELS=resnet50 to halve it). CPU: sizes / 64, smoke only.
"""
from __future__ import annotations

import functools

import pytest
import torch

from decomp_bench_util import (cpu_single_thread,  # noqa: F401 (fixture)
                               ON_GPU, SELECTED_MODELS, eig_residual, fmt, model_factors, pedantic,
                               require_backend, scaled, smem_limit, spd_stack, stacks_case, sync)
from kfac_kernels import ops

pytestmark = pytest.mark.usefixtures("cpu_single_thread")

ALL_PROVIDERS = ["torch-loop", "torch-bucketed", "auto", "refresh-skip", "refresh-moved"]
ROUNDS_ALL = 2
ROUNDS_BUCKET = 5


@functools.lru_cache(maxsize=2)
def _previous(model):
    """Eigenvectors of the model's factors (what the previous decomposition left)."""
    return {n: torch.linalg.eigh(s)[1] for n, s in model_factors(model).items()}


@functools.lru_cache(maxsize=2)
def _moved(model):
    """The factors after a 5% running-average step towards fresh estimates."""
    return {n: 0.95 * s + 0.05 * spd_stack(n, s.shape[0], s.dtype, seed=1)
            for n, s in model_factors(model).items()}


@pytest.mark.parametrize("provider", ALL_PROVIDERS)
@pytest.mark.parametrize("model", SELECTED_MODELS)
def test_symeig_all_factors(benchmark, model, provider):
    stacks = model_factors(model)
    prev = _previous(model) if provider.startswith("refresh") else None
    inputs = _moved(model) if provider == "refresh-moved" else stacks

    def run():
        out = {}
        for n, s in inputs.items():
            if provider == "torch-loop":
                res = [torch.linalg.eigh(s[i]) for i in range(s.shape[0])]
                out[n] = (torch.stack([r[0] for r in res]), torch.stack([r[1] for r in res]))
            elif provider == "torch-bucketed":
                out[n] = torch.linalg.eigh(s)
            elif provider == "auto":
                out[n] = ops.symeig(s)
            else:
                out[n] = ops.symeig(s, method="refresh", prev_eigenvectors=prev[n])
        sync()
        return out

    out = pedantic(benchmark, run, ROUNDS_ALL)
    resid = max(eig_residual(inputs[n], *out[n]) for n in inputs)
    benchmark.extra_info.update({"op": "symeig", "case": stacks_case(model, stacks),
                            "provider": provider, "baseline": provider == "torch-loop",
                            "target": None if provider == "torch-loop" else 10,
                            "metric": f"residual {fmt(resid)}"})  # in place: the stats hold this dict
    if ON_GPU and provider not in ("torch-loop", "torch-bucketed"):
        assert resid <= 1e-4, f"{provider}: eigenvector residual {resid:.2e} above 1e-4"


BUCKET_PROVIDERS = ["torch-loop", "torch-batched", "cuda-jacobi", "cuda-jacobi-warm", "cupy-syevj"]
# (n, count): the Jacobi-sized buckets of the two models (ResNet-50: 12 x 64, 12 x 128, 1 x 147)
# and two small synthetic ones (per-head or small-MLP factors) where cuSOLVER's syevjBatched applies.
BUCKETS = [(32, 256), (16, 1024), (64, 12), (128, 12), (147, 1)]


@pytest.mark.parametrize("provider", BUCKET_PROVIDERS)
@pytest.mark.parametrize("n, count", BUCKETS, ids=[f"n{n}x{c}" for n, c in BUCKETS])
def test_symeig_bucket(benchmark, n, count, provider):
    case = f"bucket n={n} x {count}, fp32"
    n = scaled(n) if n > 32 else n
    case += "" if ON_GPU else f" (CPU smoke: n={n})"
    s = spd_stack(n, count)
    if provider.startswith("cuda"):
        require_backend("cuda")
        if n > smem_limit("jacobi"):
            pytest.skip(f"n={n} beyond the Jacobi kernel's shared memory on this device")
    if provider == "cupy-syevj":
        require_backend("cupy")
        if n > 32:
            pytest.skip("cuSOLVER syevjBatched handles n <= 32")
    prev = torch.linalg.eigh(s)[1]
    inp = 0.95 * s + 0.05 * spd_stack(n, count, seed=2) if provider == "cuda-jacobi-warm" else s

    def run():
        if provider == "torch-loop":
            res = [torch.linalg.eigh(inp[i]) for i in range(count)]
            out = (torch.stack([r[0] for r in res]), torch.stack([r[1] for r in res]))
        elif provider == "torch-batched":
            out = torch.linalg.eigh(inp)
        elif provider == "cuda-jacobi":
            out = ops.symeig(inp, method="jacobi", backend="cuda")
        elif provider == "cuda-jacobi-warm":
            out = ops.symeig(inp, method="jacobi", prev_eigenvectors=prev, backend="cuda")
        else:
            out = ops.symeig(inp, method="jacobi", backend="cupy")
        sync()
        return out

    lam, q = pedantic(benchmark, run, ROUNDS_BUCKET)
    benchmark.extra_info.update({"op": "symeig", "case": case,
                            "provider": provider, "baseline": provider == "torch-loop",
                            "metric": f"residual {fmt(eig_residual(inp, lam, q))}"})  # in place: the stats hold this dict

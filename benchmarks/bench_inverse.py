"""damped_inverse, (F + gamma I)^{-1}, over every K-FAC factor of ResNet-50 and a 12-layer
GPT-2-small (kfac_factor_sizes.py) and over single size buckets.

Providers: ``torch-loop`` (the baseline: torch.linalg.cholesky + torch.cholesky_inverse per factor),
``torch-bucketed`` (the same, batched per size bucket), ``auto`` (kfac_kernels.ops.damped_inverse:
the dispatch policy's choice per bucket), ``cuda`` (the CUDA kernels on every bucket: shared-memory
variant where n fits, tiled beyond); on single buckets ``cuda-smem`` and ``cuda-blocked``.
"metric": the largest relative error against an fp64 inverse. gamma = 1e-3.

GPU: ~20 s on an H100. CPU: sizes / 64, smoke only.
"""
from __future__ import annotations

import pytest
import torch

from decomp_bench_util import (cpu_single_thread,  # noqa: F401 (fixture)
                               ON_GPU, SELECTED_MODELS, fmt, inverse_error, model_factors,
                               pedantic, require_backend, scaled, smem_limit, spd_stack,
                               stacks_case, sync)
from kfac_kernels import ops

pytestmark = pytest.mark.usefixtures("cpu_single_thread")

DAMPING = 1e-3
ROUNDS_ALL = 3
ROUNDS_BUCKET = 5


def _torch_inverse(f):
    eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(f + DAMPING * eye))


def _cuda_inverse(f, variant):
    from kfac_kernels.ops.cuda.damped_inverse import damped_inverse

    return damped_inverse(f, DAMPING, variant=variant)


@pytest.mark.parametrize("provider", ["torch-loop", "torch-bucketed", "auto", "cuda"])
@pytest.mark.parametrize("model", SELECTED_MODELS)
def test_inverse_all_factors(benchmark, model, provider):
    if provider == "cuda":
        require_backend("cuda")
    stacks = model_factors(model)
    limit = smem_limit("inverse")

    def run():
        out = {}
        for n, s in stacks.items():
            if provider == "torch-loop":
                out[n] = torch.stack([_torch_inverse(s[i]) for i in range(s.shape[0])])
            elif provider == "torch-bucketed":
                out[n] = _torch_inverse(s)
            elif provider == "auto":
                out[n] = ops.damped_inverse(s, DAMPING)
            else:
                out[n] = _cuda_inverse(s, "smem" if n <= limit else "blocked")
        sync()
        return out

    out = pedantic(benchmark, run, ROUNDS_ALL)
    err = max(inverse_error(stacks[n], DAMPING, out[n]) for n in stacks)
    benchmark.extra_info.update({"op": "damped_inverse", "case": stacks_case(model, stacks),
                            "provider": provider, "baseline": provider == "torch-loop",
                            "metric": f"max rel err {fmt(err)}"})  # in place: the stats hold this dict


BUCKETS = [(64, 12), (128, 12), (256, 26), (512, 19), (1024, 14)]


@pytest.mark.parametrize("provider", ["torch-loop", "torch-batched", "cuda-smem", "cuda-blocked"])
@pytest.mark.parametrize("n, count", BUCKETS, ids=[f"n{n}x{c}" for n, c in BUCKETS])
def test_inverse_bucket(benchmark, n, count, provider):
    case = f"bucket n={n} x {count}, fp32"
    n = scaled(n)
    case += "" if ON_GPU else f" (CPU smoke: n={n})"
    if provider.startswith("cuda"):
        require_backend("cuda")
        if provider == "cuda-smem" and n > smem_limit("inverse"):
            pytest.skip(f"n={n} beyond the shared-memory kernel on this device")
    s = spd_stack(n, count)

    def run():
        if provider == "torch-loop":
            out = torch.stack([_torch_inverse(s[i]) for i in range(count)])
        elif provider == "torch-batched":
            out = _torch_inverse(s)
        else:
            out = _cuda_inverse(s, provider.split("-")[1])
        sync()
        return out

    inv = pedantic(benchmark, run, ROUNDS_BUCKET)
    benchmark.extra_info.update({"op": "damped_inverse", "case": case,
                            "provider": provider, "baseline": provider == "torch-loop",
                            "metric": f"max rel err {fmt(inverse_error(s, DAMPING, inv))}"})  # in place: the stats hold this dict

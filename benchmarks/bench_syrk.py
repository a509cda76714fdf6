"""ema_factor_update (syrk) on the Triton backend against the best plain-torch ways.

Target (benchmarks/README.md, "Performance targets"): >= 1.8x over ``factor.mul_(decay).addmm_(x.T, x, alpha=...)`` for n = 65536
rows, d in {1024, 4096}, bf16 x (fp32 factor); >= 70% of peak HBM bandwidth for d <= 256.

``addmm_`` needs x in the factor's dtype, so the torch baselines are the two ways plain torch
does this with bf16 x and an fp32 factor: ``torch-mm-fp32out`` (bf16 GEMM with fp32 output,
``torch.mm(x.T, x, out_dtype=torch.float32)``, then ``mul_``/``add_``; an fp32 upcast where this
torch lacks out_dtype) and ``torch-mm-bf16out`` (``x.T @ x`` rounded to bf16, then added: less
accurate, the fastest plain-torch form). Both are marked baseline; the ratio is against the faster.
"metric" of the bandwidth cases: bytes moved (x once, the factor read and written) / median time.

GPU: ~20 s. CPU (interpreter): tiny sizes, smoke only (--benchmark-disable).
"""
import pytest
import torch

from _triton_bench import (CUDA, DEVICE, median_seconds, mm_fp32_out, peak_bandwidth_gbs,
                           run_benchmark, skip_unless_triton)

import kfac_kernels.ops as ops

DECAY = 0.95
PROVIDERS = ["triton", "torch-mm-fp32out", "torch-mm-bf16out"]
X_DTYPE = torch.bfloat16 if CUDA else torch.float32   # the interpreter mis-computes bf16


def _fn(provider, factor, x):
    n = x.shape[0]
    alpha = (1.0 - DECAY) / n
    if provider == "triton":
        return lambda: ops.ema_factor_update(factor, x, DECAY, backend="triton")
    if provider == "torch-mm-fp32out":
        return lambda: factor.mul_(DECAY).add_(mm_fp32_out(x.T, x), alpha=alpha)
    return lambda: factor.mul_(DECAY).add_(x.T @ x, alpha=alpha)


def _setup(n, d):
    torch.manual_seed(0)
    x = torch.randn(n, d, device=DEVICE).to(X_DTYPE)
    f = torch.randn(d, d, device=DEVICE)
    return (f + f.T) / 2, x


def _skip(provider):
    if provider == "triton":
        skip_unless_triton()


LARGE = [(65536, 1024), (65536, 4096)] if CUDA else [(96, 40)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n,d", LARGE, ids=[f"n{n}-d{d}" for n, d in LARGE])
def test_syrk_large(benchmark, n, d, provider):
    _skip(provider)
    f, x = _setup(n, d)
    run_benchmark(benchmark, _fn(provider, f, x), {
        "op": "ema_factor_update", "case": f"n={n} d={d} x {str(X_DTYPE)[6:]}, fp32 factor",
        "provider": provider, "baseline": provider != "triton",
        "target": 1.8 if provider == "triton" else None})


SMALL = [(65536, 64), (65536, 128), (65536, 256)] if CUDA else [(128, 24)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n,d", SMALL, ids=[f"n{n}-d{d}" for n, d in SMALL])
def test_syrk_bandwidth(benchmark, n, d, provider):
    _skip(provider)
    f, x = _setup(n, d)
    run_benchmark(benchmark, _fn(provider, f, x), {
        "op": "ema_factor_update", "case": f"n={n} d={d} x {str(X_DTYPE)[6:]} (bandwidth)",
        "provider": provider, "baseline": provider != "triton"})
    t = median_seconds(benchmark)
    peak = peak_bandwidth_gbs()
    if t:
        moved = x.numel() * x.element_size() + 2 * f.numel() * f.element_size()
        gbs = moved / t / 1e9
        pct = f" = {100 * gbs / peak:.0f}% of {peak:.0f} GB/s peak (target 70%)" if peak else ""
        benchmark.extra_info["metric"] = f"{gbs:.0f} GB/s{pct}"

"""newton_schulz (Muon's orthogonalisation) on the Triton backend against plain torch matmuls.

Target (benchmarks/README.md, "Performance targets"): >= 1.3x over the plain-matmul iteration,
bf16, square n x n with n in {768, 1024, 3072, 4096}, on one H100/H200. The kernel computes both
Gram products (``A = Y Y^T`` and ``A^2``) on upper-triangle tiles only: an iteration costs
``n^3 / 2 + n^3 / 2 + n^3`` multiply-adds against ``3 n^3`` for three full GEMMs, so 1.5x is the
limit for square matrices. Baseline ``torch-matmul``: the same iteration in batched torch
(``bmm`` for ``Y Y^T``, ``baddbmm`` for ``b A + c A A`` and ``a Y + B Y``, bf16 as
``torch.optim.Muon``), normalisation included in both. Also the GPT-2 small MLP stack
[12, 768, 3072] (one call for twelve matrices).

GPU: ~15 s. CPU (interpreter): one tiny fp32 case, smoke only (--benchmark-disable).
"""
import pytest
import torch

from _triton_bench import CUDA, DEVICE, run_benchmark, skip_unless_triton

import kfac_kernels.ops as ops
from kfac_kernels.ops.reference import NS_COEFFICIENTS

PROVIDERS = ["triton", "torch-matmul"]
W = torch.bfloat16 if CUDA else torch.float32   # the interpreter mis-computes bf16


def plain(X, steps=5, coef=NS_COEFFICIENTS, eps=1e-7):
    """The plain-matmul iteration (wide orientation, batched)."""
    a, b, c = coef
    Y = X.to(W)
    if Y.shape[-2] > Y.shape[-1]:
        Y = Y.transpose(-1, -2)
    Y = Y / torch.linalg.vector_norm(Y, dim=(-2, -1), keepdim=True).clamp_min(eps)
    for _ in range(steps):
        A = torch.bmm(Y, Y.transpose(-1, -2))
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        Y = torch.baddbmm(Y, B, Y, beta=a)
    return Y


CASES = ([(1, 768, 768), (1, 1024, 1024), (1, 3072, 3072), (1, 4096, 4096), (12, 768, 3072)]
         if CUDA else [(2, 33, 40)])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", CASES, ids=["x".join(map(str, s)) for s in CASES])
def test_newton_schulz(benchmark, shape, provider):
    if provider == "triton":
        skip_unless_triton()
    torch.manual_seed(0)
    X = torch.randn(shape, device=DEVICE).to(W)
    if provider == "triton":
        def fn():
            return ops.newton_schulz(X, dtype=W, backend="triton")
    else:
        def fn():
            return plain(X)
    run_benchmark(benchmark, fn, {
        "op": "newton_schulz", "case": f"X{list(shape)} {str(W)[6:]}, 5 steps",
        "provider": provider, "baseline": provider != "triton",
        "target": 1.3 if provider == "triton" and shape[0] == 1 else None})

"""Kronecker preconditioning over a 12-layer GPT-2 small on the Triton backend.

Target (benchmarks/README.md, "Performance targets"): >= 2x over a per-layer torch loop. The layers (V = [out, in + 1], bias as
the homogeneous column): attention c_attn 2304 x 769, attention c_proj 768 x 769, MLP c_fc
3072 x 769, MLP c_proj 768 x 3073, twelve of each, fp32 gradients and eigenbases, damping 1e-3,
with the <U, V> needed by KL clipping (``return_dot``).
Providers: ``torch-loop`` (baseline: the reference formula layer by layer), ``torch-batched``
(the reference on each stack of 12 same-shaped layers), ``triton`` (one stack per launch), and
``triton-tf32`` (torch's fp32 matmul precision set to TF32, which the backend follows:
TF32 tensor cores, ~1e-3 error).
The eigen form (``kron_precondition_eigen``) is timed; "metric": relative error against fp64.

GPU: ~40 s. CPU (interpreter): tiny shapes, smoke only (--benchmark-disable).
"""
import contextlib

import pytest
import torch

from _triton_bench import CUDA, DEVICE, run_benchmark, skip_unless_triton, tf32_matmul

import kfac_kernels.ops as ops
from kfac_kernels.ops import reference

LAYERS = 12 if CUDA else 2
SHAPES = ([(2304, 769), (768, 769), (3072, 769), (768, 3073)] if CUDA else [(9, 5), (4, 6)])
DAMPING = 1e-3


def _stacks():
    torch.manual_seed(0)
    out = []
    for m, n in SHAPES:
        def sym_eig(k):
            a = torch.randn(LAYERS, k, k, device=DEVICE)
            return torch.linalg.eigh(a @ a.transpose(1, 2) / k)
        lamG, QG = sym_eig(m)
        lamA, QA = sym_eig(n)
        V = torch.randn(LAYERS, m, n, device=DEVICE)
        out.append((V, QG, lamG, QA, lamA))
    return out


@pytest.mark.parametrize("provider", ["triton", "triton-tf32", "torch-batched", "torch-loop"])
def test_kron_gpt2_small(benchmark, provider):
    if provider.startswith("triton"):
        skip_unless_triton()
    if provider == "triton-tf32" and not CUDA:
        pytest.skip("TF32 exists on CUDA devices only")
    with (tf32_matmul() if provider == "triton-tf32" else contextlib.nullcontext()):
        _bench(benchmark, provider)


def _bench(benchmark, provider):
    stacks = _stacks()

    def run():
        res = []
        for V, QG, lamG, QA, lamA in stacks:
            if provider.startswith("triton"):
                res.append(ops.kron_precondition_eigen(V, QG, lamG, QA, lamA, DAMPING,
                                                       return_dot=True, backend="triton"))
            elif provider == "torch-batched":
                res.append(reference.kron_precondition_eigen(V, QG, lamG, QA, lamA, DAMPING,
                                                             return_dot=True))
            else:
                us, dots = [], []
                for i in range(V.shape[0]):
                    u, d = reference.kron_precondition_eigen(V[i], QG[i], lamG[i], QA[i], lamA[i],
                                                             DAMPING, return_dot=True)
                    us.append(u)
                    dots.append(d)
                res.append((us, dots))
        return res

    run_benchmark(benchmark, run, {
        "op": "kron_precondition_eigen",
        "case": f"GPT-2 small x{LAYERS} layers, {len(SHAPES)} stacks {SHAPES}, fp32, return_dot",
        "provider": provider, "baseline": provider == "torch-loop",
        "target": 2.0 if provider.startswith("triton") else None})
    V, QG, lamG, QA, lamA = stacks[0]
    got = run()[0]
    U = got[0] if provider != "torch-loop" else torch.stack(got[0])
    ref, _ = reference.kron_precondition_eigen(V.double(), QG.double(), lamG.double(),
                                               QA.double(), lamA.double(), DAMPING,
                                               return_dot=True)
    err = ((U.double() - ref).norm() / ref.norm()).item()
    benchmark.extra_info["metric"] = f"rel err vs fp64 {err:.1e} (first stack)"

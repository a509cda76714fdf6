"""Shared pieces of the Triton backend tests (imported by tests/ops/triton/test_triton_*.py).

On a machine without CUDA the kernels run under Triton's interpreter on CPU tensors (conftest.py
switches it on before triton is imported); with CUDA the same tests run the compiled kernels on
the GPU. Every buffer the launchers allocate is filled with NaN first (``poison``), so an element
a kernel fails to write cannot pass for a correct one.
"""
import pytest
import torch

from helpers import TF32, sum_tol

triton = pytest.importorskip("triton", reason="triton is not installed")

from kfac_kernels.ops.triton import probe, tf32_matmul  # noqa: E402,F401

OK, WHY = probe()
requires_triton = pytest.mark.skipif(not OK, reason=f"triton backend unavailable: {WHY}")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# docs/math.md, "Accuracy of the kernel ops": relative Frobenius error against the float64 reference
TOL_FP32 = 1e-5
TOL_TF32 = 3e-3
TOL_BF16 = 2e-2
TOL_FP64 = 1e-12
# an fp16 output is exact up to one rounding: unit roundoff 2^-11, plus the fp32 math
TOL_FP16_OUT = 2.0**-11 + TOL_FP32

# How a kernel's arithmetic relates to the float64 reference, for the derived bound of products
# (helpers.sum_tol, tests/README.md): the accumulation dtype, a rounding of the inputs the
# reference does not see, a rounding of the output.
MATH = {"fp64": dict(acc=torch.float64), "fp32": dict(acc=torch.float32),
        "tf32": dict(acc=torch.float32, inputs=TF32),             # matrix units round x to TF32
        "bf16-data": dict(acc=torch.float32, inputs=torch.bfloat16),  # reference on unrounded data
        "fp32-fp16-out": dict(acc=torch.float32, out=torch.float16)}  # fp32 math, fp16 result


def abs_call(fn, *args, **kwargs):
    """``fn`` run on the absolute values of every tensor and number argument (cloned): for a
    sum of products that is ``|A||B|``, the scale of the rounding error bound."""
    def a(v):
        if isinstance(v, torch.Tensor):
            return v.abs().clone()
        if isinstance(v, float):
            return abs(v)
        return v
    return fn(*[a(v) for v in args], **{k: a(v) for k, v in kwargs.items()})


def products_tol(ref, ref_abs, terms, math) -> float:
    """The error bound ``gamma_terms ||ref_abs|| / ||ref||`` (plus input rounding) for ``math``,
    a key of MATH (or a float: a fixed tolerance, used as given)."""
    if isinstance(math, float):
        return math
    return sum_tol(ref, ref_abs, terms, **MATH[math])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    nb = b.norm().item()
    return (a - b).norm().item() / (nb if nb > 0 else 1.0)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    from kfac_kernels.ops.triton import _common

    monkeypatch.setattr(_common, "POISON", True)
    yield


def sym(d, batch=None, dtype=torch.float32, device=DEVICE):
    shape = (d, d) if batch is None else (batch, d, d)
    a = torch.randn(shape, dtype=torch.float64)
    return (a + a.transpose(-1, -2)).to(dtype).to(device)



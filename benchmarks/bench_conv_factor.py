"""conv_input_factor on the Triton backend (implicit im2col) against unfold + matmul.

Target (benchmarks/README.md, "Performance targets"): >= 2x over unfold + matmul for the 3x3 convolutions of ResNet-50, with peak
extra memory no larger than the input. Cases: the four 3x3 stages of ResNet-50 (batch 32, bf16,
stride 1, padding 1; C = 64/128/256/512 at 56/28/14/7), input in NCHW and channels_last.
Baseline ``torch-unfold``: ``F.unfold`` -> patch rows -> one GEMM with fp32 output (bf16 inputs,
fp32 accumulation, ``torch.mm(..., out_dtype=torch.float32)`` where available) / rows.
"metric": peak memory each provider allocates beyond its inputs, excluding the returned factor
(C*9)^2 * 4 bytes, as a multiple of the input's size (target <= 1x), and the factor's size.

GPU: ~30 s. CPU (interpreter): one tiny case, smoke only (--benchmark-disable).
"""
import pytest
import torch

from _triton_bench import (CUDA, DEVICE, mm_fp32_out, peak_extra_memory, run_benchmark,
                           skip_unless_triton)

import kfac_kernels.ops as ops

DTYPE = torch.bfloat16 if CUDA else torch.float32     # the interpreter mis-computes bf16
LAYERS = ([(32, 64, 56), (32, 128, 28), (32, 256, 14), (32, 512, 7)] if CUDA
          else [(2, 4, 6)])


def _unfold_factor(x):
    cols = torch.nn.functional.unfold(x, 3, padding=1)          # [N, C*9, L]
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])       # [N*L, C*9]
    return mm_fp32_out(rows.T, rows).div_(rows.shape[0])


@pytest.mark.parametrize("provider", ["triton", "torch-unfold"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("N,C,hw", LAYERS, ids=[f"C{c}-{h}x{h}" for _, c, h in LAYERS])
def test_conv_factor_resnet50(benchmark, N, C, hw, layout, provider):
    if provider == "triton":
        skip_unless_triton()
    torch.manual_seed(0)
    x = torch.randn(N, C, hw, hw, device=DEVICE).to(DTYPE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if provider == "triton":
        fn = lambda: ops.conv_input_factor(x, 3, padding=1, backend="triton")  # noqa: E731
    else:
        fn = lambda: _unfold_factor(x)  # noqa: E731
    run_benchmark(benchmark, fn, {
        "op": "conv_input_factor", "case": f"ResNet-50 3x3 C={C} {hw}x{hw} N={N} "
                                          f"{str(DTYPE)[6:]} {layout}",
        "provider": provider, "baseline": provider != "triton",
        "target": 2.0 if provider == "triton" else None})
    extra = peak_extra_memory(fn)
    if extra is not None:
        out_bytes = (C * 9) ** 2 * 4
        in_bytes = x.numel() * x.element_size()
        benchmark.extra_info["metric"] = (
            f"peak extra {(extra - out_bytes) / 2**20:.1f} MiB = "
            f"{(extra - out_bytes) / in_bytes:.2f}x input ({in_bytes / 2**20:.1f} MiB; "
            f"target <= 1x), + factor {out_bytes / 2**20:.1f} MiB")

"""Helpers of the Triton kernel benchmarks (bench_syrk.py, bench_conv_factor.py, bench_kron.py).

GPU sizes when CUDA is present; tiny sizes on CPU, where Triton runs under its interpreter, so the
files still run as smoke tests (``--benchmark-disable``). Timed functions synchronise the device;
every provider is called before timing so compilation and autotuning are never timed.
"""
import pytest
import torch

from kfac_kernels.ops.triton import tf32_matmul  # noqa: F401  (re-exported for bench_kron)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def triton_ok():
    try:
        from kfac_kernels.ops.triton import probe
    except Exception as exc:  # pragma: no cover
        return False, f"{type(exc).__name__}: {exc}"
    return probe()


def skip_unless_triton():
    ok, why = triton_ok()
    if not ok:
        pytest.skip(f"triton backend unavailable: {why}")


def sync():
    if CUDA:
        torch.cuda.synchronize()


def run_benchmark(benchmark, fn, info, warmup=2):
    """Warm up ``fn`` (compiles), then time it with a device synchronisation inside."""
    for _ in range(warmup):
        fn()
    sync()
    benchmark.extra_info.update(info)

    def timed():
        fn()
        sync()

    benchmark(timed)


def median_seconds(benchmark):
    """Median of the timed runs, or None with --benchmark-disable."""
    try:
        return float(benchmark.stats.stats.median)
    except Exception:
        return None


def peak_bandwidth_gbs():
    """Peak HBM bandwidth of the current GPU in GB/s (from its memory clock and bus width)."""
    if not CUDA:
        return None
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz = getattr(p, "memory_clock_rate", None)
    bus_bits = getattr(p, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    name = torch.cuda.get_device_name()
    for key, gbs in (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
                     ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0)):
        if key in name:
            return gbs
    return None


def peak_extra_memory(fn):
    """Peak bytes allocated by ``fn`` beyond what was allocated before it ran (GPU only)."""
    if not CUDA:
        return None
    sync()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    sync()
    extra = torch.cuda.max_memory_allocated() - before
    del out
    return extra


def mm_fp32_out(a, b):
    """a @ b with fp32 output for 16-bit inputs (fp32 accumulation), the best plain-torch way:
    torch.mm(..., out_dtype=torch.float32) where this torch has it on CUDA, else an upcast."""
    if a.dtype == torch.float32:
        return a @ b
    if CUDA:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return a.float() @ b.float()



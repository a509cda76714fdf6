"""kfac_kernels._C without a GPU: it compiles for sm_80 and sm_90 without register spills (and the
ptxas figures are written to benchmarks/results/compile_report_cuda.md), it imports, its argument
checks raise clear errors before any device is touched, and its kernels - run on the CPU by the
host emulation of the block-execution model (csrc/exec.cuh) - compute the right thing, with no
intra-phase data race (every phase run forward and reversed gives bit-identical results).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import _cuda_twins as twins
import cext_build as cb
from kfac_kernels.ops import reference

ROOT = Path(__file__).resolve().parents[3]
REPORT = ROOT / "benchmarks" / "results" / "compile_report_cuda.md"
ARCH_LIST = ("sm_80", "sm_90")
TYPE_COMBOS = ("float,float", "float,double", "double,double")
EXPECTED_KERNELS = (
    {f"inverse_smem_kernel<{c}>" for c in TYPE_COMBOS}
    | {f"blocked_{k}_kernel<{c}>" for k in ("potrf", "trsm", "syrk", "trtri", "lauum")
       for c in TYPE_COMBOS}
    | {"blocked_init_kernel<float>", "blocked_init_kernel<double>",
       "jacobi_eigh_kernel<float>", "jacobi_eigh_kernel<double>"})
# A100 (sm_80) and H100/H200 (sm_90) opt-in shared memory per block, bytes
SMEM_OPTIN = {"A100 (sm_80)": 166912, "H100/H200 (sm_90)": 232448}


@pytest.fixture(scope="module")
def build():
    try:
        return cb.build()
    except cb.BuildSkipped as exc:
        pytest.skip(str(exc))
    except cb.BuildFailed as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def C(build):
    return build.load()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference ops here are tiny: threads only add overhead
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- compile report
def _max_n(C, fn, limit):
    n = 0
    while n < 4096 and fn(n + 1) <= limit:
        n += 1
    return n


def _write_report(build, table, C):
    lines = [
        "# Compile report: kfac_kernels._C",
        "",
        "Written by `tests/ops/cuda/test_cext.py::test_ptxas_report_has_no_spills` from `ptxas -v` "
        f"(CMake Release build, `-lineinfo`, CMAKE_CUDA_ARCHITECTURES={cb.ARCHS}; "
        f"{build.nvcc_version}). Every kernel of csrc/ is listed; a spill fails the test.",
        "Shared memory is dynamic (sized per launch), so ptxas reports 0 static bytes: the table "
        "after this one gives the per-block figures.",
        "",
        "| kernel | arch | registers | spill stores (B) | spill loads (B) | stack frame (B) "
        "| static smem (B) | barriers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(table):
        for arch in ARCH_LIST:
            k = table[name].get(arch)
            if k is None:
                lines.append(f"| {name} | {arch} | missing | | | | | |")
                continue
            lines.append(f"| {name} | {arch} | {k.registers} | {k.spill_stores} | "
                         f"{k.spill_loads} | {k.stack} | {k.static_smem} | {k.barriers} |")
    lines += [
        "",
        "## Dynamic shared memory per block (from `_C.smem_bytes_*`)",
        "",
        "| kernel | bytes at n = 64 | bytes at n = 128 | "
        + " | ".join(f"max n, {dev}" for dev in SMEM_OPTIN) + " |",
        "|---|---|---|" + "---|" * len(SMEM_OPTIN),
    ]
    rows = [
        ("inverse_smem_kernel<float,double>", lambda n: C.smem_bytes_inverse(0, True, n, 0)),
        ("inverse_smem_kernel<float,float>", lambda n: C.smem_bytes_inverse(0, False, n, 0)),
        ("inverse_smem_kernel<double,double>", lambda n: C.smem_bytes_inverse(1, True, n, 0)),
        ("jacobi_eigh_kernel<float>", lambda n: C.smem_bytes_jacobi(0, n)),
        ("jacobi_eigh_kernel<double>", lambda n: C.smem_bytes_jacobi(1, n)),
    ]
    for name, fn in rows:
        lines.append(f"| {name} | {fn(64)} | {fn(128)} | "
                     + " | ".join(str(_max_n(C, fn, lim)) for lim in SMEM_OPTIN.values()) + " |")
    for name, fp64acc, code in (("float,double", True, 0), ("float,float", False, 0),
                                ("double,double", True, 1)):
        b = C.smem_bytes_inverse(code, fp64acc, 1000, 1)
        lines.append(f"| blocked_*_kernel<{name}> (any n, 32 x 32 tiles) | {b} | {b} | "
                     + " | ".join("any" for _ in SMEM_OPTIN) + " |")
    lines.append("")
    text = "\n".join(lines)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    if not REPORT.exists() or REPORT.read_text() != text:
        REPORT.write_text(text)


def test_ptxas_report_has_no_spills(build, C):
    usage = cb.parse_ptxas(build.log)
    table = cb.group_usage(usage)
    _write_report(build, table, C)
    assert set(table) == EXPECTED_KERNELS, "kernels in the ptxas report differ from the expected set"
    for name, per_arch in table.items():
        assert set(per_arch) == set(ARCH_LIST), f"{name} compiled for {sorted(per_arch)}"
        for arch, k in per_arch.items():
            assert k.registers > 0, f"no register count parsed for {name} {arch}"
            assert k.spill_stores == 0 and k.spill_loads == 0, (
                f"{name} on {arch} spills: {k.spill_stores} B stored, {k.spill_loads} B loaded "
                f"({k.registers} registers)")


def test_parse_ptxas_reads_spills():
    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 48 bytes smem, 400 bytes cmem[0]\n")
    (k,) = cb.parse_ptxas(log)
    assert (k.arch, k.registers, k.stack, k.spill_stores, k.spill_loads, k.static_smem,
            k.barriers) == ("sm_90", 255, 24, 8, 12, 48, 1)


# ----------------------------------------------------------------------------- import, checks
def test_module_imports_without_gpu(C):
    info = C.build_info()
    assert "archs=80,90" in info and "static" in info
    assert (C.FLOAT32, C.FLOAT64, C.VARIANT_SMEM, C.VARIANT_BLOCKED) == (0, 1, 0, 1)
    # the shared-memory formulas need no device either
    assert C.smem_bytes_jacobi(0, 64) < C.smem_bytes_jacobi(0, 128) < C.smem_bytes_jacobi(1, 128)


def _inv_args(**over):
    # plausible, aligned fake addresses: the checks must reject bad arguments before any access
    args = dict(F=4096, f_stride_b=64, f_stride_r=8, out=8192, work=0, info=16384, gamma=0,
                gamma_stride=0, gamma_scalar=0.1, batch=2, n=8, dtype=0, variant=0,
                fp64_accumulate=True)
    args.update(over)
    return args


def _eigh_args(**over):
    args = dict(F=4096, f_stride_b=64, f_stride_r=8, Q0=0, q_stride_b=0, q_stride_r=0,
                evals=8192, evecs=12288, info=16384, sweeps=0, batch=2, n=8, dtype=0, tol=1e-6,
                max_sweeps=15)
    args.update(over)
    return args


INVERSE_ERRORS = [
    (dict(F=0), "F is a null pointer"),
    (dict(out=0), "out is a null pointer"),
    (dict(info=0), "info is a null pointer"),
    (dict(variant=1, work=0), "work is a null pointer"),
    (dict(F=4098), "F = 4098 is not aligned to 4 bytes"),
    (dict(dtype=1, F=4100), "F = 4100 is not aligned to 8 bytes"),
    (dict(info=16386), "not aligned to 4 bytes"),
    (dict(F=-8), "is not a valid address"),
    (dict(n=0), "n must be >= 1"),
    (dict(n=-3), "n must be >= 1"),
    (dict(batch=-1), "batch must be >= 0"),
    (dict(batch=2 ** 31), "batch must be < 2^31"),
    (dict(dtype=2), "dtype code 2 is not supported"),
    (dict(variant=7), "variant 7 is not supported"),
    (dict(f_stride_r=7), "row stride (leading dimension) 7 < n = 8"),
    (dict(f_stride_b=32), "batch stride 32 makes matrices overlap"),
    (dict(f_stride_b=-64), "batch stride must be >= 0"),
    (dict(gamma=20480, gamma_stride=2), "gamma_stride must be 0 or 1"),
    (dict(gamma_scalar=-1.0), "gamma_scalar must be finite and >= 0"),
    (dict(gamma_scalar=float("nan")), "gamma_scalar must be finite and >= 0"),
    (dict(variant=1, work=8192), "out and work must be different buffers"),
]

EIGH_ERRORS = [
    (dict(F=0), "F is a null pointer"),
    (dict(evals=0), "evals is a null pointer"),
    (dict(evecs=0), "evecs is a null pointer"),
    (dict(info=0), "info is a null pointer"),
    (dict(Q0=4097, q_stride_b=64, q_stride_r=8), "Q0 = 4097 is not aligned"),
    (dict(Q0=20480, q_stride_b=64, q_stride_r=4), "Q0: row stride (leading dimension) 4 < n = 8"),
    (dict(n=0), "n must be >= 1"),
    (dict(n=5000, f_stride_r=5000, f_stride_b=25_000_000), "beyond any one-block Jacobi kernel"),
    (dict(dtype=-1), "dtype code -1 is not supported"),
    (dict(tol=0.0), "tol must be in (0, 1)"),
    (dict(tol=float("inf")), "tol must be in (0, 1)"),
    (dict(max_sweeps=0), "max_sweeps must be in [1, 10000]"),
    (dict(f_stride_r=3), "row stride (leading dimension) 3 < n = 8"),
]


@pytest.mark.parametrize("over, message", INVERSE_ERRORS)
def test_inverse_checks(C, over, message):
    with pytest.raises(ValueError, match="damped_inverse") as exc:
        C.emulate_damped_inverse(**_inv_args(**over))
    assert message in str(exc.value)
    # the device entry point runs the same checks first: ValueError, not a CUDA error
    with pytest.raises(ValueError) as exc:
        C.damped_inverse(**_inv_args(**over), device=0, stream=0)
    assert message in str(exc.value)


@pytest.mark.parametrize("over, message", EIGH_ERRORS)
def test_eigh_checks(C, over, message):
    with pytest.raises(ValueError, match="jacobi_eigh") as exc:
        C.emulate_jacobi_eigh(**_eigh_args(**over))
    assert message in str(exc.value)
    with pytest.raises(ValueError) as exc:
        C.jacobi_eigh(**_eigh_args(**over), device=0, stream=0)
    assert message in str(exc.value)


def test_device_and_stream_checks(C):
    with pytest.raises(ValueError, match="device index must be >= 0"):
        C.damped_inverse(**_inv_args(), device=-1, stream=0)
    with pytest.raises(ValueError, match="stream must be a cudaStream_t"):
        C.jacobi_eigh(**_eigh_args(), device=0, stream=-5)
    with pytest.raises(TypeError):  # keyword-only, all arguments required
        C.jacobi_eigh(4096)


def test_empty_batch_is_a_no_op(C):
    C.emulate_damped_inverse(**_inv_args(batch=0))
    C.emulate_jacobi_eigh(**_eigh_args(batch=0))


# ----------------------------------------------------------------------------- host emulation
def _spd(bsz, n, dtype, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, n, 2 * n + 1, generator=g, dtype=torch.float64)
    f = x @ x.transpose(-1, -2) / (2 * n + 1) + shift * torch.eye(n, dtype=torch.float64)
    return f.to(dtype)


def emulate_inverse(C, f, damping, variant, fp64_accumulate=True, reverse=False):
    f = f.contiguous()
    bsz, n = f.shape[0], f.shape[-1]
    out = torch.full_like(f, 7.0)
    work = torch.full_like(f, 7.0)
    info = torch.full((bsz,), -9, dtype=torch.int32)
    g = damping if isinstance(damping, torch.Tensor) else None
    C.emulate_damped_inverse(
        F=f.data_ptr(), f_stride_b=f.stride(0), f_stride_r=f.stride(1), out=out.data_ptr(),
        work=work.data_ptr(), info=info.data_ptr(), gamma=g.data_ptr() if g is not None else 0,
        gamma_stride=(1 if g is not None and g.dim() else 0),
        gamma_scalar=0.0 if g is not None else float(damping), batch=bsz, n=n,
        dtype=0 if f.dtype == torch.float32 else 1, variant=variant,
        fp64_accumulate=fp64_accumulate, reverse=reverse)
    return out, info


def emulate_eigh(C, f, q0=None, tol=None, max_sweeps=15, reverse=False):
    f = f.contiguous()
    bsz, n = f.shape[0], f.shape[-1]
    tol = (1e-6 if f.dtype == torch.float32 else 1e-13) if tol is None else tol
    lam = torch.full((bsz, n), 7.0, dtype=f.dtype)
    vec = torch.full_like(f, 7.0)
    info = torch.full((bsz,), -9, dtype=torch.int32)
    sweeps = torch.full((bsz,), -9, dtype=torch.int32)
    q0 = q0.contiguous() if q0 is not None else None
    C.emulate_jacobi_eigh(
        F=f.data_ptr(), f_stride_b=f.stride(0), f_stride_r=f.stride(1),
        Q0=q0.data_ptr() if q0 is not None else 0, q_stride_b=q0.stride(0) if q0 is not None else 0,
        q_stride_r=q0.stride(1) if q0 is not None else 0, evals=lam.data_ptr(),
        evecs=vec.data_ptr(), info=info.data_ptr(), sweeps=sweeps.data_ptr(), batch=bsz, n=n,
        dtype=0 if f.dtype == torch.float32 else 1, tol=tol, max_sweeps=max_sweeps,
        reverse=reverse)
    return lam, vec, info, sweeps


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


INV_TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", [0, 1], ids=["smem", "blocked"])
@pytest.mark.parametrize("n", [1, 2, 7, 33, 129])
def test_emulated_inverse_matches_reference(C, dtype, variant, n):
    f = _spd(3, n, dtype, seed=n)
    damping = torch.tensor([0.1, 0.0, 1.0], dtype=dtype)
    out, info = emulate_inverse(C, f, damping, variant)
    out_r, info_r = emulate_inverse(C, f, damping, variant, reverse=True)
    assert torch.equal(out, out_r) and torch.equal(info, info_r), "phase order changed the result"
    assert info.tolist() == [0, 0, 0]
    assert torch.equal(out, out.transpose(-1, -2)), "the inverse is not exactly symmetric"
    ref = reference.damped_inverse(f.double(), damping.double())
    assert _rel(out, ref) <= INV_TOL[dtype]
    # the torch twin of the same variant agrees to rounding
    twin = (twins.damped_inverse_twin if variant == 0 else twins.damped_inverse_blocked_twin)(
        f, damping)[0]
    assert _rel(out, twin) <= INV_TOL[dtype]


@pytest.mark.parametrize("variant", [0, 1], ids=["smem", "blocked"])
def test_emulated_inverse_fp32_accumulation_switch(C, variant):
    f = _spd(2, 40, torch.float32, seed=3, shift=1e-3)
    ref = reference.damped_inverse(f.double(), 1e-3)
    wide = _rel(emulate_inverse(C, f, 1e-3, variant, fp64_accumulate=True)[0], ref)
    narrow = _rel(emulate_inverse(C, f, 1e-3, variant, fp64_accumulate=False)[0], ref)
    torch_fp32 = _rel(reference.damped_inverse(f, 1e-3), ref)
    assert narrow <= 4 * torch_fp32 + 1e-6  # plain fp32 accumulation: as good as torch's fp32
    assert wide <= narrow * 1.01  # fp64 dot products do not make it worse


@pytest.mark.parametrize("variant", [0, 1], ids=["smem", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_inverse_reports_failures(C, variant, dtype):
    n = 70  # three tiles: failures in the first and in a later panel
    f = _spd(4, n, dtype, seed=1, shift=0.5)
    f[1, 5, 5] = -1.0  # not PD at column 6
    f[2, 64, 64] = -3.0  # not PD at column 65 (third tile)
    f[3, 40, 12] = float("nan")  # NaN in the lower triangle: caught at column 41
    out, info = emulate_inverse(C, f, 0.0, variant)
    expected = torch.linalg.cholesky_ex(f[:3].double())[1].tolist() + [41]
    assert info.tolist() == expected == [0, 6, 65, 41]
    assert torch.isnan(out[1:]).all(), "a failed matrix must be all NaN"
    assert torch.isfinite(out[0]).all()
    assert _rel(out[0], reference.damped_inverse(f[0].double(), 0.0)) <= INV_TOL[dtype]


def test_emulated_inverse_scalar_damping_and_strided_input(C):
    base = _spd(3, 20, torch.float64, seed=4)
    wide = torch.zeros(3, 20, 26, dtype=torch.float64)
    wide[:, :, :20] = base
    f = wide[:, :, :20]  # row stride 26
    bsz, n = 3, 20
    out = torch.empty(bsz, n, n, dtype=torch.float64)
    info = torch.empty(bsz, dtype=torch.int32)
    C.emulate_damped_inverse(F=f.data_ptr(), f_stride_b=f.stride(0), f_stride_r=f.stride(1),
                             out=out.data_ptr(), work=0, info=info.data_ptr(), gamma=0,
                             gamma_stride=0, gamma_scalar=0.25, batch=bsz, n=n, dtype=1, variant=0)
    assert info.tolist() == [0, 0, 0]
    assert _rel(out, reference.damped_inverse(base, 0.25)) <= 1e-12


JAC_RES = {torch.float64: 1e-12, torch.float32: 2e-5}


def _check_eigh(f, lam, vec, tol):
    fd, vd, ld = f.double(), vec.double(), lam.double()
    res = ((fd @ vd - vd * ld.unsqueeze(-2)).flatten(-2).norm(dim=-1)
           / fd.flatten(-2).norm(dim=-1).clamp_min(1e-300))
    orth = (vd.transpose(-1, -2) @ vd - torch.eye(f.shape[-1], dtype=torch.float64)).abs().amax()
    ev = (ld - torch.linalg.eigvalsh(fd)).abs().amax() / fd.flatten(-2).norm(dim=-1).amax().clamp_min(1e-300)
    assert res.max() <= tol and orth <= tol and ev <= tol, (res.max(), orth, ev)
    assert (ld[..., 1:] >= ld[..., :-1]).all(), "eigenvalues not ascending"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 7, 33, 129])
def test_emulated_jacobi_matches_reference_and_twin(C, dtype, n):
    bsz = 2 if n == 129 else 3
    f = _spd(bsz, n, dtype, seed=10 + n)
    lam, vec, info, sweeps = emulate_eigh(C, f)
    lam_r, vec_r, info_r, sweeps_r = emulate_eigh(C, f, reverse=True)
    assert torch.equal(lam, lam_r) and torch.equal(vec, vec_r) and torch.equal(sweeps, sweeps_r)
    assert info.tolist() == [0] * bsz
    _check_eigh(f, lam, vec, JAC_RES[dtype])
    if n <= 33:  # the twin (slow in Python) runs the same algorithm: same sweeps, same result
        t_lam, t_vec, t_info, t_sweeps = twins.jacobi_eigh_twin(
            f, tol=1e-6 if dtype == torch.float32 else 1e-13, max_sweeps=15)
        assert (sweeps - t_sweeps).abs().max() <= 1 and t_info.tolist() == info.tolist()
        assert (lam.double() - t_lam.double()).abs().max() <= JAC_RES[dtype] * f.double().norm()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_jacobi_warm_start(C, dtype):
    n = 40
    f = _spd(3, n, dtype, seed=5)
    _, q0 = torch.linalg.eigh(f.double())
    f2 = (f.double() + 1e-3 * _spd(3, n, torch.float64, seed=6)).to(dtype)
    cold = emulate_eigh(C, f2)
    warm = emulate_eigh(C, f2, q0=q0.to(dtype))
    assert warm[2].tolist() == [0, 0, 0]
    _check_eigh(f2, warm[0], warm[1], JAC_RES[dtype])
    assert (warm[3] <= 3).all() and (warm[3] < cold[3]).all(), (warm[3], cold[3])
    # starting from the exact eigenvectors of a matrix leaves nothing (or one sweep) to do
    exact = emulate_eigh(C, f.double(), q0=q0)
    assert (exact[3] <= 1).all()


def test_emulated_jacobi_failures(C):
    f = _spd(4, 33, torch.float64, seed=7)
    f[1, 3, 30] = float("nan")
    f[2, 0, 0] = float("inf")
    lam, vec, info, _ = emulate_eigh(C, f)
    assert info.tolist() == [0, 2, 2, 0]
    assert torch.isnan(lam[1:3]).all() and torch.isnan(vec[1:3]).all()
    _check_eigh(f[[0, 3]], lam[[0, 3]], vec[[0, 3]], 1e-12)
    lam, vec, info, sweeps = emulate_eigh(C, f[[0, 3]], max_sweeps=1)
    assert info.tolist() == [1, 1] and sweeps.tolist() == [1, 1]
    assert torch.isnan(lam).all() and torch.isnan(vec).all()
    q0 = torch.eye(33, dtype=torch.float64).repeat(2, 1, 1)
    q0[1, 2, 2] = float("nan")
    assert emulate_eigh(C, f[[0, 3]], q0=q0)[2].tolist() == [0, 2]


@pytest.mark.parametrize("kind", ["zero", "identity", "repeated", "rank1", "graded"])
def test_emulated_jacobi_special_matrices(C, kind):
    n = 24
    g = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    if kind == "zero":
        f = torch.zeros(n, n, dtype=torch.float64)
    elif kind == "identity":
        f = torch.eye(n, dtype=torch.float64)
    elif kind == "repeated":
        f = q @ torch.diag(torch.tensor([1.0] * 12 + [3.0] * 12, dtype=torch.float64)) @ q.T
    elif kind == "rank1":
        v = torch.randn(n, 1, generator=g, dtype=torch.float64)
        f = v @ v.T
    else:  # K-FAC-like spectrum over 8 decades, in fp32
        f = q @ torch.diag(torch.logspace(-8, 0, n, dtype=torch.float64)) @ q.T
    f = 0.5 * (f + f.T)
    dtype = torch.float32 if kind == "graded" else torch.float64
    lam, vec, info, sweeps = emulate_eigh(C, f.to(dtype).unsqueeze(0))
    assert info.tolist() == [0]
    _check_eigh(f.to(dtype).unsqueeze(0), lam, vec, JAC_RES[dtype])
    if kind in ("zero", "identity"):
        assert sweeps.tolist() == [0]

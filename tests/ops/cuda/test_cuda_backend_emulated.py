"""The cuda backend's Python layer (kfac_kernels.ops.cuda) end to end on the CPU: its device calls
are redirected to the host emulation of the same kernels (``_C.emulate_*``), so layouts, strides,
damping forms, variant choice, failure reporting and the refresh path are exercised with real
kernel code and no GPU. The device limits are those of an H100 (227 KiB shared memory per block)."""
from __future__ import annotations

import pytest
import torch

import cext_build as cb
from _decomp_helpers import check_eigh, rel, spd
from kfac_kernels import _cext, ops
from kfac_kernels.ops import _registry, reference
from kfac_kernels.ops._registry import BackendUnavailable, NotSupported
from kfac_kernels.ops.cuda import _common
from kfac_kernels.ops.cuda import damped_inverse as cuda_inverse_mod
from kfac_kernels.ops.cuda import symeig as cuda_symeig_mod

H100_SMEM = 232448


class EmulatedC:
    """_C with the device entry points replaced by the host emulation (device/stream dropped)."""

    def __init__(self, C):
        self._C = C

    def damped_inverse(self, *, device, stream, **kw):
        assert device == 0 and stream == 0
        self._C.emulate_damped_inverse(**kw)

    def jacobi_eigh(self, *, device, stream, **kw):
        assert device == 0 and stream == 0
        self._C.emulate_jacobi_eigh(**kw)

    def __getattr__(self, name):
        return getattr(self._C, name)


@pytest.fixture(scope="module")
def C():
    try:
        return cb.build().load()
    except cb.BuildSkipped as exc:
        pytest.skip(str(exc))
    except cb.BuildFailed as exc:
        pytest.fail(str(exc))


@pytest.fixture
def emulated(C, monkeypatch):
    def limit(kind, dtype, fp64_accumulate, dev):
        code = _common.DTYPE_CODES[dtype]
        fn = ((lambda n: C.smem_bytes_jacobi(code, n)) if kind == "jacobi"
              else (lambda n: C.smem_bytes_inverse(code, fp64_accumulate, n, 0)))
        n = 0
        while fn(n + 1) <= H100_SMEM:
            n += 1
        return n

    def check_tensor(name, t):
        if t.dtype not in _common.DTYPE_CODES:
            raise NotSupported(f"the cuda backend takes float32/float64; {name} is {t.dtype}")

    for mod in (cuda_inverse_mod, cuda_symeig_mod):
        monkeypatch.setattr(mod, "check_tensor", check_tensor)
        monkeypatch.setattr(mod, "device_index", lambda t: 0)
        monkeypatch.setattr(mod, "current_stream", lambda t: 0)
        monkeypatch.setattr(mod, "smem_limit", limit)
    monkeypatch.setattr(_cext, "load", lambda: EmulatedC(C))
    monkeypatch.setitem(_registry._probe_cache, "cuda", (True, "emulated on the host"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_inverse_through_the_public_wrapper(emulated):
    f = spd(3, 40, torch.float32, seed=1, shift=1e-2)
    damping = torch.tensor([1e-3, 0.1, 1.0])
    inv, info = ops.damped_inverse(f, damping, backend="cuda", return_info=True)
    ref = reference.damped_inverse(f.double(), damping.double())
    assert info.tolist() == [0, 0, 0] and rel(inv, ref) <= 2e-6


@pytest.mark.parametrize("variant", ["auto", "smem", "blocked"])
def test_inverse_layouts_and_damping_forms(emulated, variant):
    base = spd(3, 24, torch.float64, seed=2)
    wide = torch.zeros(3, 24, 40, dtype=torch.float64)
    wide[:, :, :24] = base
    strided = wide[:, :, :24]
    ref = reference.damped_inverse(base, 0.2)
    for damping in (0.2, torch.tensor(0.2, dtype=torch.float64),
                    torch.full((3,), 0.2, dtype=torch.float64), torch.full((3,), 0.2)):
        inv, info = cuda_inverse_mod.damped_inverse(strided, damping, variant=variant,
                                                    return_info=True)
        g = damping.double() if isinstance(damping, torch.Tensor) else damping  # cast like F
        assert info.tolist() == [0, 0, 0] and rel(inv, reference.damped_inverse(base, g)) <= 1e-12
    inv, info = cuda_inverse_mod.damped_inverse(base[0].expand(4, 24, 24), 0.2, variant=variant,
                                                return_info=True)
    assert info.tolist() == [0] * 4 and rel(inv[3], ref[0]) <= 1e-12
    inv, info = cuda_inverse_mod.damped_inverse(base[1], 0.2, variant=variant, return_info=True)
    assert inv.shape == (24, 24) and int(info) == 0 and rel(inv, ref[1]) <= 1e-12
    t = base.transpose(-1, -2)  # column-major view: copied to a usable layout
    assert rel(cuda_inverse_mod.damped_inverse(t, 0.2, variant=variant), ref) <= 1e-12
    empty, info = cuda_inverse_mod.damped_inverse(base[:0], 0.2, variant=variant, return_info=True)
    assert empty.shape == (0, 24, 24) and info.shape == (0,)


def test_inverse_variant_limits(emulated):
    f = spd(2, 250, torch.float32, seed=3, shift=1e-2)  # beyond the fp32 smem limit (239)
    with pytest.raises(NotSupported, match="beyond the shared-memory Cholesky kernel"):
        cuda_inverse_mod.damped_inverse(f, 1e-3, variant="smem")
    inv = cuda_inverse_mod.damped_inverse(f, 1e-3, variant="auto")  # goes blocked
    assert rel(inv, reference.damped_inverse(f.double(), 1e-3)) <= 2e-6
    with pytest.raises(ValueError, match="variant must be one of"):
        cuda_inverse_mod.damped_inverse(f, 1e-3, variant="tiled")


def test_inverse_failures(emulated):
    f = spd(4, 70, torch.float32, seed=4, shift=0.5)
    f[1, 5, 5] = -1.0
    f[2, 64, 64] = -3.0
    f[3, 40, 12] = float("nan")
    for variant in ("smem", "blocked"):
        inv, info = ops.damped_inverse(f, 0.0, backend="cuda", return_info=True) \
            if variant == "smem" else cuda_inverse_mod.damped_inverse(f, 0.0, variant=variant,
                                                                      return_info=True)
        assert info.tolist() == [0, 6, 65, 41]
        assert torch.isnan(inv[1:]).all() and torch.isfinite(inv[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jacobi_through_the_public_wrapper(emulated, dtype):
    f = spd(3, 33, dtype, seed=5)
    lam, q, info = ops.symeig(f, method="jacobi", backend="cuda", return_info=True)
    assert info.tolist() == [0, 0, 0]
    check_eigh(f, lam, q, 2e-5 if dtype == torch.float32 else 1e-12)
    lam1, q1 = ops.symeig(f[0], backend="cuda")  # unbatched, method auto
    assert lam1.shape == (33,) and torch.allclose(lam1, lam[0])


def test_jacobi_options_warm_start_and_failures(emulated):
    f = spd(3, 30, torch.float64, seed=6)
    _, q0 = torch.linalg.eigh(f)
    f2 = f + 1e-4 * spd(3, 30, torch.float64, seed=7)
    lam, q, info, sweeps = cuda_symeig_mod.jacobi_eigh(f2, q0)
    assert info.tolist() == [0, 0, 0] and (sweeps <= 2).all()
    check_eigh(f2, lam, q, 1e-12)
    _, _, _, cold = cuda_symeig_mod.jacobi_eigh(f2)
    assert (cold > sweeps).all()
    # one sweep does not converge: the kernel reports it (info 1, NaN) ...
    raw = cuda_symeig_mod.symeig(f2, method="jacobi", return_info=True, max_sweeps=1)
    assert raw[2].tolist() == [1, 1, 1] and torch.isnan(raw[0]).all()
    # ... and the op repairs those matrices in float64 (ops/_fallback.py)
    before = ops.fallback_counts()["symeig_float64"]
    lam, q, info = ops.symeig(f2, method="jacobi", backend="cuda", return_info=True,
                              max_sweeps=1)
    assert info.tolist() == [0, 0, 0] and ops.fallback_counts()["symeig_float64"] == before + 3
    check_eigh(f2, lam, q, 1e-12)
    loose = cuda_symeig_mod.jacobi_eigh(f2, tol=1e-3)
    assert (loose[3] < cold).all() and loose[2].tolist() == [0, 0, 0]
    g = f.clone()
    g[2, 1, 1] = float("nan")
    assert ops.symeig(g, backend="cuda", return_info=True)[2].tolist() == [0, 0, 2]
    with pytest.raises(BackendUnavailable, match="method='eigh' is torch's"):
        ops.symeig(f, method="eigh", backend="cuda")
    with pytest.raises(BackendUnavailable, match="beyond the Jacobi kernel's shared memory"):
        ops.symeig(spd(1, 200, torch.float64), backend="cuda")


def test_refresh_with_the_jacobi_kernel(emulated):
    f = spd(4, 32, torch.float32, seed=8)
    _, q0 = torch.linalg.eigh(f.double())
    q0 = q0.float()
    f2 = f.clone()
    f2[1] += 0.05 * spd(1, 32, torch.float32, seed=9)[0]
    f2[3] += 0.05 * spd(1, 32, torch.float32, seed=10)[0]
    lam, q, info = ops.symeig(f2, method="refresh", prev_eigenvectors=q0, backend="cuda",
                              return_info=True)
    assert info.tolist() == [0] * 4
    check_eigh(f2, lam, q, 1e-4)
    check_eigh(f2[[1, 3]], lam[[1, 3]], q[[1, 3]], 2e-5)
    lam_t, _ = ops.symeig(f2, method="refresh", prev_eigenvectors=q0, backend="torch")
    assert (lam - lam_t).abs().max() <= 1e-5 * f2.norm()

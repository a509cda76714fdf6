"""The CUDA and CuPy decomposition backends on a machine without a GPU: import stays lean, every
unavailable piece says why, CPU tensors are declined, and setup.py's build switches decide as
documented."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kfac_kernels import _cext, ops
from kfac_kernels.ops._registry import BackendUnavailable, NotSupported

ROOT = Path(__file__).resolve().parents[3]


def test_import_stays_lean():
    code = ("import kfac_kernels, kfac_kernels.ops, sys; "
            "bad = [m for m in ('triton', 'cupy', 'kfac_kernels._C', 'kfac_kernels.ops.cuda.symeig',"
            " 'kfac_kernels.ops.cupy.symeig') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cext_status_gives_a_reason():
    ok, why = _cext.status(refresh=True)
    if ok:
        assert why.startswith("built (archs=")
    else:
        assert why.startswith(("not built:", "import failed:", "imported but unusable:")), why
        with pytest.raises(ImportError, match="kfac_kernels._C is unavailable: "):
            _cext.load()


def test_cext_reason_without_nvcc(monkeypatch):
    monkeypatch.setattr(_cext, "module_path", lambda: None)
    monkeypatch.setattr(_cext, "_find_nvcc", lambda: None)
    monkeypatch.delenv("KFAC_KERNELS_CUDA", raising=False)
    assert _cext._not_built_reason() == ("not built: nvcc not found (install the CUDA toolkit, "
                                         "then rebuild)")
    monkeypatch.setenv("KFAC_KERNELS_CUDA", "0")
    assert "KFAC_KERNELS_CUDA=0" in _cext._not_built_reason()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU messages")
def test_backends_report_why_they_are_unavailable():
    status = ops.available_backends()
    for name in ("cuda", "cupy"):
        ok, why = status[name]
        assert not ok and why, (name, why)
    assert "no CUDA device" in status["cuda"][1] or "kfac_kernels._C" in status["cuda"][1]
    f = torch.eye(4).expand(2, 4, 4)
    with pytest.raises(BackendUnavailable, match="backend 'cuda' is unavailable for 'symeig'"):
        ops.symeig(f, method="jacobi", backend="cuda")
    with pytest.raises(BackendUnavailable, match="backend 'cupy' is unavailable"):
        ops.symeig(f, backend="cupy")
    with pytest.raises(BackendUnavailable, match="backend 'cuda' is unavailable for 'damped_inverse'"):
        ops.damped_inverse(f, 0.1, backend="cuda")


def test_env_report_names_c_and_cupy():
    from kfac_kernels._env import report

    text = report()
    assert "kfac_kernels._C (cuda backend):" in text
    assert "cupy backend (cuSOLVER syevjBatched):" in text


def test_backend_functions_decline_cpu_tensors():
    from kfac_kernels.ops.cuda.damped_inverse import damped_inverse
    from kfac_kernels.ops.cuda.symeig import jacobi_eigh, symeig
    from kfac_kernels.ops.cupy.symeig import symeig as cupy_symeig

    f = torch.eye(3).expand(2, 3, 3)
    for call in (lambda: damped_inverse(f, 0.1), lambda: jacobi_eigh(f), lambda: symeig(f),
                 lambda: cupy_symeig(f)):
        with pytest.raises(NotSupported, match="CUDA tensors"):
            call()
    with pytest.raises(NotSupported, match="n <= 32"):
        cupy_symeig(torch.eye(33))
    with pytest.raises(NotSupported, match="syevjBatched only"):
        cupy_symeig(f, method="refresh")


# ----------------------------------------------------------------------------- setup.py switches
def _setup_module():
    spec = importlib.util.spec_from_file_location("kfac_kernels_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: defines the helpers, does not call setup()
    return mod


def test_setup_build_decision():
    s = _setup_module()
    assert s.cuda_build_decision({}, None) == (False, False, "nvcc not found: pure-Python build")
    assert s.cuda_build_decision({}, "/x/nvcc") == (True, False, "nvcc at /x/nvcc")
    assert s.cuda_build_decision({"KFAC_KERNELS_CUDA": "auto"}, "/x/nvcc")[:2] == (True, False)
    assert s.cuda_build_decision({"KFAC_KERNELS_CUDA": "1"}, "/x/nvcc")[:2] == (True, True)
    assert s.cuda_build_decision({"KFAC_KERNELS_CUDA": "0"}, "/x/nvcc")[:2] == (False, False)
    with pytest.raises(SystemExit, match="nvcc was not found"):
        s.cuda_build_decision({"KFAC_KERNELS_CUDA": "1"}, None)
    with pytest.raises(SystemExit, match="must be 0, 1 or auto"):
        s.cuda_build_decision({"KFAC_KERNELS_CUDA": "maybe"}, "/x/nvcc")


def test_setup_find_nvcc(tmp_path):
    s = _setup_module()
    fake = tmp_path / "cuda" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert s.find_nvcc({"PATH": "/nonexistent", "CUDA_HOME": str(tmp_path / "cuda")}) == str(fake)
    assert s.find_nvcc({"PATH": str(fake.parent)}) == str(fake)
    assert s.find_nvcc({"PATH": "/nonexistent", "CUDACXX": str(fake)}) == str(fake)

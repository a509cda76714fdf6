"""Benchmark configuration (same environment rules as tests/conftest.py).

Triton runs on CPU only through its interpreter, which must be switched on before anything imports
triton; on a machine with a CUDA device the real compiler is used instead.
"""
import os

import torch

if not torch.cuda.is_available():  # NVML query only: does not initialise CUDA
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice, keep 3.6's default

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0

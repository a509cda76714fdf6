"""Test configuration shared by the whole suite.

Triton runs on CPU only through its interpreter, which must be switched on before anything imports
triton; on a machine with a CUDA device the real compiler is used instead.

The tests live in folders that mirror the package (tests/README.md, "Layout"); the modules they
share (helpers, harnesses, scenarios run inside spawned ranks) live in tests/_support/, put on
``sys.path`` here so that ``import helpers`` works from any folder, for one file or the whole
suite, and in the processes the tests start (they inherit ``sys.path``).
"""
import os
import sys

SUPPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_support")
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)

import torch  # noqa: E402

if not torch.cuda.is_available():  # NVML query only: does not initialise CUDA
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice, keep 3.6's default

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: long leak test (10,000 steps); deselected unless "
                            "asked for: python -m pytest -m soak")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
    if not config.getoption("markexpr"):      # soak tests run only when a -m selects them
        soak = [item for item in items if "soak" in item.keywords]
        if soak:
            config.hook.pytest_deselected(items=soak)
            items[:] = [item for item in items if "soak" not in item.keywords]


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0

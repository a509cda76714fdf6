"""Build script: pure Python everywhere; the optional CUDA extension ``kfac_kernels._C`` is built by
CMake + ninja when nvcc is found (see CMakeLists.txt and the environment switches documented in
README.md)."""
from setuptools import setup

setup()

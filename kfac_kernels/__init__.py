"""kfac_kernels: K-FAC natural-gradient training for PyTorch.

The mathematics follows the coordinate-free construction of Luk & Grosse (arXiv 1808.10340): with
damping off, the update is the natural gradient of an explicit metric, invariant to affine maps of
each layer's input activations and invertible linear maps of its pre-activations.

Importing this package imports torch and nothing else heavy: no CUDA initialisation, no
compilation, no Triton, CuPy or compiled module until a backend that needs them is asked for.
"""
from ._version import __version__
from . import ops

#: public subpackages, each imported on first use (``kk.optim``, ``kk.integrations``, ``kk.nn``,
#: ``kk.recipes``)
_SUBPACKAGES = ("nn", "optim", "integrations", "recipes")

__all__ = ["__version__", "ops", "nn", "optim", "integrations", "recipes", "KFAC",
           "KFACPreconditioner"]


def __dir__():
    return sorted(set(globals()) | set(__all__))


def __getattr__(name):  # lazy, so `import kfac_kernels.ops` stays minimal
    if name in ("KFAC", "KFACPreconditioner"):
        from . import optimizer
        return getattr(optimizer, name)
    if name in _SUBPACKAGES:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kfac_kernels' has no attribute {name!r}")

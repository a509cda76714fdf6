"""Framework integrations: Hugging Face ``transformers.Trainer`` and PyTorch Lightning.

Importing this package imports nothing beyond kfac_kernels itself; each integration imports its
framework when it is imported:

* :mod:`kfac_kernels.integrations.hf` — ``KFACTrainer``, a ``transformers.Trainer`` that builds a
  :class:`kfac_kernels.KFAC` and runs the curvature passes of ``"fisher"`` / ``"ggn"``;
* :mod:`kfac_kernels.integrations.lightning` — ``KFACMixin`` / ``KFACLightningModule``, the
  LightningModule hooks that ``"fisher"`` / ``"ggn"`` need (``"empirical"`` needs nothing).

The names are also reachable here, imported on first use
(``kfac_kernels.integrations.KFACTrainer``).
"""
import importlib

__all__ = ["KFACTrainer", "KFACMixin", "KFACLightningModule"]

_WHERE = {"KFACTrainer": ".hf", "KFACMixin": ".lightning", "KFACLightningModule": ".lightning"}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'kfac_kernels.integrations' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

"""K-FAC in PyTorch Lightning.

``curvature="empirical"`` needs nothing: return ``kk.KFAC(self, ...)`` from
``configure_optimizers`` of any LightningModule. Lightning's automatic optimisation calls
``opt.step(closure)``; the closure runs ``training_step``, ``opt.zero_grad()`` and the backward
pass, which is all "empirical" needs (``KFAC.step`` runs a closure that returns the loss as
torch does).

``curvature="fisher"`` / ``"ggn"`` need the model output for their extra backward passes
(``opt.backward(loss, out)``). Mix :class:`KFACMixin` into the LightningModule (before
``LightningModule`` in the bases, or subclass :class:`KFACLightningModule`) and hand the output
over in ``training_step`` with :meth:`KFACMixin.kfac_output`::

    class Classifier(KFACLightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.kfac_output(self.net(x))      # the output the loss is computed from
            return F.cross_entropy(logits, y)

        def configure_optimizers(self):
            return kk.KFAC(self, lr=0.1, curvature="fisher", likelihood="categorical")

The mixin's ``backward`` hook (which Lightning calls for automatic optimisation, and which
``self.manual_backward(loss)`` calls for manual optimisation) then does
``opt.backward(loss, out)``. Validation, test and prediction run under ``torch.no_grad()`` /
``torch.inference_mode()``, so they never enter the factors.

``accumulate_grad_batches > 1`` works: the micro-batches are combined into the factors of one
step on the whole batch (docs/robustness.md, section 5). Refused with an error naming the
alternative: DeepSpeed and FSDP strategies, several K-FAC optimisers.
Not supported: the adaptive options (``adaptive_lr`` & co. need a closure returning
``(loss, out)``; Lightning's returns the loss). DDP and 16-bit mixed precision (Lightning's
GradScaler drives ``KFAC.step``, which unscales itself) are expected to work but are not run by
the tests here (CPU only).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..optimizer import KFAC, KFACPreconditioner

try:
    import lightning.pytorch as _pl
except ImportError:  # the standalone package
    import pytorch_lightning as _pl

__all__ = ["KFACMixin", "KFACLightningModule", "find_kfac"]

_REFUSED_STRATEGIES = ("DeepSpeedStrategy", "FSDPStrategy", "ModelParallelStrategy",
                       "XLAFSDPStrategy")


def find_kfac(optimizers) -> Optional[Any]:
    """The one ``kk.KFAC`` / ``kk.KFACPreconditioner`` among ``optimizers`` (Lightning's
    ``trainer.optimizers``, possibly wrapped in ``LightningOptimizer``), or None."""
    found = []
    for o in optimizers or ():
        o = getattr(o, "optimizer", o) if not isinstance(o, (KFAC, KFACPreconditioner)) else o
        if isinstance(o, (KFAC, KFACPreconditioner)):
            found.append(o)
    if len(found) > 1:
        raise NotImplementedError("KFACMixin: several K-FAC optimisers on one module; build one "
                                  "kk.KFAC over the whole module (param groups for different "
                                  "settings)")
    return found[0] if found else None


class KFACMixin:
    """LightningModule hooks for ``kk.KFAC`` with ``curvature="fisher"`` / ``"ggn"`` (harmless
    with ``"empirical"``). Put it before ``LightningModule`` in the bases.

    In ``training_step`` pass the output the loss is computed from through
    :meth:`kfac_output` (batch dimension first; for "categorical" the classes last — e.g. a
    causal LM's ``logits[:, :-1]`` for a loss on ``labels[:, 1:]``). The ``backward`` hook runs
    ``opt.backward(loss, out)``; an ``"empirical"`` optimiser, or none, gets Lightning's plain
    backward."""

    _kfac_out: Optional[torch.Tensor] = None
    _kfac_checked: bool = False

    def kfac_output(self, out: torch.Tensor) -> torch.Tensor:
        """Record ``out`` for this step's curvature passes; returns it unchanged."""
        self._kfac_out = out
        return out

    @property
    def kfac_optimizer(self):
        """The K-FAC optimiser the trainer steps (None when not attached or not K-FAC)."""
        trainer = getattr(self, "_trainer", None)
        return None if trainer is None else find_kfac(trainer.optimizers)

    def _kfac_check(self, opt) -> None:
        trainer = self._trainer
        name = type(trainer.strategy).__name__
        if name in _REFUSED_STRATEGIES:
            raise NotImplementedError(
                f"KFACMixin: the {name} is not supported (it shards or owns the optimiser): use "
                f"strategy='ddp' (K-FAC averages its factors over the ranks), or for a sharded "
                f"model fully_shard it yourself and train with kk.KFAC in your own loop (README, "
                f"'Several processes')")
        if getattr(opt, "control", None) is not None:
            raise NotImplementedError(
                "KFACMixin: the adaptive options (adaptive_lr / adaptive_momentum / "
                "adaptive_damping) need opt.step(closure) with a closure returning (loss, out); "
                "Lightning's closure returns the loss: use a fixed lr (kl_clip) or your own loop")
        self._kfac_checked = True

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        out, self._kfac_out = self._kfac_out, None
        opt = self.kfac_optimizer
        if opt is not None and not self._kfac_checked:
            self._kfac_check(opt)
        if opt is None or opt.opts.curvature == "empirical":
            return super().backward(loss, *args, **kwargs)
        if out is None and opt.engine.capturing:
            raise RuntimeError(
                f"KFACMixin: curvature={opt.opts.curvature!r} needs the model output: pass it "
                f"through self.kfac_output(...) in training_step, e.g. "
                f"`logits = self.kfac_output(self.net(x))`")
        if args or set(kwargs) - {"retain_graph"} or getattr(self, "_fabric", None) is not None:
            # the two halves of opt.backward, the second Lightning's own
            opt.engine.curvature_backward(out)
            return super().backward(loss, *args, **kwargs)
        opt.backward(loss, out, **kwargs)


class KFACLightningModule(KFACMixin, _pl.LightningModule):
    """A LightningModule with :class:`KFACMixin`'s hooks."""

"""What the ops' ``torch.library`` custom ops share: their namespace and the rule for outputs.

Each op module (:mod:`.syrk`, :mod:`.conv_factor`, :mod:`.gradient_factors`, :mod:`.ekfac`,
:mod:`.orthogonalization`, :mod:`.decompositions`, :mod:`.kron`) registers its ops once as
``torch.ops.kfac_kernels.<name>``, each with a fake (meta) implementation that states its output
shapes and dtypes, so ``torch.compile`` treats them as opaque; the in-place ``syrk_update`` (and
``ema_factor_update``, which is built on it) declares the mutation of its ``factor``. The real
implementation is the same backend dispatch the eager wrapper uses (the registry, and for
decompositions on CUDA the size policy of :mod:`._decomp_policy`), so a compiled region runs
exactly the kernels an eager call would, without dynamo tracing (and breaking on) the
registry's Python.

The public wrappers check their inputs as usual and route through their custom op only while
dynamo is tracing (``torch.compiler.is_compiling()``); eager calls skip the custom-op dispatcher
and its overhead. Registration happens at import: it costs a few milliseconds, initialises no
device and compiles nothing (measured in docs/robustness.md).

Not covered: ``symeig``'s backend-specific ``**options`` (tolerances, sweep limits) have no
schema; a call that passes them is traced as ordinary Python.
"""
from __future__ import annotations

from torch import Tensor

NAMESPACE = "kfac_kernels"
__all__ = ["NAMESPACE", "fresh"]


def fresh(t: Tensor) -> Tensor:
    """Outputs are contiguous (the fake implementations say so; eigh's eigenvectors are not)
    and not views (custom-op outputs may not alias, e.g. the [n, n] result of a batch of one)."""
    t = t.contiguous()
    return t if t._base is None else t.clone()

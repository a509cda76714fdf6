"""Settings that worked, in one place: ``kk.KFAC(model, **recipes.transformer())``.

:func:`transformer` is the recipe for transformer language models (docs/transformers.md gives the
measurements behind it). It is what the LM example (kfac_kernels/examples/transformer_lm.py), the
real-text benchmark (kfac_kernels/examples/lm_realtext.py, ``kfac:recipe=1``) and
``KFACTrainer(kfac_recipe="transformer")`` use.
"""
from __future__ import annotations

from typing import Any, Dict

__all__ = ["transformer"]


def transformer(lr: float = 1e-3, **overrides: Any) -> Dict[str, Any]:
    """Keyword settings of :class:`kfac_kernels.KFAC` for a transformer language model trained
    on a per-token mean cross-entropy (``loss_reduction="token_mean"``, as Hugging Face's loss).

    * ``inverse="eigen_adam"``: K-FAC's Kronecker eigenbases (of A and G) with Adam's
      bias-corrected per-coordinate second moment of the rotated gradient in place of the
      eigenvalues (SOAP's ingredient). The update is normalised per coordinate like Adam's, so
      ``lr`` sets the step (no KL clip: with eigenvalue scalings the clip bound every step and
      made lr meaningless); ``damping`` is Adam's epsilon.
    * ``curvature="empirical"``: the bases come from the loss's own gradients, so there is no
      extra backward pass (the sampled Fisher's costs one, and gave no better steps here).
    * ``factor_every=5, inverse_every=10``: the bases move slowly; amortising the factor work and
      the eigendecompositions keeps a step near AdamW's cost.
    * ``momentum=0.9`` heavy ball on the normalised update: lr about AdamW's lr / 3 (the heavy
      ball sums about 1 / (1 - momentum) updates where Adam averages them).

    ``overrides`` replace any of these (e.g. ``transformer(lr=3e-4, factor_every=1)``).
    """
    kw = dict(lr=lr, momentum=0.9, inverse="eigen_adam", damping=1e-8, ema_decay=0.95,
              curvature="empirical", loss_reduction="token_mean", factor_every=5,
              inverse_every=10, kl_clip=None)
    kw.update(overrides)
    return kw

"""Settings that worked, in one place: ``kk.KFAC(model, **recipes.transformer())``.

:func:`transformer` is the recipe for transformer language models (docs/transformers.md gives the
measurements behind it). It is what the LM example (kfac_kernels/examples/transformer_lm.py), the
real-text benchmark (kfac_kernels/examples/lm_realtext.py, ``kfac:recipe=1``) and
``KFACTrainer(kfac_recipe="transformer")`` use.
"""
from __future__ import annotations

from typing import Any, Dict

__all__ = ["transformer"]


def transformer(lr: float = 3e-3, **overrides: Any) -> Dict[str, Any]:
    """Keyword settings of :class:`kfac_kernels.KFAC` for a transformer language model trained
    on a per-token mean cross-entropy (``loss_reduction="token_mean"``, as Hugging Face's loss).
    Clip the gradient norm at 1 before ``opt.step()`` (``torch.nn.utils.clip_grad_norm_``; the
    Hugging Face Trainer's default ``max_grad_norm=1.0`` does it), as for AdamW.

    * ``inverse="eigen_adam"``: K-FAC's Kronecker eigenbases (of A and G) with Adam's
      bias-corrected moments of the rotated gradient in place of the eigenvalues (SOAP's
      ingredient). The update is normalised per coordinate like Adam's, so ``lr`` sets the step
      (no KL clip: with eigenvalue scalings the clip bound every step and made lr meaningless);
      ``damping`` is Adam's epsilon.
    * ``rotated_momentum=0.9, momentum=0``: Adam's first moment kept in the eigenbasis (beta1
      0.9; beta2 is ``ema_decay`` 0.95, as SOAP's betas) instead of a heavy ball after the
      rotation back: the largest single gain measured (docs/transformers.md).
    * ``curvature="empirical"``: the bases come from the loss's own gradients, so there is no
      extra backward pass (the sampled Fisher's costs one, and gave no better steps here).
    * ``factor_every=5, inverse_every=10``: the bases move slowly; amortising the factor work and
      the eigendecompositions keeps a step near AdamW's cost (factors every 1 or 2 steps, or
      bases every 5, bought no progress per step; bases every 20 lost some).
    * ``factor_max_rows=512``: each factor estimate from at most 512 token positions (every k-th,
      scaled by k): the same steps at an eighth of the factor products for 4,096 tokens a step.

    ``overrides`` replace any of these. The defaults were measured at width 128; at width 256
    ``transformer(lr=1.5e-3, inverse_every=5)`` was better (docs/transformers.md).
    """
    kw = dict(lr=lr, momentum=0.0, rotated_momentum=0.9, inverse="eigen_adam", damping=1e-8,
              ema_decay=0.95, curvature="empirical", loss_reduction="token_mean", factor_every=5,
              inverse_every=10, factor_max_rows=512, kl_clip=None)
    kw.update(overrides)
    return kw

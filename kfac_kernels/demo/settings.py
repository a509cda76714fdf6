"""Default hyperparameters of the demo and the grids ``--tune`` sweeps.

How each number was chosen is written up in docs/demo.md (with the sweep results); in short:
Adam's and SGD's lr and K-FAC's lr and KL clip are the best of a small grid at the default step
budget (``--tune`` reruns that: lowest mean log train loss over the run), and K-FAC's damping,
curvature type and factor/inverse frequencies come from one-at-a-time sweeps around its defaults.
"""
from __future__ import annotations

from typing import Dict, List

from .train import OptimizerSpec

OPTIMIZERS = ("kfac", "adam", "sgd")

# K-FAC: Fisher curvature (one Monte-Carlo sample from the model's own predictive distribution),
# eigenvalue damping, KL clipping as the step-size control, heavy-ball momentum 0.9 as for SGD;
# factors every 5 steps and eigendecompositions every 10.
_KFAC = dict(momentum=0.9, curvature="fisher", factor_every=5, inverse_every=10)

DEFAULTS: Dict[str, Dict[str, OptimizerSpec]] = {
    "autoencoder": {
        "kfac": OptimizerSpec("kfac", 0.1, dict(_KFAC, damping=1e-2, kl_clip=1e-2)),
        "adam": OptimizerSpec("adam", 3e-3),
        "sgd": OptimizerSpec("sgd", 1e-2, dict(momentum=0.9)),
    },
    "cnn": {
        "kfac": OptimizerSpec("kfac", 0.3, dict(_KFAC, damping=1e-1, kl_clip=1e-3)),
        "adam": OptimizerSpec("adam", 3e-2),
        "sgd": OptimizerSpec("sgd", 1e-1, dict(momentum=0.9)),
    },
}

# What --tune sweeps, per optimiser: a list of settings to try. Adam and SGD: the lr. K-FAC: the lr
# and the KL clip C together, because both set its step size: the update is lr * nu * U with
# nu = min(1, sqrt(C / (lr^2 sum <U, V>))), so while the clip is active the step is
# sqrt(C / sum <U, V>) whatever the lr, and once it is not, the lr alone sets it.
GRIDS: Dict[str, List[Dict[str, float]]] = {
    "kfac": [dict(lr=lr, kl_clip=c) for lr in (0.03, 0.1, 0.3, 1.0)
             for c in (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)],
    "adam": [dict(lr=lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)],
    "sgd": [dict(lr=lr) for lr in (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)],
}

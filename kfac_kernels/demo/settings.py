"""Default hyperparameters of the demo and the grids ``--tune`` sweeps.

How each number was chosen is written up in docs/demo.md (with the sweep results); in short:
Adam's and SGD's lr and K-FAC's KL clip are the best of a small grid at the default step budget
(``--tune`` reruns that: lowest mean log train loss over the run), and K-FAC's damping, curvature
type and factor/inverse frequencies come from one-at-a-time sweeps around its defaults.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

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
        "kfac": OptimizerSpec("kfac", 0.1, dict(_KFAC, damping=1e-1, kl_clip=1e-3)),
        "adam": OptimizerSpec("adam", 3e-2),
        "sgd": OptimizerSpec("sgd", 1e-1, dict(momentum=0.9)),
    },
}

# what --tune sweeps: lr for Adam and SGD; for K-FAC the KL clip C, because with clipping active
# the step is lr * nu * U with lr * nu = sqrt(C / sum <U, V>), which does not depend on lr
GRIDS: Dict[str, Tuple[str, List[float]]] = {
    "kfac": ("kl_clip", [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]),
    "adam": ("lr", [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]),
    "sgd": ("lr", [3e-3, 1e-2, 3e-2, 1e-1, 3e-1]),
}

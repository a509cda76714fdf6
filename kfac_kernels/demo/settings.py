"""Default hyperparameters of the demo and the grids ``--tune`` sweeps.

How each number was chosen is written up in docs/demo.md (with the sweep results); in short:
every optimiser's lr is the best of a small grid at the default step budget (lowest final train
loss), and K-FAC's damping, KL clip, curvature type and inverse frequency come from one-at-a-time
sweeps around its defaults.
"""
from __future__ import annotations

from typing import Dict, List

from .train import OptimizerSpec

OPTIMIZERS = ("kfac", "adam", "sgd")

# K-FAC: Fisher curvature (one Monte-Carlo sample of the model's own predictive distribution),
# eigenvalue damping, KL clipping as the step-size control, heavy-ball momentum 0.9 as for SGD.
_KFAC = dict(momentum=0.9, damping=1e-2, kl_clip=1e-2, curvature="fisher", inverse_every=10)

DEFAULTS: Dict[str, Dict[str, OptimizerSpec]] = {
    "autoencoder": {
        "kfac": OptimizerSpec("kfac", 0.1, dict(_KFAC)),
        "adam": OptimizerSpec("adam", 5e-3),
        "sgd": OptimizerSpec("sgd", 1e-2, dict(momentum=0.9)),
    },
    "cnn": {
        "kfac": OptimizerSpec("kfac", 0.1, dict(_KFAC)),
        "adam": OptimizerSpec("adam", 3e-3),
        "sgd": OptimizerSpec("sgd", 3e-2, dict(momentum=0.9)),
    },
}

# lr grids of --tune (factor-of-~3 spacing around each optimiser's usual range)
GRIDS: Dict[str, List[float]] = {
    "kfac": [0.03, 0.1, 0.3],
    "adam": [1e-3, 2e-3, 5e-3, 1e-2],
    "sgd": [3e-3, 1e-2, 3e-2, 1e-1],
}

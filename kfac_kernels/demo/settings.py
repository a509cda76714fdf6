"""Default hyperparameters of the demo and the grids ``--tune`` sweeps.

How each number was chosen is written up in docs/demo.md (with the sweep results); in short:
Adam's and SGD's lr and K-FAC's lr and KL clip are the best of a small grid at the default step
budget (``--tune`` reruns that: lowest mean log train loss over the run), and K-FAC's damping,
curvature type and factor/inverse frequencies come from one-at-a-time sweeps around its defaults.
"""
from __future__ import annotations

from typing import Dict, List

from .train import OptimizerSpec

OPTIMIZERS = ("kfac", "adam", "sgd")            # the default run
# On request (--optimizers kfac,adam,sgd,soap,shampoo,muon): kfac_kernels.optim's SOAP, Shampoo
# and Muon, built on the kernel ops. Their lr is the best of GRIDS below at the default step budget (see
# docs/demo.md); everything else is common practice, not tuned here.
EXTRA_OPTIMIZERS = ("soap", "shampoo", "muon")
CHOICES = OPTIMIZERS + EXTRA_OPTIMIZERS

# K-FAC: Fisher curvature (one Monte-Carlo sample from the model's own predictive distribution),
# eigenvalue damping, KL clipping as the step-size control, heavy-ball momentum 0.9 as for SGD;
# factors every 5 steps and eigendecompositions every 10.
_KFAC = dict(momentum=0.9, curvature="fisher", factor_every=5, inverse_every=10)
# SOAP: the paper's betas and shampoo_beta, eigenbases refreshed every 10 steps, no weight decay
# (Adam runs without it here too). Shampoo: running-average statistics, Adam grafting (Shampoo's
# direction at Adam's step size per parameter), momentum 0.9, inverse roots every 10 steps.
_SOAP = dict(betas=(0.9, 0.95), shampoo_beta=0.95, weight_decay=0.0, precondition_frequency=10)
# Muon: torch.optim.Muon's defaults (momentum 0.95, Nesterov, 5 bf16 Newton-Schulz steps) without
# weight decay, on the hidden Linear weights (kfac_kernels.optim.muon_param_groups); the rest
# (convolutions, the output layer, biases) in its AdamW group at Adam's tuned lr, no weight decay.
_MUON = dict(weight_decay=0.0, adamw_weight_decay=0.0)
_SHAMPOO = dict(beta2=0.999, momentum=0.9, grafting="adam", epsilon=1e-6,
                precondition_frequency=10)

MUON_LR_AE, MUON_LR_CNN = 3e-2, 3e-3       # the --tune picks (GRIDS), docs/demo.md

DEFAULTS: Dict[str, Dict[str, OptimizerSpec]] = {
    "autoencoder": {
        "kfac": OptimizerSpec("kfac", 0.1, dict(_KFAC, damping=1e-2, kl_clip=1e-2)),
        "adam": OptimizerSpec("adam", 3e-3),
        "sgd": OptimizerSpec("sgd", 1e-2, dict(momentum=0.9)),
        "soap": OptimizerSpec("soap", 1e-2, dict(_SOAP)),
        "shampoo": OptimizerSpec("shampoo", 1e-3, dict(_SHAMPOO)),
        "muon": OptimizerSpec("muon", MUON_LR_AE, dict(_MUON, adamw_lr=3e-3)),
    },
    "cnn": {
        "kfac": OptimizerSpec("kfac", 0.3, dict(_KFAC, damping=1e-1, kl_clip=1e-3)),
        "adam": OptimizerSpec("adam", 3e-2),
        "sgd": OptimizerSpec("sgd", 1e-1, dict(momentum=0.9)),
        "soap": OptimizerSpec("soap", 3e-2, dict(_SOAP)),
        "shampoo": OptimizerSpec("shampoo", 1e-3, dict(_SHAMPOO)),
        "muon": OptimizerSpec("muon", MUON_LR_CNN, dict(_MUON, adamw_lr=3e-2)),
    },
}

# What --tune sweeps, per optimiser: a list of settings to try. Adam and SGD: the lr. K-FAC: the lr
# and the KL clip C together, because both set its step size: the update is lr * nu * U with
# nu = min(1, sqrt(C / (lr^2 sum <U, V>))), so while the clip is active the step is
# sqrt(C / sum <U, V>) whatever the lr, and once it is not, the lr alone sets it. SOAP and Shampoo:
# the lr (Shampoo's grid sits lower: its Adam-grafted step is then multiplied by momentum 0.9's
# 1 / (1 - 0.9), and from lr 1e-2 on the autoencoder and 3e-3 on the CNN it blows up).
GRIDS: Dict[str, List[Dict[str, float]]] = {
    "kfac": [dict(lr=lr, kl_clip=c) for lr in (0.03, 0.1, 0.3, 1.0)
             for c in (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)],
    "adam": [dict(lr=lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)],
    "sgd": [dict(lr=lr) for lr in (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)],
    "soap": [dict(lr=lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)],
    "shampoo": [dict(lr=lr) for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)],
    "muon": [dict(lr=lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)],
}

"""Optimizers built on :mod:`kfac_kernels.ops`: Shampoo, SOAP and Muon.

All are ``torch.optim.Optimizer`` subclasses (param_groups, lr schedulers, ``step(closure)``,
``state_dict`` round trips that keep the factors' dtypes) whose every heavy operation is a kernel
op, run once per group of same-shaped parameters. README.md ("Building your own optimizer on the
ops") walks through Shampoo as the example.
"""
from .shampoo import Shampoo
from .soap import SOAP
from .muon import Muon, muon_param_groups

__all__ = ["Shampoo", "SOAP", "Muon", "muon_param_groups"]

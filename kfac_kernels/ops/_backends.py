"""Where the fast backends live. Only names are recorded here: nothing is imported.

A backend package provides ``probe() -> (ok, reason)`` and one function per op it implements,
with the reference's signature (inputs already checked by :mod:`kfac_kernels.ops`).
"""
from ._registry import register, register_backend

# Fast backends add their lines here, e.g.
#   register_backend("triton", "kfac_kernels.ops.triton:probe")
#   register("syrk_update", "triton", "kfac_kernels.ops.triton.syrk:syrk_update")

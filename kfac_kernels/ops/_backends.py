"""Where the fast backends live. Only names are recorded here: nothing is imported.

A backend package provides ``probe() -> (ok, reason)`` and one function per op it implements,
with the reference's signature (inputs already checked by :mod:`kfac_kernels.ops`).
"""
from ._registry import register, register_backend

# Fast backends add their lines here, e.g.
#   register_backend("triton", "kfac_kernels.ops.triton:probe")
#   register("syrk_update", "triton", "kfac_kernels.ops.triton.syrk:syrk_update")

# Triton (kfac_kernels/ops/triton): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
register_backend("triton", "kfac_kernels.ops.triton:probe")
register("syrk_update", "triton", "kfac_kernels.ops.triton.syrk:syrk_update")
register("ema_factor_update", "triton", "kfac_kernels.ops.triton.syrk:ema_factor_update")
register("conv_input_factor", "triton", "kfac_kernels.ops.triton.conv_factor:conv_input_factor")
register("kron_precondition_eigen", "triton", "kfac_kernels.ops.triton.kron:kron_precondition_eigen")
register("ekfac_precondition", "triton", "kfac_kernels.ops.triton.kron:ekfac_precondition")
register("kron_precondition_inverse", "triton",
         "kfac_kernels.ops.triton.kron:kron_precondition_inverse")

"""Where the fast backends live. Only names are recorded here: nothing is imported.

A backend package provides ``probe() -> (ok, reason)`` and one function per op it implements,
with the reference's signature (inputs already checked by :mod:`kfac_kernels.ops`).
"""
from ._registry import register, register_backend

# syrk_update / ema_factor_update and conv_input_factor register in their own op modules
# (ops/syrk.py, ops/conv_factor.py) and newton_schulz (ops/orthogonalization.py); the other ops still here.
# Triton (kfac_kernels/ops/triton): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
register_backend("triton", "kfac_kernels.ops.triton:probe")
register("kron_precondition_eigen", "triton", "kfac_kernels.ops.triton.kron:kron_precondition_eigen")
register("ekfac_precondition", "triton", "kfac_kernels.ops.triton.kron:ekfac_precondition")
register("kron_precondition_inverse", "triton",
         "kfac_kernels.ops.triton.kron:kron_precondition_inverse")
# Optimizer ops (kfac_kernels.optim; gradient_factor_update registers in ops/gradient_factors.py):
# the eigenbasis rotations on the batched GEMM kernel of kron.py. inverse_root decomposes through
# symeig's backends; eigenbasis_power_step is torch (QR) everywhere.
register("kron_rotate", "triton", "kfac_kernels.ops.triton.kron:kron_rotate")

# CUDA C++ kernels (kfac_kernels._C) and cuSOLVER through CuPy: symeig and damped_inverse.
# On CUDA tensors with backend="auto" these two ops follow kfac_kernels/ops/_decomp_policy.py.
register_backend("cuda", "kfac_kernels.ops.cuda:probe")
register("symeig", "cuda", "kfac_kernels.ops.cuda.symeig:symeig")
register("damped_inverse", "cuda", "kfac_kernels.ops.cuda.damped_inverse:damped_inverse")
register_backend("cupy", "kfac_kernels.ops.cupy:probe")
register("symeig", "cupy", "kfac_kernels.ops.cupy.symeig:symeig")

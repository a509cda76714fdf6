"""Input checks shared by the op modules (each op checks its inputs once, in its public wrapper,
so the backends repeat none). Every error names the argument, what it got and what is expected.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

#: dtypes of the factors, bases, eigenvalues and scalings the ops keep (fp32 or fp64)
FACTOR_DTYPES = (torch.float32, torch.float64)
#: dtypes of the activations, gradients and vectors the ops read
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: True while dynamo traces: the wrappers then route through their torch.library custom ops
compiling = torch.compiler.is_compiling


def check_tensor(name, t, dtypes=None, dims=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape "
                         f"{tuple(t.shape)}")


def check_same_device(**tensors):
    devs = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devs.values())) > 1:
        raise ValueError("inputs are on different devices: "
                         + ", ".join(f"{n} on {d}" for n, d in devs.items()))


def check_number(name, v):
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")


def check_damping(damping, batch_shape, device):
    if isinstance(damping, torch.Tensor):
        if damping.dim() not in (0, len(batch_shape)) or (
                damping.dim() and tuple(damping.shape) != tuple(batch_shape)):
            raise ValueError(f"damping must be a number, a 0-d tensor or have shape "
                             f"{tuple(batch_shape)}, got {tuple(damping.shape)}")
        if damping.device != device:
            raise ValueError(f"damping is on {damping.device}, the matrices on {device}")
    else:
        check_number("damping", damping)
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")


def split_damping(damping):
    """(tensor or None, float) as the custom ops take a damping that is a number or a tensor."""
    if isinstance(damping, torch.Tensor):
        return damping, 0.0
    return None, float(damping)


def join_damping(damping_t: Optional[torch.Tensor], damping_f: float):
    """The damping back from :func:`split_damping`'s pair (inside a custom op)."""
    return damping_t if damping_t is not None else damping_f


def check_symmetric_stack(name, f):
    check_tensor(name, f, FACTOR_DTYPES, (2, 3))
    if f.shape[-1] != f.shape[-2]:
        raise ValueError(f"{name} must be square matrices, got shape {tuple(f.shape)}")


def check_prev_eigenvectors(factors: torch.Tensor, prev: Optional[torch.Tensor]) -> None:
    """A warm start's eigenvectors: a factor-dtype stack of the factors' shape, on their device."""
    if prev is None:
        return
    check_tensor("prev_eigenvectors", prev, FACTOR_DTYPES)
    if prev.shape != factors.shape:
        raise ValueError(f"prev_eigenvectors has shape {tuple(prev.shape)}, "
                         f"factors {tuple(factors.shape)}")
    check_same_device(factors=factors, prev_eigenvectors=prev)

"""Curvature blocks and the table that maps module types to them."""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch.nn as nn

from .base import Block, BlockInputError, SyrkJob, WEIGHT_SHARING
from .conv import ConvBlock
from .linear import LinearBlock

__all__ = ["Block", "BlockInputError", "LinearBlock", "ConvBlock", "SyrkJob", "block_type_for",
           "WEIGHT_SHARING"]


def block_type_for(module: nn.Module) -> Tuple[Optional[Type[Block]], str]:
    """(block class, "") for a supported module, else (None, reason it is left to the fallback)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            return None, f"{type(module).__name__} with groups={module.groups} is not supported yet"
        return ConvBlock, ""
    if isinstance(module, nn.Linear):
        if type(module).__name__ == "NonDynamicallyQuantizableLinear":
            return None, ("the out_proj of nn.MultiheadAttention is applied functionally, so its "
                          "forward hooks never run")
        return LinearBlock, ""
    return None, f"no block for {type(module).__name__}"

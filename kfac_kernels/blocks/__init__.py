"""Curvature blocks and the table that maps module types to them."""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch.nn as nn

from .base import Block, BlockInputError, SyrkJob, WEIGHT_SHARING
from .conv import ConvBlock, ConvTransposeBlock, GroupedConvBlock
from .embedding import EmbeddingBlock
from .linear import LinearBlock, TransposedLinearBlock, is_transposed_linear
from .norm import NORM_TYPES, NormBlock
from .state import BlockState

__all__ = ["Block", "BlockInputError", "BlockState", "LinearBlock", "ConvBlock", "GroupedConvBlock",
           "ConvTransposeBlock", "TransposedLinearBlock",
           "EmbeddingBlock", "NormBlock", "SyrkJob", "block_type_for", "WEIGHT_SHARING"]

_FUSED_RNN = {nn.RNN: "RNN", nn.LSTM: "LSTM", nn.GRU: "GRU", nn.RNNCell: "RNNCell",
              nn.LSTMCell: "LSTMCell", nn.GRUCell: "GRUCell"}


def block_type_for(module: nn.Module) -> Tuple[Optional[Type[Block]], str]:
    """(block class, "") for a supported module, else (None, reason it is left to the fallback)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (GroupedConvBlock if module.groups != 1 else ConvBlock), ""
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        if module.groups != 1:
            return None, "grouped transposed convolutions have no block yet (groups != 1)"
        return ConvTransposeBlock, ""
    if is_transposed_linear(module):
        return TransposedLinearBlock, ""
    if isinstance(module, nn.Linear):
        if type(module).__name__ == "NonDynamicallyQuantizableLinear":
            return None, ("the out_proj of nn.MultiheadAttention is applied functionally, so its "
                          "forward hooks never run; kfac_kernels.nn.convert(model) swaps in "
                          "kfac_kernels.nn.MultiheadAttention")
        return LinearBlock, ""
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return None, "nn.Embedding(sparse=True) produces sparse gradients"
        if module.max_norm is not None:
            return None, ("nn.Embedding(max_norm=...) renormalises its rows in place during the "
                          "forward pass")
        return EmbeddingBlock, ""
    if isinstance(module, NORM_TYPES):
        return NormBlock, ""
    for cls, name in _FUSED_RNN.items():
        if type(module) is cls:
            return None, (f"torch's nn.{name} computes its gate pre-activations inside one fused "
                          f"op, hidden from hooks; use kfac_kernels.nn.{name} (same maths, built "
                          f"from nn.Linear; kfac_kernels.nn.convert(model) swaps it in)")
    if isinstance(module, nn.MultiheadAttention):
        return None, ("nn.MultiheadAttention applies its input projections functionally (hooks "
                      "never see them); kfac_kernels.nn.convert(model) swaps in "
                      "kfac_kernels.nn.MultiheadAttention (same maths, nn.Linear projections)")
    return None, f"no block for {type(module).__name__}"

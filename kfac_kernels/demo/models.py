"""The two models of the demo, both for scikit-learn's 8x8 handwritten digits.

* ``autoencoder``: the deep autoencoder benchmark of Hinton & Salakhutdinov (2006) used by Martens
  (2010) and Martens & Grosse (2015, K-FAC), scaled from 784-dim MNIST to 64-dim digits:
  64-256-128-64-16-64-128-256-64 with tanh units, a linear 16-unit code layer and 64 output
  logits (sigmoid, Bernoulli likelihood on pixel intensities in [0, 1]).
* ``cnn``: a small convolutional classifier, 1x8x8 -> conv3x3(16) -> conv3x3/2(32) -> 64 -> 10.

Initialisation is Glorot (Xavier) normal with the tanh gain for tanh layers and He (Kaiming) normal
for ReLU layers, biases zero: the standard choice for each activation, used for every optimiser.
With PyTorch's default initialisation (uniform, variance 1/(3 fan_in)) the eight-layer tanh
autoencoder starts on the plateau where it outputs the mean image, and every optimiser spends its
first hundreds of steps there; that measures the initialisation more than the optimiser.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

AUTOENCODER_DIMS = (64, 256, 128, 64, 16, 64, 128, 256, 64)
CODE_DIM = min(AUTOENCODER_DIMS)


def autoencoder(dims: Sequence[int] = AUTOENCODER_DIMS) -> nn.Sequential:
    """Deep tanh autoencoder; the code layer (the narrowest) and the output layer are linear."""
    dims = tuple(dims)
    code = dims.index(min(dims))
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        lin = nn.Linear(d_in, d_out)
        hidden = i + 1 != code and i + 1 != len(dims) - 1
        gain = nn.init.calculate_gain("tanh") if hidden else 1.0
        nn.init.xavier_normal_(lin.weight, gain=gain)
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if hidden:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def cnn(num_classes: int = 10) -> nn.Sequential:
    """Small CNN for 1x8x8 digits (inputs arrive flattened to 64 and are reshaped)."""
    net = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),             # 16 x 8 x 8
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # 32 x 4 x 4
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )
    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if m is net[-1]:
                nn.init.xavier_normal_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


BUILDERS = {"autoencoder": autoencoder, "cnn": cnn}


def build(name: str, seed: int) -> nn.Module:
    """The model ``name`` with initial weights drawn from ``seed`` (independent of global state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILDERS[name]()

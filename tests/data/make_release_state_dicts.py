"""Writes tests/data/state_dicts_release.pt: KFAC state_dicts saved by the release's code.

Run with the release's kfac_kernels first on the path (the fixture was made from commit 3890c7a,
before the blocks' saved state became a ``BlockState`` record):

    PYTHONPATH=/path/to/old/checkout python tests/data/make_release_state_dicts.py

For each inverse kind: the model's and the optimiser's state_dicts after ``SAVED_AT`` steps, and
the parameters after ``AFTER`` more steps as the same code computed them. A float64 model (a
grouped convolution, a layer norm and two linear layers: stacked, plain and bias-less blocks),
so that the test that loads it can compare the continued run with a float64 tolerance.
``tests/test_block_state.py`` builds the same model and batches from the functions below.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("eigh", "cholesky", "ekfac", "eigen_adam")
SAVED_AT, AFTER = 5, 3


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(36, 6), nn.LayerNorm(6), nn.Tanh(),
                         nn.Linear(6, 3, bias=False)).double()


def options(inverse: str) -> dict:
    damping = 1e-8 if inverse == "eigen_adam" else 1e-2
    return dict(lr=0.05, momentum=0.9, damping=damping, curvature="fisher",
                likelihood="categorical", inverse=inverse, inverse_every=2, seed=3,
                ema_decay=0.9, weight_decay=1e-3)


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(9, 2, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (9,), generator=g))


def step(net, opt, s: int) -> None:
    x, y = batch(s)
    out = net(x)
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    opt.backward(loss, out)
    opt.step()


def main() -> None:
    import kfac_kernels as kk
    data = {"torch": torch.__version__, "kfac_kernels": kk.__version__}
    for inverse in KINDS:
        net = model()
        opt = kk.KFAC(net, **options(inverse))
        for s in range(SAVED_AT):
            step(net, opt, s)
        # copies: a state_dict holds the optimiser's live buffers (momentum), which the steps
        # below would change
        saved = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict()})
        for s in range(SAVED_AT, SAVED_AT + AFTER):
            step(net, opt, s)
        saved["after"] = [p.detach().clone() for p in net.parameters()]
        data[inverse] = saved
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "state_dicts_release.pt")
    torch.save(data, out)
    print("wrote", out, "with", kk.__file__, file=sys.stderr)


if __name__ == "__main__":
    main()

"""The optimiser end to end on each fast backend against the reference backend.

On CPU the Triton kernels run under the interpreter (tests/conftest.py); the CUDA backend's
decompositions need a device (marked gpu). The whole training trajectory must agree: factor
updates, decompositions and the batched preconditioning all go through the chosen backend.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.ops import backend_status
from helpers import rel_err


class Net(nn.Module):
    """Two same-shaped Linear layers (one batched group), a conv, a bias-free layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.a = nn.Linear(27, 9)
        self.b = nn.Linear(27, 9)
        self.out = nn.Linear(9, 4, bias=False)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.out(torch.tanh(self.a(h)) + torch.tanh(self.b(h)))


def train(backend, inverse, device="cpu", steps=4, dtype=torch.float32):
    torch.manual_seed(0)
    model = Net().to(device=device, dtype=dtype)
    opt = kk.KFAC(model, lr=0.1, momentum=0.5, damping=1e-2, curvature="ggn",
                  likelihood="categorical", inverse=inverse, inverse_every=2, kl_clip=1e-2,
                  backend=backend)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(13, 2, 6, 6, generator=g).to(device=device, dtype=dtype)
        y = torch.randint(0, 4, (13,), generator=g).to(device)
        out = model(x)
        opt.zero_grad()
        opt.backward(F.cross_entropy(out, y), out)
        opt.step()
    return model, opt


@pytest.mark.parametrize("inverse", ["eigh", "cholesky"])
def test_triton_backend_trains_like_the_reference(inverse):
    ok, why = backend_status("triton")
    if not ok:
        pytest.skip(f"triton backend unavailable: {why}")
    # in float64 (tests/README.md): four steps of a nonlinear model amplify the kernels' rounding
    # differences by an amount no bound states; the float32 kernels have their own tests
    ref_model, ref_opt = train("torch", inverse, dtype=torch.float64)
    tri_model, tri_opt = train("triton", inverse, dtype=torch.float64)
    assert "syrk_update=triton" in tri_opt.describe()
    for name in ref_opt.blocks:
        assert rel_err(tri_opt.blocks[name].A, ref_opt.blocks[name].A) < 1e-12
        assert rel_err(tri_opt.blocks[name].G, ref_opt.blocks[name].G) < 1e-12
    for p, q in zip(ref_model.parameters(), tri_model.parameters()):
        assert rel_err(q.detach(), p.detach()) < 1e-10


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("inverse", ["eigh", "cholesky"])
def test_gpu_backends_train_like_the_reference(backend, inverse):
    ok, why = backend_status(backend) if backend != "auto" else (True, "")
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")
    ref_model, _ = train("torch", inverse, device="cuda")
    model, _ = train(backend, inverse, device="cuda")
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert rel_err(q.detach(), p.detach()) < 1e-3

"""Shared pieces of the decomposition tests (test_decomp_twins.py, test_cuda_backend_emulated.py,
test_decomp_gpu.py): well-conditioned SPD stacks and the eigendecomposition check."""
import torch


def spd(bsz, n, dtype, seed=0, shift=0.0, device="cpu"):
    """``bsz`` SPD matrices of size n (Gram matrices of 2n+1 Gaussian columns, plus ``shift`` I),
    drawn in float64 on the CPU, so every device and dtype sees the same matrices."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(bsz, n, 2 * n + 1, generator=g, dtype=torch.float64)
    f = x @ x.transpose(-1, -2) / (2 * n + 1) + shift * torch.eye(n, dtype=torch.float64)
    return f.to(device=device, dtype=dtype)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_eigh(f, lam, q, bound):
    """Eigen-residual ‖FQ − QΛ‖/‖F‖ per matrix, orthogonality of Q and the eigenvalues against
    float64 ``eigvalsh``, all within ``bound``; eigenvalues ascending. Returns the worst residual."""
    fd, qd, ld = f.double(), q.double(), lam.double()
    norm = fd.flatten(-2).norm(dim=-1).clamp_min(1e-300)
    res = ((fd @ qd - qd * ld.unsqueeze(-2)).flatten(-2).norm(dim=-1) / norm).max().item()
    eye = torch.eye(f.shape[-1], dtype=torch.float64, device=f.device)
    orth = (qd.transpose(-1, -2) @ qd - eye).abs().max().item()
    ev = ((ld - torch.linalg.eigvalsh(fd)).abs().amax(-1) / norm).max().item()
    assert res <= bound and orth <= bound and ev <= bound, (res, orth, ev)
    assert bool((ld[..., 1:] >= ld[..., :-1]).all()), "eigenvalues not ascending"
    return res

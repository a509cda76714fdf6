"""Brute-force references for the tests: per-example computations in float64 that share no code
with the library's capture, scaling or batching (Jacobians and Hessians by autograd.functional,
patches by F.unfold)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kfac_kernels.curvature import per_example_loss, sample_vectors


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _positions(module, a, s):
    """Per-example layer inputs as rows [T, k(+1)] and an index map for s -> [T, m]."""
    if isinstance(module, torch.nn.Linear):
        rows = a.reshape(-1, a.shape[-1])
        s_rows = lambda t: t.reshape(-1, t.shape[-1])                    # noqa: E731
    else:  # Conv2d
        k = module.kernel_size
        rows = F.unfold(a.unsqueeze(0), k, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)[0].T                         # [T, C*k*k]
        s_rows = lambda t: t.reshape(t.shape[0], -1).T                      # [m, T] -> [T, m]
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    return rows, s_rows


def sampled_targets(likelihood, out, mc_samples, seed):
    """The targets y_hat that KFAC(seed=...) draws (same generator, same order)."""
    gen = torch.Generator(device=out.device)
    gen.manual_seed(seed)
    ys = []
    for v in sample_vectors(likelihood, out, mc_samples, gen):
        f = out.detach()
        if likelihood == "categorical":
            onehot = torch.softmax(f, -1) - v
            ys.append(onehot.argmax(-1))
        elif likelihood == "gaussian":
            ys.append(f - v)
        else:
            ys.append(torch.sigmoid(f) - v)
    return ys


def brute_factors(model, name, x, y, curvature, likelihood, weight_sharing,
                  fisher_targets=None):
    """A and G of block ``name`` by per-example loops (DESIGN.md §1 formulas, float64)."""
    module = dict(model.named_modules())[name]
    n_ex = x.shape[0]
    A = G = 0.0
    for n in range(n_ex):
        store = {}
        h = module.register_forward_hook(lambda m, a, o: store.update(a=a[0].detach(), s=o.detach()))
        out0 = model(x[n:n + 1]).detach()
        h.remove()
        rows, s_rows = _positions(module, store["a"][0], store["s"][0])
        s0 = store["s"]

        def f_of_s(s_val):
            hh = module.register_forward_hook(lambda m, a, o: s_val)
            try:
                return model(x[n:n + 1])
            finally:
                hh.remove()

        if curvature == "ggn":
            J = torch.autograd.functional.jacobian(f_of_s, s0)           # out.shape + s.shape
            J = J.reshape(out0.numel(), *s0.shape[1:])                    # [D, s...]
            H = torch.autograd.functional.hessian(
                lambda f: per_example_loss(likelihood, f, _dummy(likelihood, f)).sum(), out0)
            H = H.reshape(out0.numel(), out0.numel())
            L = _sqrt_psd(H)
            gs_list = [[s_rows(torch.einsum("d,d...->...", L[:, k], J)) for k in range(L.shape[1])]]
        else:
            targets = [y[n:n + 1]] if curvature == "empirical" else \
                [t[n:n + 1] for t in fisher_targets]
            gs_list = []
            for tgt in targets:
                s_var = s0.clone().requires_grad_(True)
                loss_n = per_example_loss(likelihood, f_of_s(s_var), tgt).sum()
                g, = torch.autograd.grad(loss_n, s_var)
                gs_list.append([s_rows(g[0])])
        if weight_sharing == "expand":
            A = A + rows.T @ rows / rows.shape[0]
            Gn = sum(sum(gt.T @ gt for gt in gs) for gs in gs_list)
        else:
            abar = rows.mean(0, keepdim=True)
            A = A + abar.T @ abar
            Gn = 0.0
            for gs in gs_list:
                for gt in gs:
                    gsum = gt.sum(0, keepdim=True)
                    Gn = Gn + gsum.T @ gsum
        G = G + Gn / len(gs_list)
    return A / n_ex, G / n_ex


def _dummy(likelihood, f):
    if likelihood == "categorical":
        return torch.zeros(f.shape[:-1], dtype=torch.long)
    return torch.zeros_like(f)


def _sqrt_psd(H):
    lam, Q = torch.linalg.eigh(H)
    return Q * lam.clamp_min(0).sqrt()

"""Brute-force references for the tests: per-example computations in float64 that share no code
with the library's capture, scaling or batching (Jacobians and Hessians by autograd.functional,
patches by F.unfold)."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from kfac_kernels.curvature import per_example_loss, sample_vectors


HOST_SYNC = ("item", "__bool__", "__float__", "__int__", "tolist", "nonzero", "__index__")


@contextlib.contextmanager
def host_sync_forbidden():
    """Inside the block every Tensor method that reads a value on the host raises (so a test
    fails on a hidden .item() or data-dependent branch in the step)."""
    saved = {n: getattr(torch.Tensor, n) for n in HOST_SYNC}

    def boom(self, *a, **k):
        raise AssertionError("host sync inside step()")

    for n in HOST_SYNC:
        setattr(torch.Tensor, n, boom)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@contextlib.contextmanager
def cuda_sync_forbidden():
    """Inside the block a CUDA call that synchronises the host raises (torch's sync debug mode)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


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
    """A and G of block ``name`` by per-example loops (docs/math.md formulas, float64)."""
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


# ----------------------------------------------------------------------------------------------
# General per-example references for every block family (grouped convs, embeddings, normalisation
# layers, modules called several times). Patches come from a convolution with one-hot kernels,
# embedding inputs from explicit one-hot rows, normalisation curvature from per-example gradients
# of the parameters themselves: nothing is shared with the library's capture or batching.
def onehot_patches(module, a):
    """[T, C*K] patches of one example's conv input a [1, C, *sp] (order (c, k...)), by a grouped
    convolution with one-hot kernels, honouring the module's padding mode."""
    nd = a.dim() - 2
    k = module.kernel_size
    K = math.prod(k)
    C = a.shape[1]
    eye = torch.eye(K, dtype=a.dtype).reshape(K, 1, *k).repeat(C, 1, *([1] * nd))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    if module.padding_mode != "zeros":
        a = F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        pad = 0
    else:
        pad = module.padding
    p = conv(a, eye, stride=module.stride, padding=pad, dilation=module.dilation, groups=C)
    return p.reshape(C * K, -1).T


def _group_rows(module, a, g):
    """Per group: (input rows [T, k(+1)], output-gradient rows [T, m]) of one call of one example."""
    if isinstance(module, torch.nn.Embedding):
        tok = a.reshape(-1)
        keep = torch.ones_like(tok, dtype=torch.bool) if module.padding_idx is None else \
            tok != module.padding_idx
        rows = F.one_hot(tok[keep], module.num_embeddings).to(g.dtype)
        return [(rows, g.reshape(-1, g.shape[-1])[keep])]
    if isinstance(module, torch.nn.Linear):
        groups, rows, grows = 1, a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    else:
        groups = module.groups
        rows = onehot_patches(module, a)
        grows = g.reshape(g.shape[1], -1).T
    out = []
    for j in range(groups):
        r = rows.chunk(groups, 1)[j]
        if module.bias is not None:
            r = torch.cat([r, torch.ones(r.shape[0], 1, dtype=r.dtype)], 1)
        out.append((r, grows.chunk(groups, 1)[j]))
    return out


def _passes(model, module, xn, yn, curvature, likelihood, targets_n):
    """For one example: its per-call layer inputs, and per backward vector of the metric
    (weight, [output-gradient of each call])."""
    calls, outs = [], []

    def record(m, a, o):
        calls.append(a[0].detach())
        outs.append(o.detach())

    h = module.register_forward_hook(record)
    model(xn)
    h.remove()
    # zero probes added to each call's output: d(loss)/d(probe_c) is the TOTAL derivative at the
    # call's output node, through every later use (later time steps included), as backprop sees it
    s_vars = [torch.zeros_like(o).requires_grad_(True) for o in outs]
    counter = [0]

    def replace(m, a, o):
        v = s_vars[counter[0]]
        counter[0] += 1
        return o + v

    h = module.register_forward_hook(replace)
    try:
        out = model(xn)
    finally:
        h.remove()
    res = []
    if curvature == "ggn":
        H = torch.autograd.functional.hessian(
            lambda f: per_example_loss(likelihood, f, _dummy(likelihood, f)).sum(), out.detach())
        L = _sqrt_psd(H.reshape(out.numel(), out.numel()))
        for k in range(L.shape[1]):
            gs = torch.autograd.grad(out, s_vars, grad_outputs=L[:, k].reshape(out.shape),
                                     retain_graph=True, allow_unused=True)
            res.append((1.0, gs))
    else:
        tgts = [yn] if curvature == "empirical" else targets_n
        for tgt in tgts:
            loss = per_example_loss(likelihood, out, tgt).sum()
            gs = torch.autograd.grad(loss, s_vars, retain_graph=True, allow_unused=True)
            res.append((1.0 / len(tgts), gs))
    res = [(w, [torch.zeros_like(s) if g is None else g for g, s in zip(gs, s_vars)])
           for w, gs in res]
    return calls, res


def brute_block(model, name, x, y, curvature, likelihood, weight_sharing, fisher_targets=None):
    """Per-example reference of block ``name`` (Linear, Conv1d/2d/3d with any groups, Embedding;
    any number of calls per forward pass), in float64.

    Returns per group: A (dense; for an embedding the dense one-hot second moment), G, and the
    per-example gradient matrices D [n_examples * n_passes, m, k(+1)] scaled by sqrt(pass weight),
    so that the metric's exact diagonal block is (1/N) sum vec(D) vec(D)^T.
    """
    module = dict(model.named_modules())[name]
    n_ex = x.shape[0]
    A, G, D, count = None, None, [], 0
    for n in range(n_ex):
        tn = None if fisher_targets is None else [t[n:n + 1] for t in fisher_targets]
        calls, passes = _passes(model, module, x[n:n + 1], y[n:n + 1], curvature, likelihood, tn)
        first = True
        for w, gs in passes:
            per_call = [_group_rows(module, a, g) for a, g in zip(calls, gs)]   # [call][group]
            groups = len(per_call[0])
            if A is None:
                A = [0.0] * groups
                G = [0.0] * groups
                D = [[] for _ in range(groups)]
            for j in range(groups):
                rows = torch.cat([pc[j][0] for pc in per_call])
                grows = torch.cat([pc[j][1] for pc in per_call])
                if first:
                    if weight_sharing == "expand":
                        A[j] = A[j] + rows.T @ rows
                    else:
                        abar = rows.mean(0, keepdim=True) if rows.shape[0] else rows.sum(0, keepdim=True)
                        A[j] = A[j] + abar.T @ abar
                if weight_sharing == "expand":
                    G[j] = G[j] + w * grows.T @ grows
                else:
                    gsum = grows.sum(0, keepdim=True)
                    G[j] = G[j] + w * gsum.T @ gsum
                D[j].append(w ** 0.5 * grows.T @ rows)
            if first:
                count += rows.shape[0]
            first = False
    denom = count if weight_sharing == "expand" else n_ex
    return ([a / denom for a in A], [g / n_ex for g in G], [torch.stack(d) for d in D])


def brute_norm(model, name, x, y, curvature, likelihood, fisher_targets=None):
    """Exact per-channel [scale, shift] curvature of a normalisation layer, [C, 2, 2] (1 x 1
    without a shift), from per-example gradients of its parameters (model in eval mode for
    batch norm, so examples are independent)."""
    module = dict(model.named_modules())[name]
    bias = getattr(module, "bias", None)
    params = [module.weight] + ([bias] if bias is not None else [])
    F_ = 0.0
    for n in range(x.shape[0]):
        out = model(x[n:n + 1])
        if curvature == "ggn":
            H = torch.autograd.functional.hessian(
                lambda f: per_example_loss(likelihood, f, _dummy(likelihood, f)).sum(),
                out.detach())
            L = _sqrt_psd(H.reshape(out.numel(), out.numel()))
            vecs = [(1.0, (out * L[:, k].reshape(out.shape)).sum()) for k in range(L.shape[1])]
        else:
            tgts = [y[n:n + 1]] if curvature == "empirical" else \
                [t[n:n + 1] for t in fisher_targets]
            vecs = [(1.0 / len(tgts), per_example_loss(likelihood, out, t).sum()) for t in tgts]
        for w, scalar in vecs:
            gs = torch.autograd.grad(scalar, params, retain_graph=True)
            u = torch.stack([g.reshape(-1) for g in gs], -1)          # [C, 2]
            F_ = F_ + w * u.unsqueeze(-1) * u.unsqueeze(-2)
    return F_ / x.shape[0]


# ----------------------------------------------------------------------------- tolerances
# The rule (tests/README.md, "Tolerances"): a bound on a float32 / TF32 / bf16 / fp16 result is the
# algorithm's error bound for the problem at hand (size, condition number, unit roundoff), or the
# comparison is made in float64. These helpers write those bounds once.

TF32 = "tf32"   # TF32 matrix units: inputs rounded to 10 explicit mantissa bits, fp32 accumulation


def unit_roundoff(dtype) -> float:
    """u = 2^-p (p significand bits): 2^-53 float64, 2^-24 float32, 2^-11 float16 and TF32,
    2^-8 bfloat16. Every rounding of a real x gives x (1 + d) with |d| <= u."""
    if dtype == TF32:
        return 2.0 ** -11
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n successive roundings
    (a sum or dot product of n terms is exact for perturbed terms |d_i| <= gamma_n)."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma({n}) is undefined in {dtype}: n u >= 1")
    return nu / (1 - nu)


def sum_tol(ref: torch.Tensor, ref_abs: torch.Tensor, terms: int, acc=torch.float32,
            inputs=None, out=None) -> float:
    """Bound on the relative Frobenius error of a result whose every entry is a sum of at most
    ``terms`` products (a GEMM, a syrk, a chain of them), accumulated in ``acc``:
    ``|fl(s) - s| <= gamma_terms |A||B|`` entrywise, so ``gamma_terms ||ref_abs|| / ||ref||`` with
    ``ref_abs`` the same computation run on absolute values (float64). ``inputs``: a dtype the
    inputs were rounded to from the reference's float64 data (bf16, fp16, TF32; each product of
    ``factors`` rounded numbers adds 2 u_in, 3 for a triple product: pass a tuple (dtype, count)).
    ``out``: the dtype the result is stored in (one more rounding, u_out relative to ||ref||)."""
    ratio = float(ref_abs.double().norm() / ref.double().norm().clamp_min(1e-300))
    tol = gamma(terms, acc) * ratio
    if inputs is not None:
        dtype, count = inputs if isinstance(inputs, tuple) else (inputs, 2)
        tol += gamma(count, dtype) * ratio
    if out is not None:
        tol += unit_roundoff(out) * (1 + tol)
    return tol


def solve_tol(n: int, kappa: float, dtype, c: float = 1.0) -> float:
    """First-order bound ``c n u kappa`` on the relative error of a backward-stable solve,
    inverse or eigendecomposition-based matrix function of an n x n matrix of condition number
    ``kappa`` (backward error ``c n u ||F||``, amplified by ``kappa``). ``c`` counts the
    backward-stable stages whose errors add (documented at each call)."""
    return c * n * unit_roundoff(dtype) * kappa


def eig_tol(n: int, dtype, c: float = 1.0) -> float:
    """Backward error of a stable symmetric eigensolver: ``||F Q - Q L||_F / ||F||_F`` and
    ``||Q^T Q - I||`` at most ``c n u`` (Householder tridiagonalisation, QR/divide and conquer,
    Jacobi; Higham, Accuracy and Stability, and Demmel's Applied Numerical Linear Algebra)."""
    return c * n * unit_roundoff(dtype)


def cond_psd(F: torch.Tensor, epsilon: float = 0.0) -> float:
    """Largest condition number over a stack of PSD matrices shifted by ``epsilon``,
    (lam_max + eps) / (max(lam_min, 0) + eps), from float64 eigenvalues."""
    lam = torch.linalg.eigvalsh(F.double()).clamp_min(0) + epsilon
    return float((lam[..., -1] / lam[..., 0].clamp_min(1e-300)).max())

"""Pure-torch twins of the CUDA kernels' algorithms (csrc/cholesky.cuh, csrc/jacobi.cuh).

Each twin re-implements its kernel step for step, vectorised over the batch instead of over
threads: the same Jacobi round-robin pairs, thresholds, rotation formulas, update order and
convergence test; the same left-looking Cholesky with fp64 dot products, the same in-place
triangular inverse and W^T W product; the same tile loops of the blocked variant (panel
factorisation, W_kk-based panel solve, tile-lower trailing update, inverse by tile diagonals).
Precision follows the kernels: storage in the input dtype, accumulations in ``acc`` (fp64 by
default), rotations computed in fp64 and applied in the input dtype.

They run on any device and are what the CPU tests check against ``torch.linalg``; the kernels'
own code is checked on the CPU by the host emulation in ``kfac_kernels._C`` (see
docs/cuda.md). Slow (Python loops over columns / rounds): for tests, not for use.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

__all__ = [
    "jacobi_pairs",
    "jacobi_eigh_twin",
    "chol_lower_twin",
    "trtri_lower_twin",
    "damped_inverse_twin",
    "damped_inverse_blocked_twin",
    "JACOBI_OK",
    "JACOBI_NOT_CONVERGED",
    "JACOBI_NON_FINITE",
]

JACOBI_OK, JACOBI_NOT_CONVERGED, JACOBI_NON_FINITE = 0, 1, 2
TILE = 32


def _acc(dtype: torch.dtype, fp64_accumulate: bool) -> torch.dtype:
    return torch.float64 if (fp64_accumulate or dtype == torch.float64) else torch.float32


def _damped(factors: torch.Tensor, damping) -> torch.Tensor:
    f = factors.unsqueeze(0) if factors.dim() == 2 else factors
    g = torch.as_tensor(damping, dtype=f.dtype, device=f.device).reshape(-1)
    g = g.expand(f.shape[0]) if g.numel() == 1 else g
    a = f.clone()
    idx = torch.arange(f.shape[-1], device=f.device)
    a[:, idx, idx] = a[:, idx, idx] + g[:, None]  # same rounding as the kernels' v + g
    return a


# ----------------------------------------------------------------------------- Cholesky
def chol_lower_twin(a: torch.Tensor, acc: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-looking Cholesky of the lower triangles of ``a`` [B, n, n] (chol_lower_inplace).

    Returns (L in a's dtype, lower triangle valid, upper part untouched; info int32 [B]: 0 or the
    1-based column whose pivot is not positive and finite)."""
    t = a.dtype
    out = a.clone()
    bsz, n = a.shape[0], a.shape[-1]
    info = torch.zeros(bsz, dtype=torch.int32, device=a.device)
    for j in range(n):
        rows = out[:, j:, :j].to(acc)
        s = out[:, j:, j].to(acc) - (rows * out[:, j, :j].to(acc).unsqueeze(1)).sum(-1)
        d = s[:, 0]
        bad = ~(d > 0) | ~torch.isfinite(d)
        info = torch.where(bad & (info == 0), torch.full_like(info, j + 1), info)
        ljj = torch.sqrt(torch.where(bad, torch.ones_like(d), d))
        inv = 1.0 / ljj
        col = torch.cat([ljj.unsqueeze(1), s[:, 1:] * inv.unsqueeze(1)], dim=1)
        out[:, j:, j] = col.to(t)
    return out, info


def trtri_lower_twin(l: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """In-place-order inverse W = L^{-1} of lower-triangular ``l`` (trtri_lower_inplace): column
    j from right to left, W_ij = -W_jj sum_{k=j+1}^{i} W_ik L_kj. Upper part of the result is
    whatever ``l`` held there (the kernels never read it)."""
    t = l.dtype
    w = l.clone()
    n = l.shape[-1]
    dinv = 1.0 / torch.diagonal(l, dim1=-2, dim2=-1).to(acc)
    for j in range(n - 1, -1, -1):
        if j < n - 1:
            wsub = _tril(w[:, j + 1:, j + 1:].to(acc))
            s = (wsub @ w[:, j + 1:, j].to(acc).unsqueeze(-1)).squeeze(-1)
            w[:, j + 1:, j] = (-dinv[:, j].unsqueeze(1) * s).to(t)
        w[:, j, j] = dinv[:, j].to(t)
    return w


def _tril(x: torch.Tensor) -> torch.Tensor:
    """Lower triangle (as where(), which is safe on NaN in the upper part and fast on views)."""
    n = x.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _lauum(w: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    wl = _tril(w.to(acc))
    return (wl.transpose(-1, -2) @ wl).to(w.dtype)


def damped_inverse_twin(factors: torch.Tensor, damping, *, fp64_accumulate: bool = True):
    """Twin of the one-block-per-matrix kernel: returns ((F + gamma I)^{-1}, info)."""
    a = _damped(factors, damping)
    acc = _acc(a.dtype, fp64_accumulate)
    l, info = chol_lower_twin(a, acc)
    inv = _lauum(trtri_lower_twin(l, acc), acc)
    inv = torch.where((info != 0).reshape(-1, 1, 1), torch.full_like(inv, float("nan")), inv)
    if factors.dim() == 2:
        return inv[0], info[0]
    return inv, info


def damped_inverse_blocked_twin(factors: torch.Tensor, damping, *, fp64_accumulate: bool = True,
                                tile: int = TILE):
    """Twin of the tiled kernels (blocked_sequence): returns ((F + gamma I)^{-1}, info)."""
    out = _damped(factors, damping)
    t = out.dtype
    acc = _acc(t, fp64_accumulate)
    bsz, n = out.shape[0], out.shape[-1]
    nt = (n + tile - 1) // tile
    work = torch.zeros_like(out)
    info = torch.zeros(bsz, dtype=torch.int32, device=out.device)

    def sl(i):
        return slice(i * tile, min(n, (i + 1) * tile))

    tile_of = torch.arange(n, device=out.device) // tile
    for k in range(nt):
        kk = sl(k)
        lkk, c = chol_lower_twin(out[:, kk, kk], acc)
        info = torch.where((c != 0) & (info == 0), k * tile + c, info)
        low = torch.ones(lkk.shape[-1], lkk.shape[-1], dtype=torch.bool, device=lkk.device).tril()
        out[:, kk, kk] = torch.where(low, lkk, out[:, kk, kk])
        wkk = _tril(trtri_lower_twin(lkk, acc))
        work[:, kk, kk] = wkk
        if k + 1 < nt:
            rest = slice(kk.stop, n)
            panel = (out[:, rest, kk].to(acc) @ wkk.to(acc).transpose(-1, -2)).to(t)
            out[:, rest, kk] = panel
            upd = panel.to(acc) @ panel.to(acc).transpose(-1, -2)
            trail = out[:, rest, rest]
            tiles = tile_of[kk.stop:]
            mask = tiles.unsqueeze(1) >= tiles.unsqueeze(0)  # tile-lower part only
            out[:, rest, rest] = torch.where(mask, (trail.to(acc) - upd).to(t), trail)
    for d in range(1, nt):
        for j in range(nt - d):
            i = j + d
            s = 0
            for p in range(j, i):
                s = s + out[:, sl(i), sl(p)].to(acc) @ work[:, sl(p), sl(j)].to(acc)
            work[:, sl(i), sl(j)] = (-(work[:, sl(i), sl(i)].to(acc) @ s)).to(t)
    inv = torch.empty_like(out)
    for r in range(nt):
        for c in range(nt):
            s = 0
            for k in range(max(r, c), nt):
                s = s + work[:, sl(k), sl(r)].to(acc).transpose(-1, -2) @ work[:, sl(k), sl(c)].to(acc)
            inv[:, sl(r), sl(c)] = s.to(t)
    inv = torch.where((info != 0).reshape(-1, 1, 1), torch.full_like(inv, float("nan")), inv)
    if factors.dim() == 2:
        return inv[0], info[0]
    return inv, info


# ----------------------------------------------------------------------------- Jacobi
def jacobi_pairs(m: int) -> List[Tuple[List[int], List[int]]]:
    """Round-robin pairs of even order ``m`` (jacobi_pair): per round, (p list, q list), p < q."""
    mm = m - 1
    rounds = []
    for r in range(mm):
        ps, qs = [], []
        for k in range(m // 2):
            a, b = (r, mm) if k == 0 else ((r + k) % mm, (r - k + mm) % mm)
            ps.append(min(a, b))
            qs.append(max(a, b))
        rounds.append((ps, qs))
    return rounds


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def jacobi_eigh_twin(factors: torch.Tensor, prev_eigenvectors: Optional[torch.Tensor] = None, *,
                     tol: float, max_sweeps: int):
    """Twin of jacobi_eigh_kernel: returns (eigenvalues ascending, eigenvectors, info, sweeps)."""
    squeeze = factors.dim() == 2
    f = factors.unsqueeze(0) if squeeze else factors
    t = f.dtype
    bsz, n = f.shape[0], f.shape[-1]
    m = n + (n & 1)
    dev = f.device
    a = torch.zeros(bsz, m, m, dtype=t, device=dev)
    a[:, :n, :n] = f
    v = torch.eye(m, dtype=t, device=dev).repeat(bsz, 1, 1)
    if prev_eigenvectors is not None:
        q0 = (prev_eigenvectors.unsqueeze(0) if squeeze else prev_eigenvectors).to(t)
        fq = (a[:, :n, :n].double() @ q0.double()).to(t)
        rot = (q0.double().transpose(-1, -2) @ fq.double()).to(t)
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=dev), 1)
        avg = torch.tensor(0.5, dtype=t, device=dev) * (rot + rot.transpose(-1, -2))
        rot = torch.where(upper | upper.T, avg, rot)
        a[:, :n, :n] = rot
        v[:, :n, :n] = q0
    finite = torch.isfinite(a).flatten(1).all(1) & torch.isfinite(v).flatten(1).all(1)
    a = torch.where(finite.reshape(-1, 1, 1), a, torch.zeros_like(a))
    ad = a.double()
    amax = ad.abs().flatten(1).amax(1)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    normf = torch.where(amax > 0, amax * torch.sqrt(((ad / safe.reshape(-1, 1, 1)) ** 2).flatten(1).sum(1)),
                        torch.zeros_like(amax))
    floor_ = _eps(t) * normf
    converged = torch.zeros(bsz, dtype=torch.bool, device=dev)
    active = finite.clone()
    sweeps = torch.zeros(bsz, dtype=torch.int32, device=dev)
    rounds = [(torch.tensor(p, device=dev), torch.tensor(q, device=dev)) for p, q in jacobi_pairs(m)]

    def threshold(app, aqq):
        return torch.maximum(tol * torch.sqrt(app.abs()) * torch.sqrt(aqq.abs()), floor_.unsqueeze(1))

    flat = a.view(bsz, m * m)
    for _ in range(max_sweeps):
        live = active & ~converged
        if not bool(live.any()):
            break
        rotated = torch.zeros(bsz, dtype=torch.bool, device=dev)
        for p, q in rounds:
            pp, qq, pq, qp = p * (m + 1), q * (m + 1), p * m + q, q * m + p
            app = flat.index_select(1, pp).double()
            aqq = flat.index_select(1, qq).double()
            apq = flat.index_select(1, pq).double()
            rot = (apq.abs() > threshold(app, aqq)) & live.unsqueeze(1)
            if not bool(rot.any()):
                continue
            rotated |= rot.any(1)
            theta = (aqq - app) / (2.0 * torch.where(rot, apq, torch.ones_like(apq)))
            at = theta.abs()
            sign = torch.where(theta >= 0, torch.ones_like(theta), -torch.ones_like(theta))
            tt = torch.where(at > 1e150, 0.5 / theta, sign / (at + torch.sqrt(1.0 + theta * theta)))
            tt = torch.where(rot, tt, torch.zeros_like(tt))
            c = 1.0 / torch.sqrt(1.0 + tt * tt)
            s = tt * c
            dpp, dqq = app - tt * apq, aqq + tt * apq
            ct, st = c.to(t), s.to(t)
            # A <- J^T A (rows p, q), then A <- A J (columns p, q): the kernels' 2 x 2 order
            cr, sr = ct.unsqueeze(-1), st.unsqueeze(-1)
            ap, aq = a.index_select(1, p), a.index_select(1, q)
            a.index_copy_(1, p, cr * ap - sr * aq)
            a.index_copy_(1, q, sr * ap + cr * aq)
            cc, sc = ct.unsqueeze(1), st.unsqueeze(1)
            ap, aq = a.index_select(2, p), a.index_select(2, q)
            a.index_copy_(2, p, cc * ap - sc * aq)
            a.index_copy_(2, q, sc * ap + cc * aq)
            # rotated pairs: the new diagonal from the 2 x 2 solution, a_pq exactly 0
            zero = torch.zeros((), dtype=t, device=dev)
            flat.index_copy_(1, pp, torch.where(rot, dpp.to(t), flat.index_select(1, pp)))
            flat.index_copy_(1, qq, torch.where(rot, dqq.to(t), flat.index_select(1, qq)))
            flat.index_copy_(1, pq, torch.where(rot, zero, flat.index_select(1, pq)))
            flat.index_copy_(1, qp, torch.where(rot, zero, flat.index_select(1, qp)))
            vp, vq = v.index_select(2, p), v.index_select(2, q)
            v.index_copy_(2, p, cc * vp - sc * vq)
            v.index_copy_(2, q, sc * vp + cc * vq)
        sweeps += (rotated & live).to(torch.int32)
        converged |= live & ~rotated
    # sweep limit: converged iff no pair is above its threshold
    d = torch.diagonal(a, dim1=-2, dim2=-1)[:, :n].double()
    thr = torch.maximum(tol * torch.sqrt(d.abs()).unsqueeze(2) * torch.sqrt(d.abs()).unsqueeze(1),
                        floor_.reshape(-1, 1, 1))
    off = torch.triu(a[:, :n, :n].double().abs() > thr, 1).flatten(1).any(1)
    converged |= active & ~off
    info = torch.where(~finite, torch.full_like(sweeps, JACOBI_NON_FINITE),
                       torch.where(converged, torch.zeros_like(sweeps),
                                   torch.full_like(sweeps, JACOBI_NOT_CONVERGED)))
    sweeps = torch.where(finite, sweeps, torch.zeros_like(sweeps))
    diag = torch.diagonal(a, dim1=-2, dim2=-1)[:, :n]
    lam, perm = torch.sort(diag, dim=-1, stable=True)
    vec = torch.gather(v[:, :n, :n], -1, perm.unsqueeze(1).expand(bsz, n, n))
    bad = info != 0
    lam = torch.where(bad.unsqueeze(1), torch.full_like(lam, float("nan")), lam)
    vec = torch.where(bad.reshape(-1, 1, 1), torch.full_like(vec, float("nan")), vec)
    if squeeze:
        return lam[0], vec[0], info[0], sweeps[0]
    return lam, vec, info, sweeps

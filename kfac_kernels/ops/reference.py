"""Pure-torch reference implementations of every kernel op.

These are the truth that every fast backend is tested against, and the path used wherever no
faster backend applies (CPU tensors, or ``backend="torch"``). They favour clarity over speed but
are not naive: everything is batched and runs on any device torch supports.

Input checking is done once, in the public wrappers of :mod:`kfac_kernels.ops`; the functions
here assume well-formed inputs.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

__all__ = [
    "syrk_update",
    "ema_factor_update",
    "conv_patches",
    "conv_input_factor",
    "symeig",
    "refresh_eigh",
    "offdiag_ratio",
    "orthonormalize",
    "damped_inverse",
    "kron_precondition_eigen",
    "kron_precondition_inverse",
    "ekfac_precondition",
    "conv_input_factor_grouped",
    "kron_precondition_diag",
    "ekfac_scalings",
    "ekfac_scalings_embedding",
    "gradient_factor_update",
    "kron_rotate",
    "root_from_eig",
    "inverse_root",
    "eigenbasis_power_step",
    "newton_schulz",
    "NS_COEFFICIENTS",
]

Number = Union[float, int]


_ONES: "dict[tuple, torch.Tensor]" = {}     # ones columns by (shape, dtype, device)


def _homogeneous(x: torch.Tensor) -> torch.Tensor:
    """``[x, 1]``; the ones column of each shape is made once (a factor step asks for the same
    few shapes every time)."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:   # traced, fake, subclass
        return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
    key = (tuple(x.shape[:-1]), x.dtype, x.device)
    ones = _ONES.get(key)
    if ones is None:
        if len(_ONES) >= 64:
            _ONES.clear()
        ones = _ONES[key] = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    return torch.cat([x, ones], dim=-1)


_GRAM_BLOCK = 128     # column-block width of the symmetric product (see _gram)


def _gram(xf: torch.Tensor, c: float, out: torch.Tensor) -> torch.Tensor:
    """``out <- c (x^T x + (x^T x)^T) = 2c x^T x`` ([..., k, k], exactly symmetric), computing only
    the upper triangle of blocks.

    With k split into b column blocks, block row i is one product with the columns from block i
    on, written into the upper triangle and mirrored into the lower: about (b+1)/(2b) of a full
    product's work, e.g. 62% for b = 4, in b products (on a 2-core CPU, one thread: 0.72x the
    time of square blocks at k = 784, 0.76x at 2048). Inputs narrower than three blocks use one
    product (two blocks would save a quarter of the work for a dozen more calls). Either way the
    result is symmetrised exactly.
    """
    k = xf.shape[-1]
    nb = min(8, k // _GRAM_BLOCK)
    xt = xf.transpose(-1, -2)
    mm = torch.addmm if xf.dim() == 2 else torch.baddbmm
    if nb < 3:
        prod = mm(out, xt, xf, beta=0.0, alpha=c)       # beta 0: out's contents are ignored
        return torch.add(prod, prod.transpose(-1, -2), out=out)
    edges = [round(i * k / nb) for i in range(nb + 1)]
    for i in range(nb):         # block row i of the upper triangle, mirrored below
        a, b = edges[i], edges[i + 1]
        panel = mm(out[..., a:b, a:], xt[..., a:b, :], xf[..., :, a:], beta=0.0, alpha=c)
        diag = panel[..., :, :b - a]
        out[..., a:b, a:b] = diag + diag.transpose(-1, -2)
        if b < k:
            right = panel[..., :, b - a:]
            right = right.add_(right)
            out[..., a:b, b:] = right
            out[..., b:, a:b] = right.transpose(-1, -2)
    return out


_ONES_COLUMN_MAX = 1 << 18     # inputs up to this many entries get their ones column appended


def syrk_update(factor: torch.Tensor, x: torch.Tensor, *, alpha: float, beta: float,
                homogeneous: bool = False, allow_tf32: bool = False) -> torch.Tensor:
    """In place: ``factor <- beta * factor + alpha * xbar^T xbar``; ``xbar = [x, 1]`` if homogeneous.

    ``x`` is [n, k] (or [B, n, k] for a stack of factors [B, d, d]); the product is formed in the
    factor's dtype. ``beta == 0`` ignores the old contents (NaN included), as in BLAS. The
    homogeneous row/column are the column sums of x and the corner is n (exact): a small input
    gets its ones column appended, so that the whole factor is one symmetric product (fewer
    calls); a large one (e.g. the unfolded patches of a convolution) is not copied, its sums fill
    the last row and column. The result is exactly symmetric.
    """
    xf = x if x.dtype == factor.dtype else x.to(factor.dtype)
    if homogeneous and xf.numel() <= _ONES_COLUMN_MAX:
        xf, homogeneous = _homogeneous(xf), False
    k = xf.shape[-1]
    core = factor[..., :k, :k] if homogeneous else factor
    if beta == 0:                                  # alpha xbar^T xbar, exactly symmetric
        _gram(xf, 0.5 * alpha, core)
    else:
        core.mul_(beta).add_(_gram(xf, 0.5 * alpha, torch.empty_like(core)))
    if homogeneous:
        colsum = xf.sum(dim=-2) * alpha                # [..., k]
        n = alpha * xf.shape[-2]
        row, col, corner = factor[..., k, :k], factor[..., :k, k], factor[..., k, k]
        if beta == 0:
            row.copy_(colsum)
            col.copy_(colsum)
            corner.fill_(n)
        else:
            row.mul_(beta).add_(colsum)
            col.mul_(beta).add_(colsum)
            corner.mul_(beta).add_(n)
    return factor


def ema_factor_update(factor: torch.Tensor, x: torch.Tensor, decay: float, *,
                      homogeneous: bool = False, scale: Optional[float] = None,
                      allow_tf32: bool = False) -> torch.Tensor:
    """In place: ``factor <- decay * factor + (1 - decay) * scale * xbar^T xbar``.

    ``scale`` defaults to ``1 / rows`` (rows = ``x.shape[-2]``), i.e. the running average of the
    uncentred second moment.
    """
    if scale is None:
        scale = 1.0 / x.shape[-2]
    return syrk_update(factor, x, alpha=(1.0 - decay) * scale, beta=decay,
                       homogeneous=homogeneous, allow_tf32=allow_tf32)


def _tuple(v, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    if len(v) != n:
        raise ValueError(f"{name} has {len(v)} entries, expected {n} for a {n}-d convolution")
    return v


def _patch_view(x: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """A strided view [N, C, T_1..T_d, K_1..K_d] of a Conv1d/2d/3d input's patches (after zero
    padding, which is the only copy)."""
    nd = x.dim() - 2
    ks = _tuple(kernel_size, nd, "kernel_size")
    st = _tuple(stride, nd, "stride")
    pd = _tuple(padding, nd, "padding")
    dl = _tuple(dilation, nd, "dilation")
    if any(pd):
        pads = []
        for p in reversed(pd):
            pads += [p, p]
        x = torch.nn.functional.pad(x, pads)
    for i in range(nd):
        span = dl[i] * (ks[i] - 1) + 1
        x = x.unfold(2 + i, span, st[i])           # appends a window dim of length `span`
    # keep every dilation-th element of each window
    idx = (slice(None),) * (2 + nd) + tuple(slice(None, None, d) for d in dl)
    return x[idx]


def conv_patches(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """The im2col patch matrix [N, T, C * prod(kernel_size)] of a Conv1d/2d/3d input.

    Patch entries are ordered (c, k_1, ..., k_d), the order of ``weight.flatten(1)`` and of
    ``torch.nn.functional.unfold``; T counts output positions. This materialises every patch and
    exists for the reference path and for tests.
    """
    nd = x.dim() - 2
    v = _patch_view(x, kernel_size, stride, padding, dilation)
    n = v.shape[0]
    t = math.prod(v.shape[2:2 + nd])
    v = v.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))  # [N, T..., C, K...]
    return v.reshape(n, t, -1)


def conv_patch_columns(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1
                       ) -> torch.Tensor:
    """The patches as columns, [C*K, N*T] contiguous: the layout whose Gram product is a plain
    GEMM (one strided gather, measured as fast as ``F.unfold`` or faster on CPU)."""
    nd = x.dim() - 2
    v = _patch_view(x, kernel_size, stride, padding, dilation)         # [N, C, T..., K...]
    n, c = v.shape[:2]
    v = v.permute(1, *range(2 + nd, 2 + 2 * nd), 0, *range(2, 2 + nd))  # [C, K..., N, T...]
    return v.reshape(c * math.prod(v.shape[1:1 + nd]), -1)


def conv_input_factor(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, *,
                      homogeneous: bool = False, out_dtype: Optional[torch.dtype] = None
                      ) -> torch.Tensor:
    """``(1 / (N T)) sum_{n,t} pbar pbar^T`` over the conv patches of ``x`` (KFC's A factor)."""
    if out_dtype is None:
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cols = conv_patch_columns(x, kernel_size, stride, padding, dilation)   # [C*K, N*T]
    d = cols.shape[0] + int(homogeneous)
    out = torch.empty(d, d, dtype=out_dtype, device=x.device)
    return syrk_update(out, cols.T, alpha=1.0 / cols.shape[1], beta=0.0, homogeneous=homogeneous)


def _eigh_isolated(f: torch.Tensor):
    """torch.linalg.eigh of a stack [B, n, n]; a matrix it fails on gets NaN, not an exception."""
    try:
        return torch.linalg.eigh(f)
    except RuntimeError:  # torch raises for the whole batch; redo one by one to isolate failures
        lam = torch.full(f.shape[:-1], float("nan"), dtype=f.dtype, device=f.device)
        q = torch.full_like(f, float("nan"))
        for i in range(f.shape[0]):
            try:
                lam[i], q[i] = torch.linalg.eigh(f[i])
            except RuntimeError:
                pass
        return lam, q


def _failed_info(lam: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # a sum is finite iff every entry is (|q| <= 1; lam is bounded by the factor's norm)
    wide = torch.float64 if lam.dtype == torch.float64 else torch.float32
    ok = torch.isfinite(lam.sum(-1, dtype=wide) + q.sum((-2, -1), dtype=wide))
    return (~ok).to(torch.int32)


SYMEIG_METHODS = ("auto", "eigh", "jacobi", "refresh")


def symeig(factors: torch.Tensor, *, method: str = "eigh",
           prev_eigenvectors: Optional[torch.Tensor] = None, return_info: bool = False,
           skip_tol: float = 1e-4, orth: str = "qr", tol: Optional[float] = None,
           max_sweeps: Optional[int] = None):
    """Batched symmetric eigendecomposition: eigenvalues ascending, eigenvectors in columns.

    ``method``: ``"eigh"`` (``"auto"`` is the same here) is ``torch.linalg.eigh``;
    ``"refresh"`` updates ``prev_eigenvectors`` by one step of subspace iteration and a
    Rayleigh-Ritz projection, and skips the work for matrices whose previous basis still
    diagonalises them (see :func:`refresh_eigh`, which also takes ``skip_tol`` and ``orth``).
    ``"jacobi"`` is a kernel method (CUDA / CuPy backends) that this backend declines.
    ``tol`` and ``max_sweeps`` bound iterative methods; the direct methods here ignore them.

    ``info`` (returned when asked) is an int32 tensor [B]: 0 where the decomposition succeeded and
    its output is finite, 1 where it failed. A failed matrix gets NaN outputs rather than raising,
    so one bad factor cannot take down its whole batch.
    """
    if method == "jacobi":
        from ._registry import NotSupported
        raise NotSupported("the torch backend has no Jacobi solver (method='jacobi' runs on the "
                           "cuda and cupy backends); use method='eigh' or 'refresh'")
    if method not in SYMEIG_METHODS:
        raise ValueError(f"unknown symeig method {method!r}; expected one of {SYMEIG_METHODS}")
    squeeze = factors.dim() == 2
    f = factors.unsqueeze(0) if squeeze else factors
    if method == "refresh":
        if prev_eigenvectors is None:
            raise ValueError("method='refresh' needs prev_eigenvectors")
        q0 = prev_eigenvectors.unsqueeze(0) if squeeze else prev_eigenvectors
        lam, q, info, _ = refresh_eigh(f, q0, skip_tol=skip_tol, orth=orth)
    else:
        lam, q = _eigh_isolated(f)
        info = _failed_info(lam, q)
    if squeeze:
        lam, q, info = lam[0], q[0], info[0]
    return (lam, q, info) if return_info else (lam, q)


# ----------------------------------------------------------------------------- warm-started refresh
def offdiag_ratio(factors: torch.Tensor, basis: torch.Tensor):
    """``M = Q^T F Q`` (symmetrised) and, per matrix, ``||offdiag(M)||_F / ||diag(M)||_2``.

    With ``Lambda = diag(M)`` the eigen-residual of the basis is
    ``||F Q - Q Lambda||_F / ||F||_F = ||offdiag(M)||_F / ||M||_F <= ratio`` (Q orthonormal), so
    a basis whose ratio is below a tolerance already meets that residual. Batched [B, n, n].
    """
    m = basis.transpose(-1, -2) @ factors @ basis
    m = 0.5 * (m + m.transpose(-1, -2))
    d = torch.diagonal(m, dim1=-2, dim2=-1)
    off = (m - torch.diag_embed(d)).flatten(-2).norm(dim=-1)
    scale = d.norm(dim=-1)
    zero = torch.zeros_like(off)
    ratio = torch.where(scale > 0, off / torch.where(scale > 0, scale, torch.ones_like(scale)),
                        torch.where(off == 0, zero, torch.full_like(off, float("inf"))))
    return m, ratio


def orthonormalize(y: torch.Tensor, orth: str = "qr") -> torch.Tensor:
    """Orthonormal basis of the columns of ``y`` [B, n, k]: Householder QR (``"qr"``) or
    Cholesky-QR (``"cholqr"``: ``R = chol(Y^T Y)``, ``Q = Y R^{-1}``; two matmuls and a small
    Cholesky, faster on GPUs, used where the Cholesky succeeds, QR elsewhere)."""
    if orth == "qr":
        return torch.linalg.qr(y).Q
    if orth != "cholqr":
        raise ValueError(f"orth must be 'qr' or 'cholqr', got {orth!r}")
    gram = y.transpose(-1, -2) @ y
    r, info = torch.linalg.cholesky_ex(0.5 * (gram + gram.transpose(-1, -2)), upper=True)
    q = torch.linalg.solve_triangular(r, y, upper=True, left=False)
    bad = (info != 0) | ~torch.isfinite(q).flatten(-2).all(-1)
    if bool(bad.any()):
        q = torch.where(bad.reshape(-1, 1, 1), torch.linalg.qr(y).Q, q)
    return q


def refresh_eigh(factors: torch.Tensor, prev_eigenvectors: torch.Tensor, *,
                 skip_tol: float = 1e-4, orth: str = "qr", rayleigh_ritz=None):
    """Warm-started refresh of an eigendecomposition, batched over [B, n, n].

    Per matrix: if the previous basis ``Q0`` still diagonalises ``F`` (``offdiag_ratio`` of
    ``Q0^T F Q0`` at most ``skip_tol``, which bounds the eigen-residual by ``skip_tol``), keep
    ``Q0`` and take ``diag(Q0^T F Q0)`` as eigenvalues (no factorisation at all). Otherwise one
    step of subspace iteration, ``Q1 = orth(F Q0)`` (re-orthonormalising a drifted basis on the
    way), then Rayleigh-Ritz: ``Q1^T F Q1 = Z Lambda Z^T`` and ``Q = Q1 Z``. ``rayleigh_ritz(F,
    Q1) -> (lam, Q, info)`` replaces the last step (the CUDA backend passes its warm-started Jacobi
    kernel); the default is ``torch.linalg.eigh`` of ``Q1^T F Q1``.

    Returns ``(eigenvalues ascending [B, n], eigenvectors [B, n, n], info [B] int32, refreshed
    [B] bool)``; ``info`` is 1 (and the outputs NaN) where the inputs are not finite or the
    decomposition failed. Selecting the refreshed matrices costs one host synchronisation.
    """
    f, q0 = factors, prev_eigenvectors.to(factors.dtype)
    bsz, n = f.shape[0], f.shape[-1]
    finite = torch.isfinite(f).flatten(1).all(1) & torch.isfinite(q0).flatten(1).all(1)
    m, ratio = offdiag_ratio(torch.where(finite.reshape(-1, 1, 1), f, torch.zeros_like(f)),
                             torch.where(finite.reshape(-1, 1, 1), q0, torch.zeros_like(q0)))
    skip = finite & (ratio <= skip_tol)
    d = torch.diagonal(m, dim1=-2, dim2=-1)
    lam, order = torch.sort(d, dim=-1, stable=True)
    q = torch.gather(q0, -1, order.unsqueeze(-2).expand(bsz, n, n))
    info = torch.zeros(bsz, dtype=torch.int32, device=f.device)
    need = torch.nonzero(finite & ~skip).flatten()  # host sync
    if need.numel():
        fs, q0s = f.index_select(0, need), q0.index_select(0, need)
        q1 = orthonormalize(fs @ q0s, orth)
        if rayleigh_ritz is None:
            m1 = q1.transpose(-1, -2) @ fs @ q1
            lam_s, z = _eigh_isolated(0.5 * (m1 + m1.transpose(-1, -2)))
            q_s = q1 @ z
            info_s = _failed_info(lam_s, q_s)
        else:
            lam_s, q_s, info_s = rayleigh_ritz(fs, q1)
        lam = lam.index_copy(0, need, lam_s.to(lam.dtype))
        q = q.index_copy(0, need, q_s.to(q.dtype))
        info = info.index_copy(0, need, info_s.to(torch.int32))
    info = torch.where(finite, info, torch.ones_like(info))
    bad = (info != 0)
    lam = torch.where(bad.reshape(-1, 1), torch.full_like(lam, float("nan")), lam)
    q = torch.where(bad.reshape(-1, 1, 1), torch.full_like(q, float("nan")), q)
    return lam, q, info, finite & ~skip


def _damping_tensor(damping, f: torch.Tensor) -> torch.Tensor:
    """Damping as a tensor broadcastable against f's leading batch dims (shape [..., 1, 1])."""
    g = torch.as_tensor(damping, dtype=f.dtype, device=f.device)
    return g.reshape(g.shape + (1, 1)) if g.dim() else g


def damped_inverse(factors: torch.Tensor, damping, *, return_info: bool = False):
    """Batched ``(F + damping I)^{-1}`` through a Cholesky factorisation.

    ``damping`` is a number, a 0-d tensor or one value per matrix ([B]). ``info`` (when asked) is
    cholesky's: 0 on success, k > 0 where the leading k-by-k minor is not positive definite (that
    matrix's inverse is then NaN).
    """
    n = factors.shape[-1]
    eye = torch.eye(n, dtype=factors.dtype, device=factors.device)
    damped = factors + _damping_tensor(damping, factors) * eye
    chol, info = torch.linalg.cholesky_ex(damped)
    inv = torch.cholesky_inverse(chol)
    bad = (info != 0).reshape(info.shape + (1, 1))
    inv = torch.where(bad, torch.full_like(inv, float("nan")), inv)  # no host sync
    return (inv, info) if return_info else inv


def _eig_divide(Vt: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """Vt / denom where denom > 0, else 0 (the pseudo-inverse on the null space)."""
    out = Vt / denom
    return out.masked_fill_(denom <= 0, 0.0)


def pinv_cut(x: torch.Tensor, damping, dims: int) -> torch.Tensor:
    """``x`` clamped at 0, and where the damping is 0 also every entry ``<= k eps max(x)`` set to
    exactly 0: ``max`` over the last ``dims`` dims (one matrix's eigenvalues, ``dims=1``, or
    scalings [m, n], ``dims=2``), ``k`` the largest of their sizes, ``eps`` that of ``x``'s dtype.
    For eigenvalues this is ``torch.linalg.pinv``'s default cut-off; docs/math.md ("The undamped
    update") gives the rule for scalings. Where the damping is positive nothing is cut and the
    values are exactly ``x.clamp_min(0)``. A number damping costs nothing when positive; a tensor
    one (0-d or one value per matrix) is compared on the device, without a sync."""
    x = x.clamp_min(0)
    if not isinstance(damping, torch.Tensor) and damping != 0:
        return x
    red = tuple(range(-dims, 0))
    k = max(x.shape[-dims:])
    tol = x.amax(dim=red, keepdim=True) * (k * torch.finfo(x.dtype).eps)
    cut = x.masked_fill(x <= tol, 0.0)
    if not isinstance(damping, torch.Tensor):
        return cut
    d = damping.reshape(damping.shape + (1,) * dims) if damping.dim() else damping
    return torch.where(d == 0, cut, x)


def _finish(U: torch.Tensor, V: torch.Tensor, out_dtype, return_dot: bool):
    if return_dot:
        dot = torch.linalg.vecdot(U.flatten(-2), V.to(U.dtype).flatten(-2))
        return U.to(out_dtype), dot
    return U.to(out_dtype)


def kron_precondition_eigen(V: torch.Tensor, QG: torch.Tensor, lamG: torch.Tensor,
                            QA: torch.Tensor, lamA: torch.Tensor, damping, *,
                            return_dot: bool = False):
    """``U = QG [(QG^T V QA) / (lamG lamA^T + damping)] QA^T`` (eigenvalues clamped at 0).

    Batched over a leading dim; computed in the eigenvectors' dtype and returned in ``V``'s.
    Entries whose denominator is not positive are set to 0. With damping 0 each factor's
    eigenvalues at most ``size eps max`` count as 0 (:func:`pinv_cut`), so the result is
    ``pinv(G) V pinv(A)`` as ``torch.linalg.pinv`` computes it. With ``return_dot`` also returns ``sum(U * V)`` per matrix ([B]),
    in the eigenvectors' dtype, as KL clipping needs.
    """
    w = QG.dtype
    Vw = V.to(w)
    Vt = QG.transpose(-1, -2) @ Vw @ QA
    denom = (pinv_cut(lamG.to(w), damping, 1).unsqueeze(-1)
             * pinv_cut(lamA.to(w), damping, 1).unsqueeze(-2))
    denom = denom + _damping_tensor(damping, Vt)
    U = QG @ _eig_divide(Vt, denom) @ QA.transpose(-1, -2)
    return _finish(U, Vw, V.dtype, return_dot)


def ekfac_precondition(V: torch.Tensor, QG: torch.Tensor, QA: torch.Tensor,
                       scalings: torch.Tensor, damping, *, return_dot: bool = False):
    """EKFAC: ``U = QG [(QG^T V QA) / (scalings + damping)] QA^T`` (George et al. 2018).

    Scalings are clamped at 0; with damping 0 those at most ``max(m, n) eps max(scalings)`` count
    as 0 (:func:`pinv_cut`): the pseudo-inverse of the EKFAC matrix, 0 on its null space."""
    w = QG.dtype
    Vw = V.to(w)
    Vt = QG.transpose(-1, -2) @ Vw @ QA
    denom = pinv_cut(scalings.to(w), damping, 2) + _damping_tensor(damping, Vt)
    U = QG @ _eig_divide(Vt, denom) @ QA.transpose(-1, -2)
    return _finish(U, Vw, V.dtype, return_dot)


def kron_precondition_inverse(V: torch.Tensor, G_inv: torch.Tensor, A_inv: torch.Tensor, *,
                              return_dot: bool = False):
    """``U = G_inv V A_inv`` batched; computed in the inverses' dtype, returned in ``V``'s."""
    w = G_inv.dtype
    Vw = V.to(w)
    U = G_inv @ Vw @ A_inv
    return _finish(U, Vw, V.dtype, return_dot)


# ----------------------------------------------------------------------------- layer-specific ops
def conv_input_factor_grouped(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1,
                              groups: int = 1, *, homogeneous: bool = False,
                              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """KFC input factors of a grouped convolution, one per group: ``[groups, d, d]``.

    Group ``j`` sees input channels ``[j C/groups, (j+1) C/groups)``; its factor is
    ``(1/(N T)) sum_{n,t} pbar pbar^T`` over those channels' patches (ordered like the group's
    ``weight[j Og:(j+1) Og].flatten(1)``). This reference materialises the patches once.
    """
    if out_dtype is None:
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    p = conv_patches(x, kernel_size, stride, padding, dilation)            # [N, T, C*K]
    n, t, ck = p.shape
    rows = p.reshape(n * t, groups, ck // groups).transpose(0, 1)          # [g, NT, Cg*K]
    d = ck // groups + int(homogeneous)
    out = torch.empty(groups, d, d, dtype=out_dtype, device=x.device)
    return syrk_update(out, rows, alpha=1.0 / (n * t), beta=0.0, homogeneous=homogeneous)


def kron_precondition_diag(V: torch.Tensor, QG: torch.Tensor, scalings: torch.Tensor, damping, *,
                           return_dot: bool = False):
    """``U = QG [(QG^T V) / (scalings + damping)]``: Kronecker (or EKFAC) preconditioning when the
    right factor is diagonal, so its eigenbasis is the identity and never materialised.

    For K-FAC ``scalings = lamG lamA^T`` (``lamA`` the diagonal of A); for EKFAC the corrected
    eigenvalues. Scalings are clamped at 0; with damping 0 those at most ``max(m, n) eps max``
    count as 0 (:func:`pinv_cut`) and zero denominators give 0 (the pseudo-inverse).
    """
    w = QG.dtype
    Vw = V.to(w)
    Vt = QG.transpose(-1, -2) @ Vw
    denom = pinv_cut(scalings.to(w), damping, 2) + _damping_tensor(damping, Vt)
    U = QG @ _eig_divide(Vt, denom)
    return _finish(U, Vw, V.dtype, return_dot)


def ekfac_scalings(g: torch.Tensor, a: torch.Tensor, QG: torch.Tensor, QA: torch.Tensor, *,
                   homogeneous: bool = False, alpha: float = 1.0,
                   chunk_elements: int = 1 << 24) -> torch.Tensor:
    """EKFAC statistics ``alpha * sum_n (QG^T D_n QA)^2`` with the per-example gradient
    ``D_n = sum_t g[n, t] abar[n, t]^T``, abar = [a, 1] when ``homogeneous``.

    ``g`` is [..., N, T, m], ``a`` [..., N, T, k]; leading dims batch independent problems (one
    per group of a grouped convolution) and match ``QG`` [..., m, m], ``QA`` [..., n, n].
    Projections first: ``QG^T D_n QA = (g_n QG)^T (abar_n QA)``. With T = 1 the sum over examples
    is one matrix product of squares and no per-example gradient is formed; otherwise the
    projected per-example gradients are formed for ``chunk_elements``-sized chunks of examples.
    """
    w = QG.dtype
    gp = g.to(w) @ QG.unsqueeze(-3)                                        # [..., N, T, m]
    af = a.to(w)
    if homogeneous:
        af = _homogeneous(af)
    ap = af @ QA.unsqueeze(-3)                                             # [..., N, T, n]
    n_ex, t = gp.shape[-3], gp.shape[-2]
    if t == 1:
        out = (gp.squeeze(-2) ** 2).transpose(-1, -2) @ (ap.squeeze(-2) ** 2)
        return out.mul_(alpha)
    m, n = gp.shape[-1], ap.shape[-1]
    lead = math.prod(gp.shape[:-3])
    step = max(1, chunk_elements // max(1, lead * m * n))
    out = None
    for s in range(0, n_ex, step):
        D = gp[..., s:s + step, :, :].transpose(-1, -2) @ ap[..., s:s + step, :, :]   # [.., c, m, n]
        part = (D * D).sum(-3)
        out = part if out is None else out.add_(part)
    return out.mul_(alpha)


def ekfac_scalings_embedding(g: torch.Tensor, tokens: torch.Tensor, QG: torch.Tensor,
                             num_embeddings: int, *, padding_idx: Optional[int] = None,
                             alpha: float = 1.0) -> torch.Tensor:
    """EKFAC statistics of an embedding (A diagonal, so its eigenbasis is the identity):
    ``alpha * sum_n (QG^T D_n)^2`` [m, V] with ``D_n = sum_t g[n, t] e_{tokens[n, t]}^T``.

    ``g`` is [N, T, m], ``tokens`` [N, T]. Each example's positions holding the same token are
    summed first (sort + segment sum, no [N, V] buffer and no host synchronisation); positions
    holding ``padding_idx`` do not count.
    """
    w = QG.dtype
    n_ex, t, m = g.shape
    gp = g.to(w) @ QG                                                      # [N, T, m]
    if padding_idx is not None:
        gp = gp * (tokens != padding_idx).unsqueeze(-1).to(w)
    tok, order = tokens.sort(dim=1)
    gp = gp.gather(1, order.unsqueeze(-1).expand(n_ex, t, m))
    first = torch.ones_like(tok, dtype=torch.bool)
    first[:, 1:] = tok[:, 1:] != tok[:, :-1]
    seg = first.to(torch.int64).cumsum(1) - 1                              # segment id per position
    flat = (torch.arange(n_ex, device=g.device).unsqueeze(1) * t + seg).reshape(-1)
    sums = torch.zeros(n_ex * t, m, dtype=w, device=g.device).index_add_(0, flat, gp.reshape(-1, m))
    seg_tok = torch.zeros(n_ex * t, dtype=torch.int64, device=g.device).scatter_(
        0, flat, tok.reshape(-1))                                          # unused segments: sum 0
    out = torch.zeros(num_embeddings, m, dtype=w, device=g.device).index_add_(0, seg_tok, sums * sums)
    return out.transpose(0, 1).mul_(alpha)


# ----------------------------------------------------------------------------- optimizer ops
# The building blocks of Shampoo and SOAP (kfac_kernels.optim): the two Gram factors of a
# gradient matrix, rotations into (and out of) their eigenbases, inverse roots, and one step of
# warm-started power iteration for the eigenbasis.
def gradient_factor_update(left: Optional[torch.Tensor], right: Optional[torch.Tensor],
                           grad: torch.Tensor, *, beta: float, scale: float,
                           allow_tf32: bool = False):
    """In place: ``left <- beta left + scale G G^T`` and ``right <- beta right + scale G^T G``.

    ``grad`` is [m, n] or a stack [B, m, n]; ``left`` is [.., m, m], ``right`` [.., n, n]; either
    may be None (that side is skipped). The products are formed in the factors' dtype and are
    exactly symmetric; ``beta == 0`` overwrites the old contents. Returns ``(left, right)``.
    """
    if left is not None:
        syrk_update(left, grad.transpose(-1, -2), alpha=scale, beta=beta)
    if right is not None:
        syrk_update(right, grad, alpha=scale, beta=beta)
    return left, right


def kron_rotate(V: torch.Tensor, QL: Optional[torch.Tensor], QR: Optional[torch.Tensor], *,
                back: bool = False) -> torch.Tensor:
    """``QL^T V QR`` (into the bases), or with ``back`` ``QL V QR^T`` (out of them), batched.

    A side given as None is the identity. Computed and returned in the bases' dtype."""
    w = (QL if QL is not None else QR).dtype
    out = V.to(w)
    if QL is not None:
        out = (QL if back else QL.transpose(-1, -2)) @ out
    if QR is not None:
        out = out @ (QR.transpose(-1, -2) if back else QR)
    return out


def root_from_eig(lam: torch.Tensor, Q: torch.Tensor, root: float, epsilon: float) -> torch.Tensor:
    """``Q diag((clamp(lam, 0) + epsilon)^(-1/root)) Q^T``; an eigenvalue whose shifted value is
    not positive (epsilon 0 on a null direction) contributes 0, as a pseudo-inverse would."""
    shifted = lam.clamp_min(0) + epsilon
    pos = shifted > 0
    scale = torch.where(pos, shifted, torch.ones_like(shifted)).pow(-1.0 / root)
    scale = torch.where(pos, scale, torch.zeros_like(scale))
    out = (Q * scale.unsqueeze(-2)) @ Q.transpose(-1, -2)
    return 0.5 * (out + out.transpose(-1, -2))


def inverse_root(factors: torch.Tensor, root: float, *, epsilon: float = 0.0,
                 method: str = "eigh", prev_eigenvectors: Optional[torch.Tensor] = None,
                 return_eigenvectors: bool = False):
    """Batched ``(F + epsilon I)^(-1/root)`` of symmetric positive semidefinite matrices from
    their eigendecomposition (:func:`symeig`; eigenvalues clamped at 0 first). ``method="refresh"``
    warm-starts the decomposition from ``prev_eigenvectors``. With ``return_eigenvectors`` also
    returns the eigenvectors (to warm-start the next call)."""
    lam, q = symeig(factors, method=method, prev_eigenvectors=prev_eigenvectors)
    out = root_from_eig(lam, q, root, epsilon)
    return (out, q) if return_eigenvectors else out


def eigenbasis_power_step(factors: torch.Tensor, Q: torch.Tensor, *, shift: Optional[float] = None):
    """One step of warm-started power (subspace) iteration for the eigenbasis of ``F``: SOAP's
    refresh (Vyas et al. 2024; Wang et al. 2024), ``Q' = orth(F Q)``. Batched [B, n, n].

    The columns are orthonormalised in decreasing order of their Rayleigh quotients
    ``d = diag(Q^T F Q)`` (so the dominant directions are kept exactly and the weak ones are
    orthogonalised against them) and put back in their original positions, so column j of
    ``Q'`` continues column j of ``Q`` (Adam's second moment in that coordinate stays valid).
    Each column's sign is chosen to agree with ``F q_j``. ``F`` is shifted by ``c I`` first,
    ``c = shift * max |d|`` (same eigenvectors): a rank-deficient ``F`` (a factor built from a
    few gradients) would otherwise hand QR null columns, which it completes with rounding noise;
    with the shift those columns keep their previous direction. ``shift`` defaults to
    ``max(16 n eps, 1e-6)`` (eps of the dtype). Returns ``(Q', d)``.
    """
    n = factors.shape[-1]
    if shift is None:
        shift = max(16 * n * torch.finfo(factors.dtype).eps, 1e-6)
    q = Q.to(factors.dtype)
    fq = factors @ q
    d = (q * fq).sum(-2)                                           # Rayleigh quotients [.., n]
    c = d.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(factors.dtype).tiny) * shift
    y = fq + c.unsqueeze(-2) * q
    order = torch.argsort(d, dim=-1, descending=True, stable=True)
    idx = order.unsqueeze(-2).expand(y.shape)
    qq, rr = torch.linalg.qr(y.gather(-1, idx))
    sign = torch.diagonal(rr, dim1=-2, dim2=-1).sign()
    qq = qq * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)
    return torch.empty_like(qq).scatter_(-1, idx, qq), d


# ----------------------------------------------------------------------------- Newton-Schulz
# Muon's orthogonalisation (kfac_kernels.optim.Muon), batched over stacks of same-shaped matrices.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)   # the quintic of Jordan et al.'s Muon (and torch's)


def newton_schulz(X: torch.Tensor, steps: int = 5,
                  coefficients: Tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7, *, dtype: Optional[torch.dtype] = None,
                  allow_tf32: bool = False) -> torch.Tensor:
    """``steps`` Newton-Schulz iterations towards the orthogonal factor ``U V^T`` of ``X = U S V^T``
    (the "zeroth power" of Muon), batched over [B, m, n] (or one [m, n]).

    In the iteration dtype ``dtype`` (default: ``X``'s), with ``Y`` the wide orientation of ``X``
    (``X^T`` when m > n, so the Gram matrix is the smaller side)::

        Y <- Y / max(||Y||_F, eps)                     (per matrix)
        repeat steps times:
            A = Y Y^T                                  symmetric product (see _sym_addmm)
            B = b A + c A A                            A A = A A^T: a symmetric product again
            Y <- a Y + B Y

    and ``Y`` (transposed back) is returned as a new tensor in the iteration dtype. ``allow_tf32``
    is for the GPU backends' fp32 products (the reference computes exactly in ``dtype``).
    """
    a, b, c = (float(v) for v in coefficients)
    w = X.dtype if dtype is None else dtype
    Y = X.to(w)
    tall = Y.shape[-2] > Y.shape[-1]
    if tall:
        Y = Y.transpose(-1, -2)
    Y = Y / torch.linalg.vector_norm(Y, dim=(-2, -1), keepdim=True).clamp_min(eps)
    m = Y.shape[-2]
    mm = torch.addmm if Y.dim() == 2 else torch.baddbmm
    A = Y.new_empty(*Y.shape[:-1], m)
    B = torch.empty_like(A)
    for _ in range(steps):
        A = _sym_addmm(A, Y, Y.transpose(-1, -2), 0.0, 1.0, A)     # A = Y Y^T
        B = _sym_addmm(A, A, A, b, c, B)                           # B = b A + c A A
        Y = mm(Y, B, Y, beta=a)
    return (Y.transpose(-1, -2) if tall else Y).contiguous()


def _sym_addmm(C: torch.Tensor, L: torch.Tensor, R: torch.Tensor, beta: float, alpha: float,
               out: torch.Tensor) -> torch.Tensor:
    """``beta C + alpha L R`` for a product known to be symmetric (``R = L^T``, or ``L = R``
    symmetric), each element rounded once (the scalars are applied inside the product);
    ``beta == 0`` ignores ``C``. Returns ``out`` or a new tensor.

    fp32/fp64 with at least three 128-wide blocks (as :func:`_gram`): only the upper triangle of
    blocks is computed, block row by block row, and mirrored (0.76x the time of one product for
    768 x 3072 on a 2-core CPU, one thread); smaller ones: one product, its upper triangle
    mirrored. Either way exactly symmetric. bf16: one product as it comes (CPU GEMMs on strided
    bf16 panels ran 3.5x slower than one product, and a mirroring pass cost a third of the
    product), so as symmetric as the BLAS makes it: what ``torch.optim.Muon`` computes.
    """
    k = out.shape[-1]
    nb = min(8, k // _GRAM_BLOCK)
    mm = torch.addmm if out.dim() == 2 else torch.baddbmm
    if out.dtype not in (torch.float32, torch.float64):
        return mm(C, L, R, beta=beta, alpha=alpha)
    edges = [0, k] if nb < 3 else [round(i * k / nb) for i in range(nb + 1)]
    for i in range(len(edges) - 1):     # block row i of the upper triangle, mirrored below
        lo, hi = edges[i], edges[i + 1]
        panel = mm(C[..., lo:hi, lo:], L[..., lo:hi, :], R[..., :, lo:], beta=beta, alpha=alpha)
        diag = panel[..., :, :hi - lo]
        out[..., lo:hi, lo:hi] = diag.triu() + diag.triu(1).transpose(-1, -2)
        if hi < k:
            right = panel[..., :, hi - lo:]
            out[..., lo:hi, hi:] = right
            out[..., hi:, lo:hi] = right.transpose(-1, -2)
    return out

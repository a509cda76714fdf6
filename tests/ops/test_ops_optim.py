"""The optimizer ops (gradient_factor_update, kron_rotate, inverse_root, eigenbasis_power_step):
the reference and the public wrappers against formulas written out here in float64, odd shapes
and batches, the input checks, and the torch.library custom ops (opcheck, one compiled graph)."""
import pytest
import torch

from kfac_kernels import ops
from kfac_kernels.ops import reference

from helpers import cond_psd, solve_tol, sum_tol, unit_roundoff

SHAPES = [(1, 1), (7, 13), (33, 5), (3, 7, 13), (2, 1, 6), (4, 9, 9)]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def sym(*shape, dtype=torch.float64, g=None):
    a = torch.randn(*shape, dtype=torch.float64, generator=g)
    return (a + a.transpose(-1, -2)).to(dtype)


def orth(*shape, dtype=torch.float64, g=None):
    return torch.linalg.qr(torch.randn(*shape, dtype=torch.float64, generator=g)).Q.to(dtype)


def spd_root(F, p, eps):
    """(F + eps I)^(-1/p) by eigh of each matrix, one at a time."""
    out = torch.empty_like(F, dtype=torch.float64)
    for i in range(F.shape[0]):
        lam, q = torch.linalg.eigh(F[i].double())
        out[i] = q @ torch.diag((lam.clamp_min(0) + eps) ** (-1.0 / p)) @ q.T
    return out


# ----------------------------------------------------------------------------- gradient factors
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.9, 1.0])
def test_gradient_factor_update_matches_the_products(shape, dtype, beta):
    g = torch.Generator().manual_seed(1)
    G = torch.randn(shape, dtype=torch.float64, generator=g)
    m, n = shape[-2:]
    L0, R0 = sym(*shape[:-2], m, m, dtype=dtype, g=g), sym(*shape[:-2], n, n, dtype=dtype, g=g)
    L, R = L0.clone(), R0.clone()
    if beta == 0.0:
        L.fill_(float("nan"))          # beta 0 overwrites whatever the factors held
        R.fill_(float("nan"))
    out = ops.gradient_factor_update(L, R, G.to(dtype), beta=beta)
    assert out[0] is L and out[1] is R
    scale = 1.0 if beta == 1.0 else 1.0 - beta   # the documented default: sums when beta = 1
    GGt = G @ G.transpose(-1, -2)
    GtG = G.transpose(-1, -2) @ G
    wantL = scale * GGt + (beta * L0.double() if beta else 0)
    wantR = scale * GtG + (beta * R0.double() if beta else 0)
    # bound: gamma_(k+3) |G||G|^T (+ beta |L0|), G rounded to dtype first (tests/README.md)
    Ga = G.abs()
    absL = scale * Ga @ Ga.transpose(-1, -2) + (beta * L0.double().abs() if beta else 0)
    absR = scale * Ga.transpose(-1, -2) @ Ga + (beta * R0.double().abs() if beta else 0)
    assert rel(L, wantL) <= sum_tol(wantL, absL, n + 3, acc=dtype, inputs=dtype)
    assert rel(R, wantR) <= sum_tol(wantR, absR, m + 3, acc=dtype, inputs=dtype)
    assert torch.equal(L, L.transpose(-1, -2)) and torch.equal(R, R.transpose(-1, -2))


def test_gradient_factor_update_one_side_and_scale_and_strides():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3, 13, 14, generator=g, dtype=torch.float64)
    G = base.transpose(1, 2)[:, ::2, :]                       # [3, 7, 13], not contiguous
    L = torch.zeros(3, 7, 7, dtype=torch.float64)
    ops.gradient_factor_update(L, None, G, beta=0.5, scale=3.0)
    assert rel(L, 3.0 * G @ G.transpose(1, 2)) <= 1e-12
    R = torch.ones(3, 13, 13, dtype=torch.float64)
    ops.gradient_factor_update(None, R, G.float(), beta=0.25, scale=2.0)
    assert rel(R, 0.25 + 2.0 * G.transpose(1, 2) @ G) <= 1e-6     # fp32 grad, fp64 factor


@pytest.mark.parametrize("call,match", [
    (lambda G: ops.gradient_factor_update(None, None, G, beta=0.9), "needs left, right"),
    (lambda G: ops.gradient_factor_update(torch.zeros(4, 4), None, G, beta=0.9), "must be 3 x 3"),
    (lambda G: ops.gradient_factor_update(torch.zeros(3, 3), torch.zeros(5, 5, dtype=torch.float64),
                                          G, beta=0.9), "one factor dtype"),
    (lambda G: ops.gradient_factor_update(torch.zeros(3, 3), None, G, beta=1.5), r"\[0, 1\]"),
    (lambda G: ops.gradient_factor_update(torch.zeros(3, 3, dtype=torch.int64), None, G,
                                          beta=0.9), "dtype"),
    (lambda G: ops.gradient_factor_update(torch.zeros(2, 3, 3), None, G[None].expand(3, 3, 5),
                                          beta=0.9), "stack has 2 matrices"),
    (lambda G: ops.gradient_factor_update(torch.zeros(3, 3), None, G[0], beta=0.9), "dims"),
])
def test_gradient_factor_update_rejects_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(3, 5))


# ----------------------------------------------------------------------------- rotation
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kron_rotate_round_trip_and_formula(shape, dtype):
    g = torch.Generator().manual_seed(3)
    V = torch.randn(shape, dtype=torch.float64, generator=g)
    m, n = shape[-2:]
    QL, QR = orth(*shape[:-2], m, m, dtype=dtype, g=g), orth(*shape[:-2], n, n, dtype=dtype, g=g)
    U = ops.kron_rotate(V.float(), QL, QR)
    assert U.dtype == dtype and U.shape == V.shape
    want = QL.double().transpose(-1, -2) @ V.float().double() @ QR.double()
    # bound: gamma_(m+n) |QL|^T |V| |QR| (a chain of two products, tests/README.md)
    Va, La, Ra = V.float().double().abs(), QL.double().abs(), QR.double().abs()
    tol = sum_tol(want, La.transpose(-1, -2) @ Va @ Ra, m + n, acc=dtype)
    assert rel(U, want) <= tol
    back = ops.kron_rotate(U, QL, QR, back=True)
    # the way back: V's rounding to float32, both rotations' errors, and QL, QR orthogonal only
    # to their rounding (measured here, in float64)
    eye = lambda k: torch.eye(k, dtype=torch.float64)   # noqa: E731
    orth_err = sum(float((q.double().transpose(-1, -2) @ q.double() - eye(q.shape[-1])).norm(
        dim=(-2, -1)).max()) for q in (QL, QR))
    assert rel(back, V) <= unit_roundoff(torch.float32) + 2 * tol + orth_err
    # identity sides: one product each
    want = V.to(dtype).double() @ QR.double()
    tol = sum_tol(want, V.to(dtype).double().abs() @ Ra, n, acc=dtype, inputs=dtype)
    assert rel(ops.kron_rotate(V.to(dtype), None, QR), V @ QR.double()) <= tol
    want = QL.double() @ V.to(dtype).double()
    tol = sum_tol(want, La @ V.to(dtype).double().abs(), m, acc=dtype, inputs=dtype)
    assert rel(ops.kron_rotate(V.to(dtype), QL, None, back=True), QL.double() @ V) <= tol


def test_kron_rotate_rejects_bad_input():
    V = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="needs QL, QR or both"):
        ops.kron_rotate(V, None, None)
    with pytest.raises(ValueError, match="QR must be 4 x 4"):
        ops.kron_rotate(V, None, torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        ops.kron_rotate(V, torch.eye(3).expand(5, 3, 3), None)
    with pytest.raises(TypeError, match="one dtype for both"):
        ops.kron_rotate(V, torch.eye(3).expand(2, 3, 3),
                        torch.eye(4, dtype=torch.float64).expand(2, 4, 4))


# ----------------------------------------------------------------------------- inverse roots
@pytest.mark.parametrize("n,batch", [(1, 1), (7, 3), (33, 2), (5, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("root", [4, 2, 1.5])
def test_inverse_root_matches_eigh_formula(n, batch, dtype, root):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, n, max(1, n // 2), dtype=torch.float64, generator=g)   # rank-deficient
    F = (x @ x.transpose(1, 2)).to(dtype)
    eps = 1e-2
    P = ops.inverse_root(F, root, epsilon=eps)
    want = spd_root(F, root, eps)
    # first-order bounds (tests/README.md): eigh's backward error n u ||F|| moves
    # (F + eps I)^(-1/root) by (kappa / root) n u relatively, forming Q D Q^T adds n u;
    # kappa = (lam_max + eps) / eps is ~9e3 for n = 33 here (rank-deficient F), so float32
    # reaches ~1e-4 on P and ~1e-3 on the product
    kappa = cond_psd(F, eps)
    assert P.dtype == dtype and rel(P, want) <= solve_tol(n, kappa / root + 1, dtype)
    # the defining property: P^root (F + eps I) = I (product in float64): eigh's backward error
    # gives n u kappa, each of the root factors' own error another n u kappa
    Pd = P.double()
    prod = torch.linalg.matrix_power(Pd, root) if isinstance(root, int) else None
    if prod is not None:
        eye = torch.eye(n, dtype=torch.float64)
        assert rel(prod @ (F.double() + eps * eye), eye.expand(batch, n, n)) <= solve_tol(
            n, kappa, dtype, c=1 + root)


def test_inverse_root_refresh_warm_start_and_eigenvectors():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 9, 20, dtype=torch.float64, generator=g)
    F = x @ x.transpose(1, 2)
    P0, Q = ops.inverse_root(F, 4, epsilon=1e-6, return_eigenvectors=True)
    assert rel(Q.transpose(1, 2) @ Q, torch.eye(9, dtype=torch.float64).expand(3, 9, 9)) < 1e-12
    F2 = F + 1e-3 * sym(3, 9, 9, g=g)
    P = ops.inverse_root(F2, 4, epsilon=1e-6, method="refresh", prev_eigenvectors=Q)
    assert rel(P, spd_root(F2, 4, 1e-6)) <= 1e-8
    # zero epsilon on a null direction contributes 0 (no inf)
    z = torch.zeros(1, 3, 3, dtype=torch.float64)
    z[0, 0, 0] = 16.0
    P = ops.inverse_root(z, 4)
    assert torch.allclose(P, torch.diag(torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64))[None])


def test_inverse_root_rejects_bad_input():
    F = torch.eye(3).expand(2, 3, 3)
    with pytest.raises(ValueError, match="root must be a positive number"):
        ops.inverse_root(F, 0)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        ops.inverse_root(F, 4, epsilon=-1.0)
    with pytest.raises(ValueError, match="needs prev_eigenvectors"):
        ops.inverse_root(F, 4, method="refresh")
    with pytest.raises(ValueError, match="square"):
        ops.inverse_root(torch.zeros(2, 3, 4), 4)
    with pytest.raises(ValueError, match="unknown method"):
        ops.inverse_root(F, 4, method="svd")


# ----------------------------------------------------------------------------- power step
@pytest.mark.parametrize("n,batch", [(1, 2), (7, 3), (33, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_eigenbasis_power_step_is_orthonormal_and_converges(n, batch, dtype):
    g = torch.Generator().manual_seed(6)
    lam = torch.linspace(1.0, 3.0, n, dtype=torch.float64) ** 3
    V = orth(batch, n, n, g=g)
    F = (V * lam) @ V.transpose(1, 2)
    Q = orth(batch, n, n, g=g)
    Q1, d = ops.eigenbasis_power_step(F.to(dtype), Q.to(dtype))
    eye = torch.eye(n, dtype=torch.float64).expand(batch, n, n)
    assert Q1.dtype == dtype and rel(Q1.transpose(1, 2) @ Q1, eye) <= 10 * TOL[dtype]
    # d: the Rayleigh quotients of the old basis
    assert rel(d, torch.diagonal(Q.transpose(1, 2) @ F @ Q, dim1=-2, dim2=-1)) <= TOL[dtype]
    # one step: column j is the normalised component of F q_j after the earlier (larger-d) ones;
    # iterated, the basis diagonalises F (well separated eigenvalues)
    Qk = Q.to(dtype)
    for _ in range(300 if n > 1 else 1):
        Qk, _ = ops.eigenbasis_power_step(F.to(dtype), Qk)
    M = Qk.double().transpose(1, 2) @ F @ Qk.double()
    off = M - torch.diag_embed(torch.diagonal(M, dim1=-2, dim2=-1))
    assert float(off.norm() / M.norm()) <= (1e-4 if dtype == torch.float32 else 1e-8)


def test_eigenbasis_power_step_keeps_columns_and_null_space():
    """A rank-one factor: the column most aligned with it takes its direction, every other column
    stays where it was (the shift keeps the null space from QR's rounding noise), and an exact
    eigenbasis is a fixed point up to signs already chosen."""
    g = torch.Generator().manual_seed(7)
    n = 6
    Q = orth(1, n, n, g=g)
    u = Q[0, :, 2] + 0.01 * Q[0, :, 4]
    F = (u[:, None] * u[None, :])[None]
    Q1, d = ops.eigenbasis_power_step(F, Q)
    assert int(d[0].argmax()) == 2
    cos = (Q1[0].T @ Q[0]).abs()
    for j in range(n):
        if j not in (2, 4):
            assert cos[j, j] > 1 - 1e-9, (j, cos[j, j])
    assert float((Q1[0, :, 2] @ u).abs() / u.norm()) > 1 - 1e-9
    lam, E = torch.linalg.eigh(sym(2, n, n, g=g))
    F2 = (E * lam.abs().unsqueeze(-2)) @ E.transpose(1, 2)
    E1, _ = ops.eigenbasis_power_step(F2, E)
    assert torch.allclose(E1.abs(), E.abs(), atol=1e-10)


def test_eigenbasis_power_step_rejects_bad_input():
    with pytest.raises(ValueError, match="one square basis per factor"):
        ops.eigenbasis_power_step(torch.eye(3).expand(2, 3, 3), torch.eye(3))
    with pytest.raises(ValueError, match="shift must be >= 0"):
        ops.eigenbasis_power_step(torch.eye(3), torch.eye(3), shift=-1.0)


# ----------------------------------------------------------------------------- custom ops
LIB = torch.ops.kfac_kernels


def _cases():
    g = torch.Generator().manual_seed(8)
    G = torch.randn(2, 5, 7, generator=g)
    F = sym(2, 5, 5, dtype=torch.float32, g=g) + 10 * torch.eye(5)
    QL, QR = orth(2, 5, 5, dtype=torch.float32, g=g), orth(2, 7, 7, dtype=torch.float32, g=g)
    return {
        "gradient_factor_update": (torch.zeros(2, 5, 5), torch.zeros(2, 7, 7), G, 0.9, 0.1,
                                   False, "auto"),
        "kron_rotate": (G, QL, QR, True, "auto"),
        "inverse_root": (F, 4.0, 1e-3, "eigh", None, "auto"),
        "eigenbasis_power_step": (F, QL, None, "auto"),
    }


@pytest.mark.parametrize("name", ["gradient_factor_update", "kron_rotate", "inverse_root",
                                  "eigenbasis_power_step"])
def test_custom_op_schema_and_fake(name):
    torch.library.opcheck(getattr(LIB, name).default, _cases()[name],
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_optimizer_ops_compile_in_one_graph_and_match_eager():
    c = _cases()
    G, QL, QR = c["kron_rotate"][:3]
    F = c["inverse_root"][0]

    def fn(G, QL, QR, F):
        L, R = torch.zeros(2, 5, 5), torch.zeros(2, 7, 7)
        ops.gradient_factor_update(L, R, G, beta=1.0)
        U = ops.kron_rotate(G, QL, QR)
        P = ops.inverse_root(L + F, 4, epsilon=1e-3)
        Q1, d = ops.eigenbasis_power_step(F, QL)
        return L * 1, R + 0, ops.kron_rotate(U, QL, None, back=True), P, Q1, d

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(G, QL, QR, F)
    for x, w in zip(got, fn(G, QL, QR, F)):
        assert x.shape == w.shape and x.dtype == w.dtype
        assert torch.allclose(x, w, rtol=1e-5, atol=1e-6)


def test_reference_is_registered_for_every_new_op():
    from kfac_kernels.ops import _registry
    for op in ("gradient_factor_update", "kron_rotate", "inverse_root", "eigenbasis_power_step"):
        assert _registry.implementations(op)["torch"] == f"kfac_kernels.ops.reference:{op}"
        assert _registry.resolve(op, "auto", torch.device("cpu")) == "torch"
    assert "triton" in _registry.implementations("gradient_factor_update")
    assert "triton" in _registry.implementations("kron_rotate")
    assert reference.kron_rotate is not None

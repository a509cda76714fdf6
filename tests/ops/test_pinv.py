"""damping=0 is the pseudo-inverse: ``U = pinv(G) V pinv(A)`` on singular factors.

A singular factor's null eigenvalues come out of eigh as +-eps-sized noise; the preconditioning
ops count every eigenvalue (EKFAC / diagonal: every scaling) at most ``size * eps * max`` as 0,
``torch.linalg.pinv``'s default cut-off (docs/math.md, "The undamped update"), and leave a
positive damping's result exactly as it was. Checked per op and backend against
``torch.linalg.pinv`` on factors of several ranks in float32 and float64, and at the optimizer
level (public API only) on the reproduction of issue 12: a categorical GGN's G always has the
all-ones vector in its null space; a deep linear net with fewer examples than inputs also has a
singular A.
"""
import pytest
import torch
import torch.nn as nn

import kfac_kernels as kk
import kfac_kernels.ops as ops
from kfac_kernels.ops import reference
from kfac_kernels.ops.triton import probe as triton_probe

try:
    import triton  # noqa: F401
    TRITON_OK, TRITON_WHY = triton_probe()
except ImportError as exc:  # pragma: no cover - the environment has triton
    TRITON_OK, TRITON_WHY = False, f"triton is not installed ({exc})"

DTYPES = [torch.float64, torch.float32]
TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}"))
BACKENDS = ["torch", TRITON]        # the backends that implement the eigen and EKFAC ops
# Triton runs on CUDA tensors, or on CPU tensors under its interpreter (conftest.py sets it
# when there is no CUDA device)
DEVICE = {"torch": torch.device("cpu"),
          "triton": torch.device("cuda" if torch.cuda.is_available() else "cpu")}


def on(backend, *tensors):
    return [t.to(DEVICE[backend]) for t in tensors]


def tol(dtype):
    """Relative error allowed against the pinv reference: the factors' nonzero eigenvalues lie
    in [0.5, 2] (condition 4 each), so a few hundred eps covers both factors and the products."""
    return 500 * torch.finfo(dtype).eps


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def singular(n, rank, dtype, gen, batch=()):
    """A PSD [.., n, n] matrix of the given rank built in float64 (nonzero eigenvalues in
    [0.5, 2], random eigenbasis) and rounded to ``dtype``: its null eigenvalues are then
    rounding noise of either sign, as in a real factor."""
    q = torch.linalg.qr(torch.randn(*batch, n, n, dtype=torch.float64, generator=gen))[0]
    lam = torch.zeros(*batch, n, dtype=torch.float64)
    lam[..., :rank] = 0.5 + 1.5 * torch.rand(*batch, rank, dtype=torch.float64, generator=gen)
    f = (q * lam.unsqueeze(-2)) @ q.transpose(-1, -2)
    return (0.5 * (f + f.transpose(-1, -2))).to(dtype)


def pinv(f):
    return torch.linalg.pinv(f, hermitian=True)


def pinv_ref(G, V, A):
    """pinv(G) V pinv(A), the pseudo-inverses in the factors' dtype (the cut-off decision is
    torch's), the products in float64."""
    return pinv(G).double() @ V.double() @ pinv(A).double()


# (m, n, rank of G, rank of A): full, one null direction, half, rank one
RANKS = [(5, 7, 5, 7), (5, 7, 4, 7), (6, 9, 3, 4), (4, 6, 1, 1), (7, 5, 7, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,rg,ra", RANKS)
def test_eigen_is_pinv(backend, dtype, m, n, rg, ra):
    gen = torch.Generator().manual_seed(m * 100 + n * 10 + rg + ra)
    worst_noise = 0.0
    for trial in range(4):
        G, A = singular(m, rg, dtype, gen), singular(n, ra, dtype, gen)
        V = torch.randn(m, n, dtype=torch.float64, generator=gen).to(dtype)
        lamG, QG = torch.linalg.eigh(G)
        lamA, QA = torch.linalg.eigh(A)
        args = on(backend, V, QG, lamG, QA, lamA)
        U = ops.kron_precondition_eigen(*args, 0.0, backend=backend).cpu()
        assert U.dtype == dtype
        assert rel(U, pinv_ref(G, V, A)) <= tol(dtype), trial
        # the same on a batch of two, damping as a 0-d tensor and as one value per matrix
        Vb = torch.stack([args[0], 2 * args[0]])
        st = [torch.stack([t, t]) for t in args[1:]]
        for d in on(backend, torch.zeros((), dtype=dtype), torch.zeros(2, dtype=dtype)):
            Ub = ops.kron_precondition_eigen(Vb, st[0], st[1], st[2], st[3], d, backend=backend)
            assert rel(Ub[1].cpu(), 2 * pinv_ref(G, V, A)) <= tol(dtype)
        worst_noise = max(worst_noise, lamG[: m - rg].abs().max().item() if rg < m else 0.0)
    if rg < m:   # the case this guards: null eigenvalues are noise, not exact zeros
        assert worst_noise > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,rg,ra", RANKS)
def test_ekfac_is_pinv(backend, dtype, m, n, rg, ra):
    """With the K-FAC scalings lamG lamA^T, EKFAC at damping 0 is pinv(G) V pinv(A); with
    general scalings (exact zeros among them) it is the pseudo-inverse of the dense EKFAC matrix
    (QA x QG) diag(vec S) (QA x QG)^T."""
    gen = torch.Generator().manual_seed(7 + m * 100 + n * 10 + rg + ra)
    for _ in range(3):
        G, A = singular(m, rg, dtype, gen), singular(n, ra, dtype, gen)
        V = torch.randn(m, n, dtype=torch.float64, generator=gen).to(dtype)
        lamG, QG = torch.linalg.eigh(G)
        lamA, QA = torch.linalg.eigh(A)
        S = lamG.unsqueeze(-1) * lamA.unsqueeze(-2)          # signed noise products included
        U = ops.ekfac_precondition(*on(backend, V, QG, QA, S), 0.0, backend=backend).cpu()
        assert rel(U, pinv_ref(G, V, A)) <= tol(dtype)

        S = 0.5 + 1.5 * torch.rand(m, n, dtype=torch.float64, generator=gen)
        S[torch.rand(m, n, generator=gen) < 0.4] = 0.0
        S = S.to(dtype)
        S = S + (S == 0) * torch.finfo(dtype).eps * torch.randn(m, n, generator=gen).to(dtype)
        U = ops.ekfac_precondition(*on(backend, V, QG, QA, S), 0.0, backend=backend).cpu()
        K = torch.kron(QA, QG).double()                      # column-major vec: vec(QG X QA^T)
        F = K @ torch.diag(S.double().T.reshape(-1)) @ K.T
        ref = (pinv(F.to(dtype)).double() @ V.double().T.reshape(-1)).reshape(n, m).T
        assert rel(U, ref) <= tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,rg,ra", RANKS)
def test_diag_is_pinv(dtype, m, n, rg, ra):
    """A diagonal A (an embedding: unused rows are exact zeros) with a singular G: pinv(G) V
    pinv(diag a). The op has a torch implementation only."""
    gen = torch.Generator().manual_seed(11 + m * 100 + n * 10 + rg + ra)
    for _ in range(3):
        G = singular(m, rg, dtype, gen)
        a = (0.5 + 1.5 * torch.rand(n, dtype=torch.float64, generator=gen)).to(dtype)
        a[ra:] = 0.0
        V = torch.randn(m, n, dtype=torch.float64, generator=gen).to(dtype)
        lamG, QG = torch.linalg.eigh(G)
        U = ops.kron_precondition_diag(V, QG, lamG.unsqueeze(-1) * a.unsqueeze(-2), 0.0)
        assert rel(U, pinv_ref(G, V, torch.diag(a))) <= tol(dtype)


def _damped_before(V, QG, lamG, QA, lamA, damping):
    """The damped update exactly as the ops computed it before the cut-off existed."""
    Vt = QG.transpose(-1, -2) @ V @ QA
    denom = lamG.clamp_min(0).unsqueeze(-1) * lamA.clamp_min(0).unsqueeze(-2) + damping
    return QG @ (Vt / denom).masked_fill_(denom <= 0, 0.0) @ QA.transpose(-1, -2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_positive_damping_is_unchanged(dtype):
    """A positive damping cuts nothing: bit-identical to the formula, also for a matrix whose
    neighbour in the batch has damping 0 (which is cut)."""
    gen = torch.Generator().manual_seed(3)
    G, A = singular(5, 3, dtype, gen, (2,)), singular(6, 2, dtype, gen, (2,))
    lamG, QG = torch.linalg.eigh(G)
    lamA, QA = torch.linalg.eigh(A)
    lamG[:, 0] = 1e-30                               # a tiny positive eigenvalue, kept
    V = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen).to(dtype)
    for d in (1e-3, 1e-12):
        U = ops.kron_precondition_eigen(V, QG, lamG, QA, lamA, d, backend="torch")
        assert torch.equal(U, _damped_before(V, QG, lamG, QA, lamA, d))
        S = lamG.unsqueeze(-1) * lamA.unsqueeze(-2)
        assert torch.equal(reference.pinv_cut(S, d, 2), S.clamp_min(0))
    d = torch.tensor([1e-3, 0.0], dtype=dtype)
    U = ops.kron_precondition_eigen(V, QG, lamG, QA, lamA, d, backend="torch")
    assert torch.equal(U[0], _damped_before(V, QG, lamG, QA, lamA, d.reshape(2, 1, 1))[0])
    assert rel(U[1], pinv_ref(G[1], V[1], A[1])) <= tol(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cut_leaves_positively_damped_neighbours_alone(backend):
    """A batch whose damping is [1e-3, 0]: the first matrix's result is bit for bit the one it
    gets when both are damped, in the eigen and the EKFAC op of every backend."""
    gen = torch.Generator().manual_seed(5)
    G, A = singular(6, 3, torch.float32, gen, (2,)), singular(5, 2, torch.float32, gen, (2,))
    lamG, QG = torch.linalg.eigh(G)
    lamA, QA = torch.linalg.eigh(A)
    V = torch.randn(2, 6, 5, generator=gen)
    S = lamG.unsqueeze(-1) * lamA.unsqueeze(-2)
    V, QG, lamG, QA, lamA, S = on(backend, V, QG, lamG, QA, lamA, S)
    mixed, both = on(backend, torch.tensor([1e-3, 0.0]), torch.tensor([1e-3, 1e-3]))
    for fn, args in ((ops.kron_precondition_eigen, (V, QG, lamG, QA, lamA)),
                     (ops.ekfac_precondition, (V, QG, QA, S))):
        Um, Ub = fn(*args, mixed, backend=backend), fn(*args, both, backend=backend)
        assert torch.equal(Um[0], Ub[0])
        assert not torch.equal(Um[1], Ub[1])


def test_cut_is_relative_and_per_matrix():
    """The cut-off scales with each matrix's own largest value: a factor scaled by 1e-20 keeps
    all of its (scaled) eigenvalues, and a zero factor gives a zero update, not NaN."""
    lam = torch.tensor([[1e-17, 0.5, 1.0], [1e-37, 0.5e-20, 1e-20], [0.0, 0.0, 0.0]],
                       dtype=torch.float64)
    cut = reference.pinv_cut(lam, 0.0, 1)
    assert torch.equal(cut[0], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.equal(cut[1], torch.tensor([0.0, 0.5e-20, 1e-20], dtype=torch.float64))
    assert torch.equal(cut[2], torch.zeros(3, dtype=torch.float64))
    q = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    U = ops.kron_precondition_eigen(torch.ones(3, 3, 3, dtype=torch.float64), q, lam, q, lam, 0.0)
    assert torch.isfinite(U).all() and (U[2] == 0).all()


# ----------------------------------------------------------------------------- optimizer level
def _grads(model, names):
    mods = dict(model.named_modules())
    return {n: torch.cat([mods[n].weight.grad, mods[n].bias.grad.unsqueeze(1)], 1).clone()
            for n in names}


def _pinv_errors(model, x, y, dtype, **kw):
    """Per block: relative error of the preconditioned [W.grad | b.grad] against
    pinv(G) V pinv(A) from the block's own factors."""
    pre = kk.KFACPreconditioner(model, damping=0.0, curvature="ggn", likelihood="categorical",
                                factor_every=1, inverse_every=1, **kw)
    out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    pre.backward(loss, out)
    names = list(pre.blocks)
    V = _grads(model, names)
    pre.step()
    U = _grads(model, names)
    errs = {}
    for n in names:
        b = pre.blocks[n]
        assert b.A.dtype == b.G.dtype == dtype
        errs[n] = rel(U[n], pinv_ref(b.G, V[n], b.A))
    pre.close()
    return errs


@pytest.mark.parametrize("seed", range(8))
def test_issue_reproduction_linear_ggn_categorical(seed):
    """issue 12: nn.Linear(4, 3) in float64, 16 examples; was O(1) relative (up to ~1e3)."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 3).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    (err,) = _pinv_errors(model, x, y, torch.float64).values()
    assert err <= 1e-10


@pytest.mark.parametrize("mode", ["eigen", "pi"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_deep_linear_net_fewer_examples_than_inputs(mode, dtype, seed):
    """A deep linear net on 6 examples of 12 inputs: the first A has rank 6 of 13, every G the
    categorical null direction, and the deeper layers' factors are rank-deficient as well
    (errors up to 1e13 before the cut-off). Eigen damping and pi damping (which at damping 0
    passes the clamped eigenvalues with damping 0) alike."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 9), nn.Linear(9, 7), nn.Linear(7, 4)).to(dtype)
    x = torch.randn(6, 12, dtype=dtype)
    y = torch.randint(0, 4, (6,))
    errs = _pinv_errors(model, x, y, dtype, damping_mode=mode)
    assert len(errs) == 3
    bound = 1e-10 if dtype == torch.float64 else 1e-4
    assert max(errs.values()) <= bound, errs

"""Factor sides above ``max_factor_dim`` (vocabulary-sized layers): the ``large_factor`` policy.

A diagonal side keeps the diagonal of its Kronecker factor (docs/math.md, "Diagonal factor
sides"): its statistics are compared with the diagonals of the dense factors of the same run,
and its update with a float64 solve of the dense ``A ⊗ D_G + γ I`` (or ``D_A ⊗ G``, and the
pi-damped product), with a tolerance from that matrix's condition number.
"""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.factors import diag_update
from kfac_kernels.health import KFACWarning

EPS64 = torch.finfo(torch.float64).eps


class Wide(nn.Module):
    """x [N, T, 40] -> Linear(40, 8) -> tanh -> Linear(8, 8) -> tanh -> Linear(8, 30): with
    max_factor_dim=20 the first layer's A (41) and the last layer's G (30) are over the limit."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(40, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 30)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def _run(model, steps=2, seed=0, **kw):
    torch.manual_seed(seed)
    opt = kk.KFAC(model, lr=0.05, momentum=0.0, inverse_every=1, **kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(3, 5, 40, generator=g, dtype=torch.float64)
        y = torch.randint(0, 30, (3, 5), generator=g)
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, 30), y.reshape(-1))
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
    return opt


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
@pytest.mark.parametrize("curvature", ["empirical", "fisher"])
def test_diagonal_sides_are_the_diagonals_of_the_dense_factors(sharing, curvature):
    torch.manual_seed(1)
    base = Wide().double()
    kw = dict(weight_sharing=sharing, curvature=curvature, seed=3,
              likelihood=None if curvature == "empirical" else "categorical")
    # one step each from the same parameters: the same statistics
    dense = _run(copy.deepcopy(base), steps=1, **kw)
    diag = _run(copy.deepcopy(base), steps=1, max_factor_dim=20, **kw)
    bi, bo = diag.blocks["inp"], diag.blocks["out"]
    assert (bi.diag_A, bi.diag_G, bo.diag_A, bo.diag_G) == (True, False, False, True)
    assert bi.A.shape == (41,) and bo.G.shape == (30,)
    for name in ("inp", "mid", "out"):
        a, b = dense.blocks[name], diag.blocks[name]
        for w in ("A", "G"):
            fd, fg = getattr(a, w), getattr(b, w)
            assert fd.dim() == 2
            want = fd.diagonal() if b.is_diagonal(w) else fd
            # the same sums of products in another order: a few ulps of the largest entry
            torch.testing.assert_close(fg, want, rtol=0,
                                       atol=50 * EPS64 * fd.shape[0] * float(fd.abs().max()))


def test_diag_update_matches_syrk_diagonal():
    g = torch.Generator().manual_seed(0)
    for hom in (False, True):
        for lead in ((), (3,)):
            x = torch.randn(*lead, 17, 9, generator=g, dtype=torch.float64)
            xb = torch.cat([x, torch.ones(*lead, 17, 1, dtype=x.dtype)], -1) if hom else x
            full = (xb.transpose(-1, -2) @ xb).diagonal(dim1=-2, dim2=-1)
            out = torch.full((*lead, xb.shape[-1]), 7.0, dtype=torch.float64)
            diag_update(out, x, 0.25, 0.0, hom)
            torch.testing.assert_close(out, 0.25 * full, rtol=1e-14, atol=0)
            diag_update(out, x, 0.5, 2.0, hom)
            torch.testing.assert_close(out, full, rtol=1e-14, atol=0)


def _dense_solve(A, G, V, damping, mode, pi_value):
    """vec(U) = M^-1 vec(V) with M the dense (damped) Kronecker matrix, column-major vec."""
    n, m = A.shape[0], G.shape[0]
    if mode == "eigen":
        M = torch.kron(A, G) + damping * torch.eye(n * m, dtype=A.dtype)
    else:
        r = math.sqrt(damping)
        M = torch.kron(A + pi_value * r * torch.eye(n, dtype=A.dtype),
                       G + (r / pi_value) * torch.eye(m, dtype=A.dtype))
    u = torch.linalg.solve(M, V.T.reshape(-1))
    return u.reshape(n, m).T, torch.linalg.cond(M).item()


@pytest.mark.parametrize("inverse,mode", [("eigh", "eigen"), ("eigh", "pi"),
                                          ("cholesky", "pi")])
def test_diagonal_side_update_is_the_dense_float64_solve(inverse, mode):
    torch.manual_seed(2)
    damping = 1e-5     # small enough that the factors, not the damping, set the conditioning
    opt = _run(Wide().double(), max_factor_dim=20, inverse=inverse, damping_mode=mode,
               damping=damping)
    eng = opt.engine
    g = torch.Generator().manual_seed(5)
    grads = {b: torch.randn(b.shape, generator=g, dtype=torch.float64)
             for b in eng.blocks.values()}
    U_plan, dots = opt.pipeline.precondition(grads)     # the per-step plan (torch backend)
    for b, V in grads.items():
        A = torch.diag(b.A) if b.diag_A else b.A
        G = torch.diag(b.G) if b.diag_G else b.G
        p = kk.inverses.pi(b).item()
        want, cond = _dense_solve(A, G, V, damping, mode, p)
        # backward-stable eigen/Cholesky solves: relative error <= c * size * eps * cond (cond
        # of the dense damped matrix: 1e2..1e4 here)
        tol = 10 * max(V.shape) * EPS64 * cond
        err = (U_plan[b] - want).norm() / want.norm()
        assert err <= tol, (b.name, float(err), tol)
        assert abs(dots[b] - (want * V).sum()) <= tol * abs(float((want * V).sum()))
        # the kind's op path (what a compiled step or a partial group calls)
        st = {k: v.unsqueeze(0) for k, v in b.inverse.items()}
        U_op, dot_op = eng.kind.precondition([b], st, V.unsqueeze(0), damping)
        err = (U_op[0] - want).norm() / want.norm()
        assert err <= tol, (b.name, float(err), tol)


def _fallback(opt):
    return {n: r for n, _, r in opt.engine.fallback}


def test_first_order_policy_warns_and_names_the_reason():
    with pytest.warns(KFACWarning, match="max_factor_dim=20"):
        opt = kk.KFAC(Wide(), max_factor_dim=20, large_factor="first_order")
    assert set(opt.blocks) == {"mid"}
    fb = _fallback(opt)
    assert set(fb) == {"inp.weight", "inp.bias", "out.weight", "out.bias"}
    assert "A would be 41 x 41" in fb["inp.weight"] and "G would be 30 x 30" in fb["out.weight"]
    assert "large_factor='first_order'" in opt.describe()


def test_error_policy_names_the_layer_and_the_remedies():
    with pytest.raises(ValueError, match=r"module 'inp' \(Linear\).*A would be 41 x 41.*"
                                         r"large_factor='diagonal'.*skip=\['inp'\]"):
        kk.KFAC(Wide(), max_factor_dim=20, large_factor="error")
    with pytest.raises(ValueError, match="unknown large_factor 'blocks'"):
        kk.KFAC(Wide(), large_factor="blocks")
    with pytest.raises(ValueError, match="max_factor_dim must be an integer >= 1"):
        kk.KFAC(Wide(), max_factor_dim=0)


def test_default_limit_leaves_ordinary_layers_dense():
    opt = kk.KFAC(nn.Sequential(nn.Linear(4608, 16), nn.Conv2d(512, 8, 3)))
    assert not any(b.diag_A or b.diag_G for b in opt.blocks.values() if b.family != "embedding")


@pytest.mark.parametrize("case", ["embedding", "both", "conv", "ekfac"])
def test_diagonal_unavailable_falls_back_with_the_reason(case):
    kw = dict(max_factor_dim=20)
    if case == "embedding":        # A is always diagonal: a diagonal G would leave no matrix
        model, name, why = nn.Sequential(nn.Embedding(50, 30), nn.Linear(30, 4)), "0", \
            "both of its factors would be diagonal"
    elif case == "both":
        model, name, why = nn.Sequential(nn.Linear(4, 4), nn.Linear(25, 25)), "1", \
            "both of its factors would be diagonal"
    elif case == "conv":
        model, name, why = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 30, 1)), "1", \
            "a ConvBlock cannot keep that factor diagonal"
    else:
        model, name, why = Wide(), "out", "inverse='ekfac' has no diagonal factor side"
        kw["inverse"] = "ekfac"
    with pytest.warns(KFACWarning, match="large_factor='diagonal' is not available"):
        opt = kk.KFAC(model, **kw)
    assert name not in opt.blocks
    assert why in _fallback(opt)[f"{name}.weight"]


def test_describe_reports_factor_memory_from_the_shapes():
    opt = kk.KFAC(Wide().double(), max_factor_dim=20)
    text = opt.describe()
    assert "41 (diagonal)" in text and "30 (diagonal)" in text and "factor memory:" in text
    before = {n: opt.engine.factor_memory(b) for n, b in opt.blocks.items()}
    opt = _run(Wide().double(), max_factor_dim=20)
    for name, b in opt.blocks.items():
        running, decomp, estimates = opt.engine.factor_memory(b)
        assert running == b.A.nbytes + b.G.nbytes == estimates
        assert decomp == sum(v.nbytes for v in b.inverse.values())
        assert before[name] == (running, decomp, estimates)
    # a diagonal side: linear in its size
    b = opt.blocks["out"]
    assert b.G.numel() == 30 and b.inverse["lamG"].numel() == 30 and "QG" not in b.inverse


def test_checkpoint_with_other_diagonal_sides_is_refused():
    torch.manual_seed(0)
    model = Wide().double()
    opt = _run(model, max_factor_dim=20, steps=1)
    sd = opt.state_dict()
    opt.close()
    other = kk.KFAC(model, lr=0.05)
    with pytest.raises(ValueError, match="kept its factor A as its diagonal there and keeps "
                                         "it dense here.*max_factor_dim"):
        other.load_state_dict(sd)
    other.close()
    same = kk.KFAC(model, lr=0.05, max_factor_dim=20)
    same.load_state_dict(sd)
    torch.testing.assert_close(same.blocks["out"].G, opt.blocks["out"].G)


# ----------------------------------------------------------------------------- GPT-2 small shapes
VOCAB, D = 50257, 768


class _GPTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc, self.out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, 12, D // 12).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class _GPT2Small(nn.Module):
    """GPT-2 small's shapes (vocabulary 50,257, width 768, 12 heads, 4x MLP, untied head) with
    one transformer block."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(1024, D)
        self.h, self.ln_f = _GPTBlock(), nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1]).expand(idx.shape[0], -1)
        return self.head(self.ln_f(self.h(self.wte(idx) + self.wpe(pos))))


def _held_bytes(eng) -> int:
    """Bytes of every tensor the engine's curvature state holds (running factors, estimate
    buffers, decompositions and their stacks), each storage counted once."""
    seen, total = set(), 0
    tensors = []
    for b in eng.blocks.values():
        tensors += [b.A, b.G, *b.inverse.values()]
    for lay in eng.factors.arena.layouts.values():
        tensors += [lay.buffer, lay.factors]
    for g in eng.preconditioning.groups:
        tensors += list(g.stacks.values())
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def test_gpt2_small_shapes_step_within_the_factor_memory_bound():
    torch.manual_seed(0)
    model = _GPT2Small()
    # cholesky keeps the first inverse update short on a CPU (eigh of the 3073-wide A takes
    # tens of seconds); the head's dense A is still eigendecomposed (its G is diagonal)
    opt = kk.KFAC(model, lr=1e-3, inverse="cholesky", kl_clip=1e-3)
    head, wte = opt.blocks["head"], opt.blocks["wte"]
    assert head.diag_G and not head.diag_A and wte.diag_A and not wte.diag_G
    assert not any(b.diag_G or (b.diag_A and b.family != "embedding")
                   for n, b in opt.blocks.items() if n != "head")
    # the bound, from the shapes alone: a dense side n holds its running factor, a factor
    # step's estimate and its decomposition (n x n, plus n eigenvalues under eigh); a diagonal
    # side three n-vectors; each arena region pads to a 256-entry row
    bound = 0
    for b in opt.blocks.values():
        for w in ("A", "G"):
            n, k = b.factor_dim(w), b.num_stack
            bound += 4 * (3 * n if b.is_diagonal(w) else k * (3 * n * n + n)) + 4 * 2 * 256
    assert bound < 400e6                       # the dense head's G alone: 4 * 50257^2 = 10.1 GB
    assert 4 * VOCAB ** 2 > 25 * bound
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(2):
        idx = torch.randint(0, VOCAB, (2, 8), generator=g)
        y = torch.randint(0, VOCAB, (2, 8), generator=g)
        out = model(idx)
        loss = F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
        losses.append(loss.item())
        held = _held_bytes(opt.engine)
        assert 0 < held <= bound, (held, bound)
    assert all(math.isfinite(v) for v in losses)
    assert head.G.shape == (VOCAB,) and set(head.inverse) == {"QA", "lamA", "lamG"}
    # describe() states the same accounting
    text = opt.describe()
    assert "50257 (diagonal)" in text and "factor memory:" in text
    assert sum(sum(opt.engine.factor_memory(b)) for b in opt.blocks.values()) <= bound

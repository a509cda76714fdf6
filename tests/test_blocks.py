"""Blocks beyond plain Linear/Conv2d against per-example brute force in float64 (<= 1e-10):
Conv1d/Conv3d, grouped and depthwise convolutions, embeddings (diagonal A, padding), Linear
layers over sequences (attention projections), modules called several times per forward pass
(recurrent cells unrolled in time, a shared encoder: tied-weight K-FAC), normalisation layers
(exact per-channel block), and EKFAC's scalings for each of them."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.curvature import per_example_loss
from helpers import brute_block, brute_norm, rel_err, sampled_targets

TOL = 1e-10
D = torch.float64
C = 3  # classes


# ---------------------------------------------------------------------------- models
class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1, padding_mode="circular")
        self.c2 = nn.Conv1d(4, 4, 2, groups=2, dilation=2)                   # grouped
        self.c3 = nn.Conv1d(4, 4, 3, groups=4, padding="same", bias=False)    # depthwise
        self.fc = nn.Linear(4, C)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.fc(torch.tanh(self.c3(h)).mean(-1))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(2, 3, (2, 1, 2), stride=(1, 2, 1), padding=(1, 0, 1))
        self.fc = nn.Linear(3, C)

    def forward(self, x):
        return self.fc(torch.tanh(self.c1(x)).mean((2, 3, 4)))


class GroupedConv2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 3, groups=2, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(6, 6, 2, groups=6)                                # depthwise
        self.fc = nn.Linear(6, C)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).mean((2, 3)))


class EmbedNet(nn.Module):
    def __init__(self, padding_idx=0):
        super().__init__()
        self.tok = nn.Embedding(7, 3, padding_idx=padding_idx)
        self.cls = nn.Embedding(5, 3)                                        # one token each
        self.fc = nn.Linear(3, C)

    def forward(self, t):
        h = torch.tanh(self.tok(t[:, 1:])).mean(1) + self.cls(t[:, 0] % 5)
        return self.fc(torch.tanh(h))


class TinyAttention(nn.Module):
    """One causal self-attention layer with Linear q/k/v/o projections and a per-position head."""

    def __init__(self, d=4):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, C)

    def forward(self, x):                                                    # [N, T, d]
        T = x.shape[1]
        att = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(x.shape[-1])
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        h = x + self.o(att.softmax(-1) @ self.v(x))
        return self.head(torch.tanh(h))                                      # [N, T, C]


class RecurrentNet(nn.Module):
    """A GRU unrolled over time from kfac_kernels.nn: 'ih' sees all T positions in one call,
    'hh' is called T times (tied weights)."""

    def __init__(self):
        super().__init__()
        self.rnn = kk.nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        out, h = self.rnn(x)
        return self.head(h[-1])


class LSTMCellNet(nn.Module):
    """An LSTMCell called step by step in a Python loop (both of its Linears called T times)."""

    def __init__(self):
        super().__init__()
        self.cell = kk.nn.LSTMCell(3, 4)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0])


class SharedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 4)
        self.head = nn.Linear(8, C)

    def forward(self, x):
        return self.head(torch.tanh(torch.cat([self.enc(x[:, :3]), self.enc(x[:, 3:])], 1)))


MODELS = {
    "conv1d": (Conv1dNet, lambda g, n: torch.randn(n, 2, 9, generator=g, dtype=D)),
    "conv3d": (Conv3dNet, lambda g, n: torch.randn(n, 2, 3, 4, 3, generator=g, dtype=D)),
    "grouped2d": (GroupedConv2dNet, lambda g, n: torch.randn(n, 4, 5, 5, generator=g, dtype=D)),
    "embedding": (EmbedNet, lambda g, n: torch.randint(0, 7, (n, 6), generator=g)),
    "attention": (TinyAttention, lambda g, n: torch.randn(n, 3, 4, generator=g, dtype=D)),
    "gru": (RecurrentNet, lambda g, n: torch.randn(n, 3, 3, generator=g, dtype=D)),
    "lstmcell": (LSTMCellNet, lambda g, n: torch.randn(n, 3, 3, generator=g, dtype=D)),
    "shared": (SharedEncoder, lambda g, n: torch.randn(n, 6, generator=g, dtype=D)),
}
BLOCK_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def make(kind, n=4, seed=0):
    cls, data = MODELS[kind]
    torch.manual_seed(seed)
    model = cls().double()
    g = torch.Generator().manual_seed(seed + 1)
    x = data(g, n)
    if kind == "embedding":
        x[0, 1:4] = 0                                                        # padding positions
    out_shape = model(x).shape
    y = torch.randint(0, C, out_shape[:-1], generator=g)
    return model, x, y


def run_one_step(model, x, y, curvature, ws, inverse="eigh", mc=2):
    opt = kk.KFAC(model, lr=0.0, momentum=0.0, curvature=curvature, likelihood="categorical",
                  mc_samples=mc, weight_sharing=ws, seed=7, inverse=inverse)
    out = model(x)
    targets = sampled_targets("categorical", out, mc, 7) if curvature == "fisher" else None
    opt.zero_grad()
    opt.backward(per_example_loss("categorical", out, y).mean(), out)
    opt.step()
    return opt, targets


def err(a, b):
    """Relative error, with an absolute floor for factors that vanish identically (under
    "reduce" the key projection of attention has G = 0: softmax ignores a common shift of all
    keys, so sum_t dl/dk_t = 0; both sides are then rounding noise ~1e-35)."""
    return float((a - b).norm() / max(float(b.norm()), 1e-20))


def check_block(block, ref, inverse, n_ex):
    A, G, Dm = ref
    if block.diag_A:
        dense = A[0]
        if block.weight_sharing == "expand":      # one-hot inputs: the exact A is diagonal
            assert torch.equal(dense, torch.diag(dense.diagonal()))
        assert err(block.A, dense.diagonal()) <= TOL
    elif block.stacked:
        assert err(block.A, torch.stack(A)) <= TOL
    else:
        assert err(block.A, A[0]) <= TOL
    Gb = block.G if block.stacked else block.G.unsqueeze(0)
    assert err(Gb, torch.stack(G)) <= TOL
    if inverse == "ekfac":
        S = block.inverse["S"] if block.stacked else block.inverse["S"].unsqueeze(0)
        QG = block.inverse["QG"] if block.stacked else block.inverse["QG"].unsqueeze(0)
        for j in range(len(Dm)):
            P = QG[j].T @ Dm[j]
            if not block.diag_A:
                QA = block.inverse["QA"] if block.stacked else block.inverse["QA"].unsqueeze(0)
                P = P @ QA[j]
            S_ref = (P ** 2).sum(0) / n_ex
            assert err(S[j], S_ref) <= TOL, (block.name, j)


@pytest.mark.parametrize("curvature", ["empirical", "fisher", "ggn"])
@pytest.mark.parametrize("ws", ["expand", "reduce"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_block_factors_and_ekfac_scalings_match_brute_force(kind, ws, curvature):
    """A, G of every block (and, with inverse="ekfac", the scalings S = (1/N) sum_n
    (QG^T D_n QA)^2 over the metric's per-example gradients D_n) equal per-example brute force."""
    model, x, y = make(kind)
    inverse = "ekfac" if curvature != "fisher" else "eigh"
    opt, targets = run_one_step(model, x, y, curvature, ws, inverse)
    expected = {n for n, m in model.named_modules() if isinstance(m, BLOCK_TYPES)}
    assert set(opt.blocks) == expected
    for name, block in opt.blocks.items():
        ref = brute_block(model, name, x, y, curvature, "categorical", ws, targets)
        assert block.A.dtype == D
        check_block(block, ref, inverse, x.shape[0])


def test_blocks_are_of_the_expected_kind():
    model, x, y = make("conv1d")
    opt = kk.KFAC(model)
    assert type(opt.blocks["c1"]).__name__ == "ConvBlock"
    assert type(opt.blocks["c2"]).__name__ == "GroupedConvBlock"
    assert opt.blocks["c2"].shape == (2, 2, 2 * 2 + 1)
    assert opt.blocks["c3"].shape == (4, 1, 3)                # depthwise: 4 blocks of 1 x 3
    model, x, y = make("embedding")
    opt = kk.KFAC(model, lr=0.0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.blocks["tok"].A.shape == (7,) and opt.blocks["tok"].G.shape == (3, 3)


# ---------------------------------------------------------------------------- normalisation
class NormNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.c = nn.Conv2d(2, 4, 2)
        self.norm = {"layernorm": lambda: nn.LayerNorm(4), "layernorm_nobias":
                     lambda: nn.LayerNorm(4, bias=False), "rmsnorm": lambda: nn.RMSNorm(4),
                     "groupnorm": lambda: nn.GroupNorm(2, 4), "batchnorm": lambda: nn.BatchNorm2d(4),
                     "instancenorm": lambda: nn.InstanceNorm2d(4, affine=True),
                     "layernorm2d": lambda: nn.LayerNorm([3, 3])}[kind]()
        self.fc = nn.Linear(4, C)

    def forward(self, x):
        h = self.c(x)                                                # [N, 4, 3, 3]
        if self.kind in ("layernorm", "layernorm_nobias", "rmsnorm"):
            h = self.norm(h.movedim(1, -1)).movedim(-1, 1)
        else:
            h = self.norm(h)
        return self.fc(torch.tanh(h).mean((2, 3)))


NORMS = ["layernorm", "layernorm_nobias", "rmsnorm", "groupnorm", "batchnorm", "instancenorm",
         "layernorm2d"]


@pytest.mark.parametrize("curvature", ["empirical", "fisher", "ggn"])
@pytest.mark.parametrize("kind", NORMS)
def test_norm_block_is_the_exact_per_channel_curvature(kind, curvature):
    torch.manual_seed(0)
    model = NormNet(kind).double()
    with torch.no_grad():                        # non-trivial affine parameters and statistics
        for p in model.norm.parameters():
            p.uniform_(0.5, 1.5)
    if kind == "batchnorm":
        model.train()
        for _ in range(2):
            model(torch.randn(8, 2, 4, 4, dtype=D))
        model.eval()                             # running statistics: examples independent
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 4, 4, generator=g, dtype=D)
    y = torch.randint(0, C, (4,), generator=g)
    opt, targets = run_one_step(model, x, y, curvature, "expand", inverse="ekfac")
    block = opt.blocks["norm"]
    assert type(block).__name__ == "NormBlock"
    ref = brute_norm(model, "norm", x, y, curvature, "categorical", targets)
    assert rel_err(block.G, ref) <= TOL
    assert torch.equal(block.A, torch.ones_like(block.A))
    # EKFAC on an exact block: S is the diagonal of F in its own eigenbasis, F's eigenvalues
    lam = torch.linalg.eigvalsh(ref)
    assert rel_err(block.inverse["S"].squeeze(-1), lam) <= 1e-9


def test_batchnorm_in_training_mode_uses_the_batch_statistics():
    """In training mode examples interact through the batch statistics; the block uses the xhat
    of the forward pass (read here off the layer's own output) and the captured g."""
    torch.manual_seed(0)
    model = NormNet("batchnorm").double()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(6, 2, 4, 4, dtype=D)
    y = torch.randint(0, C, (6,))
    opt = kk.KFAC(model, lr=0.0, momentum=0.0)
    seen = {}
    h = model.norm.register_forward_hook(lambda m, a, o: seen.update(o=o) or o.retain_grad())
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    h.remove()
    opt.step()
    o, w, b = seen["o"], model.norm.weight.detach(), model.norm.bias.detach()
    xhat = (o.detach() - b[:, None, None]) / w[:, None, None]
    g = o.grad.detach() * x.shape[0]                         # per-example loss gradients
    u = torch.stack([(g * xhat).sum((2, 3)), g.sum((2, 3))], -1)            # [N, C, 2]
    ref = (u.unsqueeze(-1) * u.unsqueeze(-2)).mean(0)
    assert rel_err(opt.blocks["norm"].G, ref) <= 1e-10


# ---------------------------------------------------------------------------- EKFAC
@pytest.mark.parametrize("curvature", ["ggn", "empirical"])
def test_ekfac_scalings_are_the_exact_diagonal_in_the_kronecker_eigenbasis(curvature):
    """Single Linear layer: S equals diag((QA ⊗ QG)^T F (QA ⊗ QG)) for the exact metric F
    (dense GGN from Jacobians, or the empirical Fisher from per-example gradients)."""
    torch.manual_seed(0)
    N, k, m = 9, 4, 3
    lin = nn.Linear(k, m).double()
    x = torch.randn(N, k, dtype=D)
    y = torch.randint(0, m, (N,))
    opt = kk.KFAC(lin, lr=0.0, momentum=0.0, inverse="ekfac", curvature=curvature,
                  likelihood="categorical")
    out = lin(x)
    opt.zero_grad()
    opt.backward(F.cross_entropy(out, y), out)
    opt.step()
    X = torch.cat([x, torch.ones(N, 1, dtype=D)], 1)
    wbar = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
    Fd = 0.0
    for n in range(N):
        J = torch.autograd.functional.jacobian(lambda w: X[n] @ w.T, wbar)       # [m, m, k+1]
        Jv = J.permute(0, 2, 1).reshape(m, -1)                                   # column-major vec
        p = torch.softmax(out.detach()[n], 0)
        if curvature == "ggn":
            Fd = Fd + Jv.T @ (torch.diag(p) - torch.outer(p, p)) @ Jv
        else:
            r = p - F.one_hot(y[n], m).to(D)
            Fd = Fd + torch.outer(Jv.T @ r, Jv.T @ r)
    Fd = Fd / N
    b = opt.blocks[""]
    Q = torch.kron(b.inverse["QA"], b.inverse["QG"])
    diag = (Q.T @ Fd @ Q).diagonal().reshape(k + 1, m).T                          # [m, k+1]
    assert rel_err(b.inverse["S"], diag) <= 1e-12
    assert not torch.allclose(b.inverse["S"], torch.outer(b.inverse["lamG"], b.inverse["lamA"]))


def test_ekfac_running_average_and_restart_on_a_new_eigenbasis():
    """Between eigenbasis updates S is a running average (first-estimate rule) of estimates in
    the current basis; a new eigenbasis restarts S from that step's estimate in the new basis."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    decay = 0.8
    opt = kk.KFAC(model, lr=0.05, momentum=0.0, inverse="ekfac", inverse_every=3,
                  ema_decay=decay)
    g = torch.Generator().manual_seed(2)
    S_ref, count = None, 0
    for step in range(7):
        x = torch.randn(16, 4, generator=g, dtype=D)
        y = torch.randint(0, 3, (16,), generator=g)
        new_basis = step % 3 == 0
        if not new_basis:
            b = opt.blocks["2"]
            QG, QA = b.inverse["QG"].clone(), b.inverse["QA"].clone()
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        # the per-example gradients of layer "2", taken before step() changes anything
        h = torch.tanh(model[0](x)).detach()
        gout = (torch.softmax(out.detach(), 1) - F.one_hot(y, 3).to(D))
        opt.step()
        b = opt.blocks["2"]
        if new_basis:
            QG, QA = b.inverse["QG"], b.inverse["QA"]
        hb = torch.cat([h, torch.ones(16, 1, dtype=D)], 1)
        S_hat = ((gout @ QG) ** 2).T @ ((hb @ QA) ** 2) / 16
        if new_basis:
            S_ref, count = S_hat, 1
        else:
            count += 1
            rho = min(1 - 1 / count, decay)
            S_ref = rho * S_ref + (1 - rho) * S_hat
        assert rel_err(b.inverse["S"], S_ref) <= 1e-12, step


def test_ekfac_update_is_the_corrected_eigenbasis_solve():
    torch.manual_seed(0)
    model = TinyAttention().double()
    x = torch.randn(5, 3, 4, dtype=D)
    y = torch.randint(0, C, (5, 3))
    pre = kk.KFACPreconditioner(model, damping=1e-2, inverse="ekfac")
    out = model(x)
    model.zero_grad()
    F.cross_entropy(out.reshape(-1, C), y.reshape(-1)).backward()
    grads = {n: (m.weight.grad.clone(), m.bias.grad.clone()) for n, m in model.named_children()}
    pre.step()
    for name, b in pre.blocks.items():
        V = torch.cat([grads[name][0], grads[name][1][:, None]], 1)
        QG, QA, S = b.inverse["QG"], b.inverse["QA"], b.inverse["S"]
        U = QG @ ((QG.T @ V @ QA) / (S + 1e-2)) @ QA.T
        got = torch.cat([b.module.weight.grad, b.module.bias.grad[:, None]], 1)
        assert rel_err(got, U) <= 1e-12


# ---------------------------------------------------------------------------- embeddings
def test_embedding_preconditioning_padding_row_and_diagonal_solve():
    """U = G^-1 V A^-1 with A diagonal (damping 0 on the seen rows), and the padding row never
    moves, even with weight decay and momentum."""
    torch.manual_seed(0)
    model = EmbedNet().double()
    x = torch.randint(0, 7, (6, 6), generator=torch.Generator().manual_seed(3))
    x[:, 2] = 0
    y = torch.randint(0, C, (6,))
    pre = kk.KFACPreconditioner(model, damping=1e-3)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    V = model.tok.weight.grad.T.clone()
    pre.step()
    b = pre.blocks["tok"]
    a = b.A.clamp_min(0)
    lam, Q = torch.linalg.eigh(b.G)
    ref = Q @ ((Q.T @ V) / (lam.clamp_min(0)[:, None] * a[None, :] + 1e-3))
    ref[:, 0] = 0
    assert rel_err(model.tok.weight.grad.T, ref) <= 1e-12
    assert float(b.A[0]) == 0.0
    pad_row = model.tok.weight.detach()[0].clone()
    opt = kk.KFAC(model, lr=0.1, momentum=0.9, weight_decay=0.1, damping=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.equal(model.tok.weight.detach()[0], pad_row)
    assert not torch.equal(model.tok.weight.detach()[1], pad_row)


@pytest.mark.parametrize("inverse", ["eigh", "cholesky", "ekfac"])
def test_every_inverse_mode_trains_a_model_with_every_block_family(inverse):
    torch.manual_seed(0)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.ln = nn.LayerNorm(6)
            self.c1 = nn.Conv1d(6, 8, 3, padding=1)
            self.bn = nn.BatchNorm1d(8)
            self.dw = nn.Conv1d(8, 8, 3, groups=8, padding=1)
            self.gru = kk.nn.GRU(8, 8, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, t):
            h = self.ln(self.emb(t)).transpose(1, 2)
            h = torch.tanh(self.dw(torch.tanh(self.bn(self.c1(h)))))
            return self.fc(self.gru(h.transpose(1, 2))[1][-1])

    model = Mixed()
    opt = kk.KFAC(model, lr=0.1, momentum=0.5, inverse=inverse, damping=1e-2, inverse_every=3,
                  curvature="fisher", likelihood="categorical", seed=0, kl_clip=1e-2)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 11, (64, 7), generator=g)
    y = (t[:, 0] % 3)                                    # learnable: the first token decides
    losses = []
    for _ in range(25):
        out = model(t)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
        losses.append(float(loss.detach()))
    assert "fallback parameters: none" in opt.describe()
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("inverse", ["ekfac", "cholesky"])
def test_resume_is_bit_identical_with_every_block_family(inverse):
    """Stacked factors, a vector A, exact norm blocks and EKFAC's running S (with its count)
    survive state_dict() / load_state_dict() exactly."""
    import io

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 6, padding_idx=0)
            self.ln = nn.LayerNorm(6)
            self.dw = nn.Conv1d(6, 6, 3, groups=3, padding=1)
            self.cell = kk.nn.GRUCell(6, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, t):
            h = torch.tanh(self.dw(self.ln(self.emb(t)).transpose(1, 2))).transpose(1, 2)
            s = None
            for i in range(h.shape[1]):
                s = self.cell(h[:, i], s)
            return self.head(s)

    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, damping=1e-2, curvature="fisher",
              likelihood="categorical", inverse=inverse, inverse_every=3, seed=5, ema_decay=0.9)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 9, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g))
               for _ in range(8)]

    def steps(model, opt, bs):
        for t, y in bs:
            out = model(t)
            opt.zero_grad()
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()

    torch.manual_seed(0)
    full = Net()
    opt_full = kk.KFAC(full, **kw)
    steps(full, opt_full, batches)
    torch.manual_seed(0)
    part = Net()
    opt_part = kk.KFAC(part, **kw)
    steps(part, opt_part, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt_part.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    torch.manual_seed(1)
    resumed = Net()
    resumed.load_state_dict(ckpt["model"])
    opt_res = kk.KFAC(resumed, **kw)
    opt_res.load_state_dict(ckpt["opt"])
    steps(resumed, opt_res, batches[4:])
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for name, b in opt_full.blocks.items():
        r = opt_res.blocks[name]
        assert torch.equal(b.A, r.A) and torch.equal(b.G, r.G)
        for k, v in b.inverse.items():
            assert torch.equal(v, r.inverse[k]), (name, k)


def test_family_names_the_layer_kind_is_its_old_name():
    """``Block.family`` is the layer family ("kind" means the inverse kind); ``Block.kind``
    stays as a read-only alias, and the state_dict entry keeps the key "kind" for it so that
    saved state_dicts load (tests/test_block_state.py loads one saved before the rename)."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Conv2d(4, 3, 3), nn.Flatten(),
                        nn.Linear(27, 10), nn.LayerNorm(10), nn.Linear(10, 5))
    opt = kk.KFAC(net, lr=0.1, inverse_every=1)
    want = ["conv-grouped", "conv", "linear", "norm", "linear"]
    assert [b.family for b in opt.blocks.values()] == want
    assert [b.kind for b in opt.blocks.values()] == want
    with pytest.raises(AttributeError):
        next(iter(opt.blocks.values())).kind = "linear"
    x = torch.randn(4, 2, 7, 7)
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()
    entries = opt.state_dict()["kfac"]["blocks"]
    assert [entries[n]["kind"] for n in opt.blocks] == want
    opt.close()

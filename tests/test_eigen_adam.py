"""inverse="eigen_adam" against a float64 transcription of its update (kfac_kernels/inverses/
eigen_adam.py):

    R = QG^T V QA,  M2 <- beta M2 + (1 - beta) R^2,  U = QG [R / (sqrt(M2 / (1 - beta^t)) + eps)] QA^T

with the bases the engine holds at each step (refreshed every ``inverse_every`` steps while M2 is
kept), on a model with plain, stacked (LayerNorm) and diagonal-A (Embedding) blocks.

With ``rotated_momentum = beta1`` the engine keeps the first moment in the rotated coordinates and
turns it into each new basis; the transcription keeps it in the parameters' coordinates instead
(E1 <- beta1 E1 + (1 - beta1) V, rotated each step: N = QG^T E1 QA / (1 - beta1^t) / ...), which
is the same matrix because the bases are orthogonal: a second, independent formulation."""
import pytest
import torch
import torch.nn as nn

import kfac_kernels as kk


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 5)
        self.fc1 = nn.Linear(5, 7)
        self.ln = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, idx):
        return self.fc2(torch.tanh(self.ln(self.fc1(self.emb(idx)))))


def _run(steps, inverse_every, beta, eps, lr, beta1=0.0):
    torch.manual_seed(0)
    model = Net().double()
    opt = kk.KFAC(model, lr=lr, momentum=0.0, damping=eps, ema_decay=beta,
                  inverse="eigen_adam", inverse_every=inverse_every, rotated_momentum=beta1)
    gen = torch.Generator().manual_seed(1)
    M2, E1 = {}, {}
    for t in range(1, steps + 1):
        idx = torch.randint(0, 6, (11,), generator=gen)
        y = torch.randn(11, 3, generator=gen, dtype=torch.float64)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = model(idx)
        loss = ((out - y) ** 2).sum(-1).mean()
        opt.zero_grad()
        opt.backward(loss, out)
        V = {name: b.grad_matrix().clone() for name, b in opt.blocks.items()}
        opt.step()
        for name, b in opt.blocks.items():
            QG = b.inverse["QG"]
            QA = b.inverse.get("QA")
            R = QG.transpose(-1, -2) @ V[name]
            if QA is not None:
                R = R @ QA
            M2[name] = beta * M2.get(name, torch.zeros_like(R)) + (1 - beta) * R ** 2
            N = R
            if beta1:
                E1[name] = beta1 * E1.get(name, torch.zeros_like(V[name])) + (1 - beta1) * V[name]
                N = QG.transpose(-1, -2) @ E1[name]
                if QA is not None:
                    N = N @ QA
                N = N / (1 - beta1 ** t)
            N = N / ((M2[name] / (1 - beta ** t)).sqrt() + eps)
            U = QG @ N
            if QA is not None:
                U = U @ QA.transpose(-1, -2)
            # the block's own layout of (weight, bias) <- U, then W_new = W_old - lr U
            for p, u in zip(b.params, b.split(U)):
                pname = next(n for n, q in model.named_parameters() if q is p)
                torch.testing.assert_close(p.detach(), before[pname] - lr * u, rtol=1e-10,
                                           atol=1e-12, msg=f"step {t}, {pname}")
            # null-space coordinates hold squared rounding noise: an absolute floor at the scale
            torch.testing.assert_close(b.inverse["M2"], M2[name], rtol=1e-10,
                                       atol=1e-12 * float(M2[name].max()))
            assert float(b.inverse["t"].reshape(-1)[0]) == t
    return opt, model


@pytest.mark.parametrize("beta1", [0.0, 0.8])
@pytest.mark.parametrize("inverse_every", [1, 2, 50])
def test_update_matches_float64_transcription(inverse_every, beta1):
    # eps = 1e-3: the map R -> R / (|R| + eps) amplifies a rounding error of R (about 1e-16 |V|,
    # coordinates in the factors' null space are pure rounding) by up to 1/eps; with 1e-3 that
    # stays near 1e-13, far below the 1e-12 tolerance, while a wrong formula errs by O(lr)
    opt, _ = _run(steps=5, inverse_every=inverse_every, beta=0.9, eps=1e-3, lr=0.05, beta1=beta1)
    assert all(("M1" in b.inverse) == bool(beta1) for b in opt.blocks.values())


def test_first_step_is_sign_like():
    """At t=1 the bias-corrected second moment is R^2: each rotated coordinate moves by
    lr * R / (|R| + eps), i.e. about lr in magnitude (Adam's first step)."""
    torch.manual_seed(0)
    model = Net().double()
    opt = kk.KFAC(model, lr=1.0, momentum=0.0, damping=0.0, inverse="eigen_adam")
    idx = torch.randint(0, 6, (9,))
    out = model(idx)
    loss = out.square().sum(-1).mean()
    opt.backward(loss, out)
    V = {n: b.grad_matrix().clone() for n, b in opt.blocks.items()}
    W0 = {n: b.param_matrix().clone() for n, b in opt.blocks.items()}
    opt.step()
    for n, b in opt.blocks.items():
        QG, QA = b.inverse["QG"], b.inverse.get("QA")
        rot = lambda X: (QG.transpose(-1, -2) @ X) @ QA if QA is not None else \
            QG.transpose(-1, -2) @ X
        step = rot(W0[n] - b.param_matrix())        # = R / |R| where R != 0
        R = rot(V[n])
        nz = R.abs() > 1e-12
        torch.testing.assert_close(step[nz], torch.sign(R[nz]), rtol=1e-9, atol=1e-9)


def test_state_dict_round_trip_keeps_second_moment():
    opt, model = _run(steps=3, inverse_every=2, beta=0.9, eps=1e-3, lr=0.05)
    sd = opt.state_dict()
    model2 = Net().double()
    model2.load_state_dict(model.state_dict())
    opt2 = kk.KFAC(model2, lr=0.05, momentum=0.0, damping=1e-3, ema_decay=0.9,
                   inverse="eigen_adam", inverse_every=2)
    opt2.load_state_dict(sd)
    for n, b in opt.blocks.items():
        torch.testing.assert_close(opt2.blocks[n].inverse["M2"], b.inverse["M2"])
        torch.testing.assert_close(opt2.blocks[n].inverse["t"], b.inverse["t"])


def test_refuses_pi_damping_and_adaptive_options():
    model = Net()
    with pytest.raises(ValueError, match="epsilon"):
        kk.KFAC(model, inverse="eigen_adam", damping_mode="pi")
    with pytest.raises(ValueError, match="adaptive_lr"):
        kk.KFAC(model, inverse="eigen_adam", adaptive_lr=True)


def test_state_dict_round_trip_keeps_first_moment():
    opt, model = _run(steps=3, inverse_every=2, beta=0.9, eps=1e-3, lr=0.05, beta1=0.8)
    sd = opt.state_dict()
    model2 = Net().double()
    model2.load_state_dict(model.state_dict())
    opt2 = kk.KFAC(model2, lr=0.05, momentum=0.0, damping=1e-3, ema_decay=0.9,
                   inverse="eigen_adam", inverse_every=2, rotated_momentum=0.8)
    opt2.load_state_dict(sd)
    for n, b in opt.blocks.items():
        torch.testing.assert_close(opt2.blocks[n].inverse["M1"], b.inverse["M1"])


def test_checkpoint_without_first_moment_resumes():
    """A state_dict saved with rotated_momentum=0 loads into an optimiser with it: the first
    moment starts (at zero) at the next basis refresh, and the steps before it are finite."""
    opt, model = _run(steps=3, inverse_every=2, beta=0.9, eps=1e-3, lr=0.05)
    sd = opt.state_dict()
    opt.close()
    opt2 = kk.KFAC(model, lr=0.05, momentum=0.0, damping=1e-3, ema_decay=0.9,
                   inverse="eigen_adam", inverse_every=2, rotated_momentum=0.8)
    opt2.load_state_dict(sd)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        out = model(torch.randint(0, 6, (11,), generator=gen))
        opt2.zero_grad()
        opt2.backward(out.square().sum(-1).mean(), out)
        opt2.step()
    assert all("M1" in b.inverse for b in opt2.blocks.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_rotated_momentum_needs_eigen_adam():
    with pytest.raises(ValueError, match="rotated_momentum"):
        kk.KFAC(Net(), inverse="eigh", rotated_momentum=0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        kk.KFAC(Net(), inverse="eigen_adam", rotated_momentum=1.0)

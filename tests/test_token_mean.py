"""loss_reduction="token_mean": a loss averaged over examples and positions (Hugging Face's
``outputs.loss``, the LM examples) has the metric of the per-example convention divided by the
positions T, so its K-FAC update equals the per-example one with the damping scaled by T."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
import kfac_kernels.capture as capture_mod
from kfac_kernels.curvature import positions

N, T, V, D = 24, 5, 7, 6


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.fc = nn.Linear(D, D)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)

    def forward(self, tok):
        return self.head(self.ln(torch.tanh(self.fc(self.emb(tok)))))


def _det_vectors(likelihood, out, mc_samples, gen):
    o = out.detach()
    return [torch.tanh(o * (s + 1)) for s in range(mc_samples)]


def _run(curvature, reduction, damping, inverse, steps=3):
    torch.manual_seed(0)
    model = TinyLM().double()
    kw = dict(likelihood="categorical") if curvature != "empirical" else {}
    opt = kk.KFAC(model, lr=0.1, momentum=0.5, damping=damping, curvature=curvature,
                  inverse=inverse, inverse_every=2, loss_reduction=reduction, seed=1, **kw)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        tok = torch.randint(0, V, (N, T), generator=g)
        y = torch.randint(0, V, (N, T), generator=g)
        out = model(tok)
        ce = F.cross_entropy(out.reshape(-1, V), y.reshape(-1), reduction="sum")
        loss = ce / N if reduction == "mean" else ce / (N * T)
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
    return model, opt


@pytest.mark.parametrize("inverse", ["eigh", "cholesky", "ekfac"])
@pytest.mark.parametrize("curvature", ["empirical", "ggn", "fisher"])
def test_token_mean_update_equals_the_per_example_one(curvature, inverse, monkeypatch):
    monkeypatch.setattr(capture_mod, "sample_vectors", _det_vectors)
    gamma = 1e-3
    m1, o1 = _run(curvature, "mean", gamma * T, inverse)
    m2, o2 = _run(curvature, "token_mean", gamma, inverse)
    for n, b in o1.blocks.items():     # the metric is the per-example one divided by T
        assert torch.allclose(o2.blocks[n].G * T, b.G, rtol=1e-10, atol=0), n
        assert torch.allclose(o2.blocks[n].A, b.A, rtol=1e-10, atol=0), n
    err = max(float((p.detach() - q.detach()).norm() / q.norm()) for p, q in zip(m2.parameters(), m1.parameters()))
    assert err <= 1e-10, err


def test_token_mean_needs_the_output_with_empirical():
    model = TinyLM()
    opt = kk.KFAC(model, curvature="empirical", loss_reduction="token_mean")
    tok = torch.randint(0, V, (4, T))
    F.cross_entropy(model(tok).reshape(-1, V), tok.reshape(-1)).backward()
    with pytest.raises(ValueError, match=r"token_mean.*opt.backward\(loss, out\)"):
        opt.step()


def test_positions_follow_the_likelihood():
    out = torch.zeros(3, 4, 5, 6)
    assert positions("categorical", out) == 20 and positions(None, out) == 20
    assert positions("gaussian", out) == 120 and positions("bernoulli", torch.zeros(3)) == 1


def test_with_a_kl_clip_the_clip_is_per_position_too(monkeypatch):
    """The KL of the token-mean objective is the per-example one over T: kl_clip / T with
    token_mean gives the per-example run's steps (what the LM examples rely on)."""
    monkeypatch.setattr(capture_mod, "sample_vectors", _det_vectors)

    def run(reduction, damping, kl):
        torch.manual_seed(0)
        model = TinyLM().double()
        opt = kk.KFAC(model, lr=1.0, momentum=0.9, damping=damping, curvature="fisher",
                      likelihood="categorical", loss_reduction=reduction, kl_clip=kl, seed=1)
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            tok = torch.randint(0, V, (N, T), generator=g)
            out = model(tok)
            loss = F.cross_entropy(out.reshape(-1, V), tok.roll(1, 1).reshape(-1))  # token mean
            opt.zero_grad()
            opt.backward(loss, out)
            opt.step()
        return model

    m1 = run("mean", 3e-2, 1e-2)
    m2 = run("token_mean", 3e-2 / T, 1e-2 / T)
    err = max(float((p.detach() - q.detach()).norm() / q.detach().norm())
              for p, q in zip(m2.parameters(), m1.parameters()))
    assert err <= 1e-10, err

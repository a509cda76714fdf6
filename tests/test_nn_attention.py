"""kfac_kernels.nn.MultiheadAttention and convert(): torch's attention (and fused RNNs) rebuilt from
nn.Linear so K-FAC can precondition them. Outputs, attention weights and gradients are compared
with torch's modules in float64."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.engine import KFACWarning
from kfac_kernels.nn import MultiheadAttention, convert

TOL = 1e-12


def _inputs(batch_first, N, L, S, E, kdim, g, batched=True):
    q = torch.randn(N, L, E, generator=g, dtype=torch.float64)
    k = torch.randn(N, S, kdim, generator=g, dtype=torch.float64)
    v = torch.randn(N, S, kdim, generator=g, dtype=torch.float64)
    if not batched:
        return q[0], k[0], v[0]
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    return q, k, v


def _masks(kind, N, L, S, H, g):
    am = torch.rand(L, S, generator=g) > 0.6
    am[:, 0] = False                                   # every query keeps one key
    kpm = torch.rand(N, S, generator=g) > 0.7
    kpm[:, 0] = False
    return {
        "none": {},
        "bool attn_mask": dict(attn_mask=am),
        "float attn_mask": dict(attn_mask=torch.randn(L, S, generator=g, dtype=torch.float64)),
        "3-D attn_mask": dict(attn_mask=(torch.rand(N * H, L, S, generator=g) > 0.6)
                              .index_fill_(2, torch.tensor([0]), False)),
        "key_padding_mask": dict(key_padding_mask=kpm),
        "both": dict(attn_mask=am, key_padding_mask=kpm),
        "causal": dict(attn_mask=torch.ones(L, S, dtype=torch.bool).triu(1), is_causal=True),
    }[kind]


def _pair(batch_first, kdim, bias, E=8, H=2, seed=0):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first, kdim=kdim,
                                vdim=kdim).double()
    return ref, MultiheadAttention.from_torch(ref)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim,bias", [(None, True), (5, True), (None, False)])
@pytest.mark.parametrize("mask", ["none", "bool attn_mask", "float attn_mask", "3-D attn_mask",
                                  "key_padding_mask", "both", "causal"])
@pytest.mark.parametrize("weights", ["average", "per-head", "none"])
def test_matches_torch_outputs_weights_and_gradients(batch_first, kdim, bias, mask, weights):
    ref, ours = _pair(batch_first, kdim, bias)
    g = torch.Generator().manual_seed(1)
    N, L, S, E, H = 3, 4, 4 if mask == "causal" else 6, 8, 2
    q, k, v = _inputs(batch_first, N, L, S, E, kdim or E, g)
    kw = dict(_masks(mask, N, L, S, H, g), need_weights=weights != "none",
              average_attn_weights=weights == "average")
    a, aw = ref(q, k, v, **kw)
    b, bw = ours(q, k, v, **kw)
    assert b.shape == a.shape and (aw is None) == (bw is None)
    assert (a - b).abs().max() <= TOL
    if aw is not None:
        assert bw.shape == aw.shape and (aw - bw).abs().max() <= TOL
    # gradients: torch's fused in_proj is our q/k/v projections stacked
    dy = torch.randn(a.shape, generator=g, dtype=torch.float64)
    (a * dy).sum().backward()
    (b * dy).sum().backward()
    if kdim is None:
        got = torch.cat([ours.q_proj.weight.grad, ours.k_proj.weight.grad,
                         ours.v_proj.weight.grad])
        assert (got - ref.in_proj_weight.grad).abs().max() <= TOL
    else:
        assert (ours.k_proj.weight.grad - ref.k_proj_weight.grad).abs().max() <= TOL
    assert (ours.out_proj.weight.grad - ref.out_proj.weight.grad).abs().max() <= TOL
    if bias:
        got = torch.cat([ours.q_proj.bias.grad, ours.k_proj.bias.grad, ours.v_proj.bias.grad])
        assert (got - ref.in_proj_bias.grad).abs().max() <= TOL


def test_unbatched_input_and_causal_without_a_mask():
    ref, ours = _pair(True, None, True)
    g = torch.Generator().manual_seed(2)
    q, k, v = _inputs(True, 1, 5, 5, 8, 8, g, batched=False)
    a, aw = ref(q, k, v)
    b, bw = ours(q, k, v)
    assert b.shape == a.shape == (5, 8) and (a - b).abs().max() <= TOL
    assert (aw - bw).abs().max() <= TOL
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    q, k, v = _inputs(True, 2, 5, 5, 8, 8, g)
    a, _ = ref(q, k, v, attn_mask=causal, need_weights=False)
    b, _ = ours(q, k, v, is_causal=True, need_weights=False)    # the mask is built
    assert (a - b).abs().max() <= TOL


def test_dropout_only_in_training():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True).double()
    ours = MultiheadAttention.from_torch(ref)
    assert ours.training and ours.dropout == 0.5
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    ref.eval()
    ours.eval()
    assert (ref(x, x, x)[0] - ours(x, x, x)[0]).abs().max() <= TOL
    ours.train()
    a, b = ours(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0]
    assert not torch.allclose(a, b)          # dropout active (and drawn afresh)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiheadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    ours = MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 4\): expected \(4, 4\)"):
        ours(x, x, x, attn_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask of shape \(2, 3\)"):
        ours(x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------- convert()
class Seq2Seq(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        kw = dict(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(**kw), num_layers=2,
                                         enable_nested_tensor=False)
        self.dec = nn.TransformerDecoderLayer(**kw)
        self.rnn = nn.GRU(8, 8, batch_first=batch_first)
        self.head = nn.Linear(8, 5)

    def forward(self, src, tgt, src_mask=None):
        mem = self.enc(src, mask=src_mask)
        h, _ = self.rnn(self.dec(tgt, mem))
        return self.head(h)


@pytest.mark.parametrize("batch_first", [True, False])
def test_convert_keeps_the_function_and_leaves_nothing_to_the_fallback(batch_first):
    torch.manual_seed(0)
    model = Seq2Seq(batch_first).double()
    before = copy.deepcopy(model)
    assert convert(model) is model
    assert isinstance(model.enc.layers[0].self_attn, MultiheadAttention)
    assert isinstance(model.dec.multihead_attn, MultiheadAttention)
    assert isinstance(model.rnn, kk.nn.GRU)
    g = torch.Generator().manual_seed(3)
    src = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    tgt = torch.randn(4, 5, 8, generator=g, dtype=torch.float64)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        before.train(train)
        with torch.set_grad_enabled(train):     # eval + no_grad: torch's fused fast path
            a = before(src, tgt, causal)
            b = model(src, tgt, causal)
        assert (a - b).abs().max() <= 1e-12
    model.train()
    opt = kk.KFAC(model, lr=0.1, damping=1e-2, kl_clip=1e-3, inverse_every=1)
    assert "fallback parameters: none" in opt.describe()
    assert {"enc.layers.0.self_attn.q_proj", "dec.multihead_attn.v_proj",
            "dec.self_attn.out_proj", "rnn.layers.0.hh"} <= set(opt.blocks)
    if not batch_first:
        # the attention projections run batch-first inside, but torch's other layers see
        # [L, N, E] with the examples in dim 1: K-FAC needs batch_first=True models (it warns)
        return
    y = torch.randint(0, 5, (4, 5), generator=g)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", KFACWarning)      # e.g. a layer without batch dim 0
        for _ in range(8):
            loss = F.cross_entropy(model(src, tgt, causal).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_convert_names_what_it_cannot_represent():
    model = nn.Sequential(nn.Linear(4, 8), nn.LSTM(8, 8, proj_size=4))
    with pytest.raises(ValueError, match=r"cannot convert '1' \(LSTM\): from_torch does not"):
        convert(model)
    with pytest.raises(ValueError, match="replaces submodules in place"):
        convert(nn.MultiheadAttention(8, 2))
    cells = convert(nn.Sequential(nn.LSTMCell(3, 4)))
    assert isinstance(cells[0], kk.nn.LSTMCell)

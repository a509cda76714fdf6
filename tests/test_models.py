"""Whole networks people train: every weight of a GPT-style transformer and of a ResNet is in a
block (describe() shows no surprises), the layers K-FAC cannot see are reported with the reason,
explicit requests that cannot be honoured are errors, and the factor/preconditioning phases of all
new blocks stay free of host synchronisation."""
import contextlib
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.blocks import BlockInputError
from kfac_kernels.engine import KFACWarning
from helpers import cuda_sync_forbidden, host_sync_forbidden


# ---------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        N, T, d = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(d, -1)
        q, k, v = (t.reshape(N, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(a.transpose(1, 2).reshape(N, T, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab=17, d=16, heads=2, layers=2, ctx=8, tie=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        N, T = idx.shape
        pos = torch.arange(T, device=idx.device).expand(N, T)    # batch dimension first
        x = self.wte(idx) + self.wpe(pos)
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """A small ResNet (torchvision's layout: stem, stages of BasicBlocks, pool, fc)."""

    def __init__(self, widths=(8, 16), classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def train(model, opt, x, y, steps=2):
    for _ in range(steps):
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
    return float(loss.detach())


# ---------------------------------------------------------------------------- describe()
@pytest.mark.parametrize("inverse", ["eigh", "ekfac"])
def test_gpt_every_weight_in_a_block(inverse):
    torch.manual_seed(0)
    model = GPT()
    opt = kk.KFAC(model, lr=0.05, curvature="fisher", likelihood="categorical", inverse=inverse,
                  damping=1e-2)
    in_blocks = {id(p) for b in opt.blocks.values() for p in b.params}
    assert all(id(p) in in_blocks for p in model.parameters())
    kinds = {name: type(b).__name__ for name, b in opt.blocks.items()}
    assert kinds["wte"] == kinds["wpe"] == "EmbeddingBlock"
    assert kinds["h.0.ln1"] == kinds["ln_f"] == "NormBlock"
    assert kinds["h.1.c_attn"] == kinds["lm_head"] == "LinearBlock"
    assert len(opt.blocks) == 2 + 2 * 6 + 2
    x = torch.randint(0, 17, (4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KFACWarning)          # no batch-size surprises either
        loss = train(model, opt, x, torch.roll(x, -1, 1))
    assert math.isfinite(loss)
    text = opt.describe()
    assert "fallback parameters: none" in text
    for name in opt.blocks:
        assert f"\n{name} " in text


def test_resnet_every_weight_in_a_block():
    torch.manual_seed(0)
    model = ResNet()
    opt = kk.KFAC(model, lr=0.05, curvature="fisher", likelihood="categorical", damping=1e-2)
    in_blocks = {id(p) for b in opt.blocks.values() for p in b.params}
    assert all(id(p) in in_blocks for p in model.parameters())
    kinds = {type(b).__name__ for b in opt.blocks.values()}
    assert kinds == {"ConvBlock", "NormBlock", "LinearBlock"}
    assert "layers.1.0.downsample.0" in opt.blocks and "layers.1.0.downsample.1" in opt.blocks
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    assert math.isfinite(train(model, opt, x, y))
    assert "fallback parameters: none" in opt.describe()


def test_layers_kfac_cannot_see_are_listed_with_the_reason():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(11, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.lstm = nn.LSTM(8, 8, batch_first=True)
            self.cell = nn.GRUCell(8, 8)
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 11, bias=False)
            self.head.weight = self.wte.weight                    # tied

        def forward(self, t):
            x = self.wte(t)
            x = self.attn(x, x, x)[0]
            x = self.lstm(x)[0]
            return self.head(self.proj(self.cell(x[:, -1])))

    with pytest.warns(KFACWarning, match="7 weight parameters with 2 or more dimensions take a "
                                         "plain SGD step"):
        opt = kk.KFAC(Mixed())
    text = opt.describe()
    assert "attn.in_proj_weight: nn.MultiheadAttention applies its input projections functionally" in text
    assert "attn.out_proj.weight: the out_proj of nn.MultiheadAttention is applied functionally" in text
    assert ("lstm.weight_ih_l0: torch's nn.LSTM computes its gate pre-activations inside one "
            "fused op, hidden from hooks; use kfac_kernels.nn.LSTM") in text
    assert "cell.weight_hh: torch's nn.GRUCell" in text and "kfac_kernels.nn.GRUCell" in text
    assert "wte.weight: parameter shared with another module (tied weights)" in text
    assert set(opt.blocks) == {"proj"}


def test_kfac_nn_lstm_replaces_torch_lstm():
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True)
    ours = kk.nn.LSTM.from_torch(lstm)
    x = torch.randn(3, 5, 4)
    assert torch.allclose(lstm(x)[0], ours(x)[0], atol=1e-6)
    opt = kk.KFAC(ours)
    assert set(opt.blocks) == {f"layers.{i}.{w}" for i in range(2) for w in ("ih", "hh")}
    assert "fallback parameters: none" in opt.describe()


# ---------------------------------------------------------------------------- bad input
class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, y):
        return self.head(torch.tanh(self.enc(x)).mean(0, keepdim=True) + self.enc(y))


@pytest.mark.parametrize("ws,inverse,msg", [
    ("reduce", "eigh", r"module 'enc' was called with batch sizes \[(6, 3|3, 6)\] in one step; "
                       r"weight_sharing='reduce' needs the same batch size in every call"),
    ("expand", "ekfac", r"module 'enc' was called with batch sizes \[(6, 3|3, 6)\] in one step; "
                        r"per-example statistics \(EKFAC, normalisation layers\) need one batch size"),
])
def test_module_called_with_inconsistent_batch_sizes(ws, inverse, msg):
    model = Shared()
    opt = kk.KFAC(model, weight_sharing=ws, inverse=inverse)
    out = model(torch.randn(6, 3), torch.randn(3, 3))
    opt.zero_grad()
    F.mse_loss(out, torch.zeros_like(out)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KFACWarning)    # (it is also reported as a warning)
        with pytest.raises(BlockInputError, match=msg):
            opt.step()


def test_layer_without_a_batch_dimension_is_reported():
    class PosEmb(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe, self.head = nn.Embedding(9, 4), nn.Embedding(5, 4), nn.Linear(4, 9)

        def forward(self, t):
            return self.head(self.wte(t) + self.wpe(torch.arange(t.shape[1])))   # [T]: no batch

    model = PosEmb()
    opt = kk.KFAC(model, curvature="fisher", likelihood="categorical")
    t = torch.randint(0, 9, (6, 5))
    out = model(t)
    opt.zero_grad()
    opt.backward(F.cross_entropy(out.reshape(-1, 9), t.reshape(-1)), out)
    with pytest.warns(KFACWarning, match=r"module 'wpe' saw inputs with batch size\(s\) \[5\] "
                                         r"while the model's batch size is 6.*pos.expand\(N, T\)"):
        opt.step()


def test_only_and_skip_select_modules_and_refuse_what_they_cannot_honour():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(5), nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 2)))
    opt = kk.KFAC(model, only=["2.*"])
    assert set(opt.blocks) == {"2.0", "2.1"}
    assert "0.weight: not listed in only=" in opt.describe()
    opt = kk.KFAC(model, skip=["2"])                      # a container covers its children
    assert set(opt.blocks) == {"0"}
    assert "2.1.bias: listed in skip=" in opt.describe()
    with pytest.raises(ValueError, match=r"skip= names '3', which matches no module of the model"):
        kk.KFAC(model, skip=["3"])
    with pytest.raises(ValueError, match=r"only= names 'fc', which matches no module"):
        kk.KFAC(model, only=["fc"])
    with pytest.raises(ValueError, match=r"only= asks K-FAC to precondition '1', but no module it "
                                         r"names can get a block: 1 \(PReLU\): no block for PReLU"):
        kk.KFAC(model, only=["0", "1"])
    with pytest.raises(ValueError, match=r"only= asks K-FAC to precondition '0'.*listed in skip="):
        kk.KFAC(model, only=["0"], skip=["0"])
    lstm = nn.Sequential(nn.LSTM(3, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"0 \(LSTM\): torch's nn.LSTM computes its gate "
                                         r"pre-activations inside one fused op"):
        kk.KFAC(lstm, only=["0"])
    with pytest.raises(TypeError, match="not a single string"):
        kk.KFAC(model, only="0")
    pre = kk.KFACPreconditioner(model, only=["0"])
    assert set(pre.blocks) == {"0"}


# ---------------------------------------------------------------------------- host sync
@pytest.mark.parametrize("inverse", ["eigh", "ekfac", "cholesky"])
def test_new_blocks_step_without_host_sync_between_inverse_updates(inverse):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 6, padding_idx=0)
            self.ln = nn.LayerNorm(6)
            self.dw = nn.Conv1d(6, 6, 3, groups=3, padding=1)
            self.bn = nn.BatchNorm1d(6)
            self.gru = kk.nn.GRU(6, 5, batch_first=True)
            self.head = nn.Linear(5, 3)

        def forward(self, t):
            h = self.bn(self.dw(self.ln(self.emb(t)).transpose(1, 2))).transpose(1, 2)
            return self.head(self.gru(torch.tanh(h))[1][-1])

    model = Net()
    opt = kk.KFAC(model, lr=0.05, curvature="fisher", likelihood="categorical", kl_clip=1e-3,
                  inverse=inverse, inverse_every=100, seed=1, weight_decay=1e-4)
    t = torch.randint(0, 9, (8, 5))
    y = torch.randint(0, 3, (8,))
    train(model, opt, t, y, steps=1)                   # first step: inverse update (may sync)

    with host_sync_forbidden():
        out = model(t)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
    assert opt.engine.factor_updates == 2


@pytest.mark.gpu
@pytest.mark.parametrize("inverse", ["eigh", "ekfac"])
def test_new_blocks_on_cuda_step_without_sync(inverse):
    """On a GPU, torch's sync-debug mode turns any host synchronisation in step() (outside
    inverse updates) into an error: embeddings (index_add_, sort), norm blocks, stacked groups,
    recurrent calls, EKFAC's scalings."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 8, padding_idx=0), nn.LayerNorm(8),
                          kk.nn.GRU(8, 8, batch_first=True)).cuda()
    head = nn.Conv1d(8, 8, 3, groups=4, padding=1).cuda()
    fc = nn.Linear(8, 3).cuda()
    net = nn.ModuleDict(dict(body=model, head=head, fc=fc))

    def fwd(t):
        h = net["body"](t)[0]
        return net["fc"](net["head"](h.transpose(1, 2)).mean(-1))

    opt = kk.KFAC(net, lr=0.05, curvature="fisher", likelihood="categorical", kl_clip=1e-3,
                  inverse=inverse, inverse_every=50, seed=0)
    t = torch.randint(0, 9, (16, 6), device="cuda")
    y = torch.randint(0, 3, (16,), device="cuda")
    for i in range(4):
        out = fwd(t)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        opt.backward(loss, out)
        with (cuda_sync_forbidden() if i > 0 else contextlib.nullcontext()):
            opt.step()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("inverse", ["cholesky", "ekfac"])
def test_distributed_takes_every_block_family(tmp_path, inverse):
    """The distributed strategy reduces stacked blocks (norms), a diagonal A (embeddings) and
    EKFAC's scalings like any factor (a one-rank gloo group: the same as a single process; more
    ranks in test_ddp.py)."""
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build of torch")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ref_model = copy.deepcopy(model)
        opt = kk.KFAC(model, distributed=True, inverse=inverse, inverse_every=2)
        assert opt.engine.dist is not None and set(opt.blocks) == {"0", "1", "2"}
        ref = kk.KFAC(ref_model, inverse=inverse, inverse_every=2)
        t = torch.randint(0, 9, (5, 3))
        y = torch.randint(0, 3, (5, 3))
        for m, o in ((model, opt), (ref_model, ref)):
            for _ in range(4):
                loss = F.cross_entropy(m(t).flatten(0, 1), y.flatten())
                o.zero_grad()
                loss.backward()
                o.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):   # float64: rounding only
            assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()

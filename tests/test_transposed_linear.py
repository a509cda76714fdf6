"""Hugging Face's Conv1D (GPT-2's linear layers, weight stored [in, out]): TransposedLinearBlock is
nn.Linear's block with the weight seen transposed. Checked against nn.Linear with the transposed
weight on the same inputs, and on a small GPT-2 from transformers (a test dependency)."""
import pytest
import torch
import torch.nn as nn

import kfac_kernels as kk
from kfac_kernels.engine import KFACWarning
from kfac_kernels.blocks import TransposedLinearBlock

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install 'kfac_kernels[test]')")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _pair(nx, nf, seed=0):
    torch.manual_seed(seed)
    hf = Conv1D(nf, nx).double()
    with torch.no_grad():
        hf.bias.normal_()
    lin = nn.Linear(nx, nf).double()
    with torch.no_grad():
        lin.weight.copy_(hf.weight.T)
        lin.bias.copy_(hf.bias)
    return hf, lin


@pytest.mark.parametrize("curvature,ws,inverse", [("empirical", "expand", "eigh"),
                                                  ("fisher", "reduce", "cholesky"),
                                                  ("fisher", "expand", "ekfac")])
def test_factors_and_updates_equal_nn_linear_with_the_transposed_weight(curvature, ws, inverse):
    hf, lin = _pair(5, 7)
    models = [nn.Sequential(hf, nn.Tanh(), nn.Linear(7, 3)).double(),
              nn.Sequential(lin, nn.Tanh(), nn.Linear(7, 3)).double()]
    models[1][2].load_state_dict(models[0][2].state_dict())
    opts = [kk.KFAC(m, lr=0.1, momentum=0.5, damping=1e-2, curvature=curvature,
                    likelihood="categorical", weight_sharing=ws, inverse=inverse,
                    inverse_every=2, weight_decay=1e-3, seed=3) for m in models]
    assert isinstance(opts[0].blocks["0"], TransposedLinearBlock)
    assert opts[0].blocks["0"].shape == opts[1].blocks["0"].shape == (7, 6)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(8, 4, 5, generator=g, dtype=torch.float64)     # a sequence of 4
        y = torch.randint(0, 3, (8, 4), generator=g)
        for m, opt in zip(models, opts):
            out = m(x)
            loss = nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())
            opt.zero_grad()
            opt.backward(loss, out)
            opt.step()
        a, b = opts[0].blocks["0"], opts[1].blocks["0"]
        assert (a.A - b.A).abs().max() <= 1e-12 and (a.G - b.G).abs().max() <= 1e-12
        if inverse == "ekfac":
            assert (a.inverse["S"] - b.inverse["S"]).abs().max() <= 1e-10
        assert (hf.weight.T - lin.weight).abs().max() <= 1e-10
        assert (hf.bias - lin.bias).abs().max() <= 1e-10


def test_gpt2_from_transformers_has_every_linear_layer_in_a_block_and_trains():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64,
                                     n_positions=16, bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    # the token embedding is tied to the LM head: a fallback weight matrix, warned about
    with pytest.warns(KFACWarning, match=r"transformer.wte.weight \(64, 32\) \(parameter "
                                            r"shared with another module \(tied weights\)\)"):
        opt = kk.KFAC(model, lr=0.3, damping=1e-2, kl_clip=1e-3, curvature="fisher",
                      likelihood="categorical", inverse_every=2, skip=["transformer.wpe"],
                      seed=0)
    for layer in range(2):
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert isinstance(opt.blocks[f"transformer.h.{layer}.{name}"], TransposedLinearBlock)
    text = opt.describe()
    fallback = [ln for ln in text.splitlines() if ln.startswith("  ")]
    # the token embedding is tied to the LM head; the position embedding is called on
    # positions [1, T] (no batch dimension), so it is skipped here
    assert fallback == ["  transformer.wte.weight: parameter shared with another module (tied "
                        "weights)", "  transformer.wpe.weight: listed in skip="], fallback
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (16, 12), generator=g)
    losses = []
    for _ in range(10):
        out = model(ids).logits[:, :-1]
        loss = nn.functional.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses

"""A small GPT-style character model on generated arithmetic, K-FAC against AdamW.

    python -m kfac_kernels.examples.transformer_lm [--steps N] [--out DIR]

Every weight of the model is in a K-FAC block: token and position embeddings (diagonal A),
LayerNorm scales and shifts (exact per-channel blocks), the attention and MLP Linears over the
sequence (weight_sharing="expand"). ``describe()`` is printed first. See docs/layers.md.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from . import _text


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        N, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, -1)
        q, k, v = (t.reshape(N, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(N, T, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, ctx: int, d: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx):
        N, T = idx.shape
        pos = torch.arange(T, device=idx.device).expand(N, T)     # batch dimension first
        x = self.tok(idx) + self.pos(pos)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


CTX = 32


def make_model():
    return GPT(len(_text.VOCAB), CTX)


def make_kfac(model, args):
    if args.kfac == "recipe":
        # the transformer recipe (kfac_kernels/recipes.py, docs/transformers.md): Adam's moments
        # in K-FAC's eigenbasis, empirical metric, factors every 5 steps, no KL clip
        lr = {} if args.kfac_lr is None else {"lr": args.kfac_lr}
        return kk.KFAC(model, **kk.recipes.transformer(**lr), seed=args.seed)
    # "classic": eigenvalue scalings; with lr this large the KL clip binds on every step: each
    # step is lr * nu * U with lr^2 nu^2 <U, V> = kl_clip, a trust region of radius kl_clip
    return kk.KFAC(model, lr=args.kfac_lr or 10.0, momentum=0.9, damping=args.damping,
                   curvature="fisher", likelihood="categorical", factor_every=1,
                   loss_reduction="token_mean",      # the loss is a per-token mean
                   inverse_every=10, ema_decay=0.95, kl_clip=args.kl_clip, seed=args.seed)


def make_adamw(model, args):
    return torch.optim.AdamW(model.parameters(), lr=args.adamw_lr, betas=(0.9, 0.99),
                             weight_decay=0.01)


def main(argv=None) -> int:
    ap = _text.parser(__doc__.splitlines()[0], steps=400)
    ap.add_argument("--kfac", choices=["recipe", "classic"], default="recipe",
                    help="K-FAC settings: kfac_kernels.recipes.transformer() (default) or the "
                         "classic eigenvalue-scaled K-FAC with a KL clip (--damping, --kl-clip)")
    ap.add_argument("--kfac-lr", type=float, default=None,
                    help="default: the recipe's (3e-3), 10 (classic)")
    ap.add_argument("--damping", type=float, default=0.3 / CTX,
                    help="classic only: per position (token_mean)")
    ap.add_argument("--kl-clip", type=float, default=0.03 / CTX,
                    help="classic only: per position (token_mean)")
    ap.add_argument("--adamw-lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = _text.Data(n_train=args.train_problems, n_val=args.val_problems, seed=args.seed,
                      ctx=CTX, digits=args.digits)
    print(kk.KFAC(make_model()).describe())
    hists = []
    runs = [("K-FAC", lambda m: make_kfac(m, args)), ("AdamW", lambda m: make_adamw(m, args))]
    for name, mk in runs:
        if args.only and args.only != name.lower().replace("-", ""):
            continue
        print(f"{name}:")
        hists.append(_text.run(name, make_model, mk, data, args.steps, args.batch,
                               args.eval_every, args.seed))
    title = (f"GPT-style char model ({hists[0]['params']} parameters) on generated arithmetic: "
             f"K-FAC vs AdamW")
    _text.finish(hists, args.out, "transformer_lm", title, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

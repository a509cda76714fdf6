"""A GRU (or LSTM) character model built from kfac_kernels.nn cells on generated arithmetic,
K-FAC against AdamW.

    python -m kfac_kernels.examples.rnn_lm [--cell gru|lstm] [--steps N] [--out DIR]

The recurrent layer's two Linears (input->gates over all positions in one call, hidden->gates
called once per time step) are K-FAC blocks with tied weights across time (Martens, Ba & Johnson
2018, independence across steps: weight_sharing="expand"); the embedding has a diagonal A.
torch's fused nn.GRU/nn.LSTM would leave these weights to the fallback (their gate
pre-activations are invisible to hooks). See docs/layers.md.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

import kfac_kernels as kk
from . import _text


class CharRNN(nn.Module):
    def __init__(self, vocab: int, cell: str = "gru", d: int = 32, hidden: int = 128):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = {"gru": kk.nn.GRU, "lstm": kk.nn.LSTM}[cell](d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx):
        out, _ = self.rnn(self.emb(idx))
        return self.head(out)


CTX = 32


def main(argv=None) -> int:
    ap = _text.parser(__doc__.splitlines()[0], steps=300)
    ap.add_argument("--cell", choices=["gru", "lstm"], default="gru")
    ap.add_argument("--kfac-lr", type=float, default=1.0)
    ap.add_argument("--damping", type=float, default=0.03 / CTX)   # per position (token_mean)
    ap.add_argument("--kl-clip", type=float, default=0.01 / CTX)   # per position (token_mean)
    ap.add_argument("--adamw-lr", type=float, default=1e-2)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = _text.Data(n_train=args.train_problems, n_val=args.val_problems, seed=args.seed,
                      ctx=CTX, digits=args.digits)
    make_model = lambda: CharRNN(len(_text.VOCAB), args.cell)              # noqa: E731
    print(kk.KFAC(make_model()).describe())
    runs = [("K-FAC", lambda m: kk.KFAC(m, lr=args.kfac_lr, momentum=0.9, damping=args.damping,
                                        curvature="fisher", likelihood="categorical",
                                        loss_reduction="token_mean",   # the loss's per-token mean
                                        inverse_every=10, kl_clip=args.kl_clip,
                                        seed=args.seed)),
            ("AdamW", lambda m: torch.optim.AdamW(m.parameters(), lr=args.adamw_lr,
                                                  betas=(0.9, 0.99), weight_decay=0.01))]
    hists = []
    for name, mk in runs:
        if args.only and args.only != name.lower().replace("-", ""):
            continue
        print(f"{name}:")
        hists.append(_text.run(name, make_model, mk, data, args.steps, args.batch,
                               args.eval_every, args.seed))
    title = (f"{args.cell.upper()} char model from kfac_kernels.nn ({hists[0]['params']} "
             f"parameters) on generated arithmetic: K-FAC vs AdamW")
    _text.finish(hists, args.out, f"rnn_lm_{args.cell}", title, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

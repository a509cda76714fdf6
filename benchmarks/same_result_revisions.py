"""Do two source trees of kfac_kernels train bit for bit alike? (for refactors that promise it)

Each tree runs the same short trainings in its own process (its ``kfac_kernels`` first on
``sys.path``): a small float32 network with a grouped convolution (a stacked block), a plain
convolution, a layer norm and linear layers with and without bias, 12 steps of K-FAC with
curvature="fisher", for every inverse kind and four ways of updating the factors: every step
(the arena's flat merge), every second step, with two micro-batches of gradient accumulation
(the per-block merge) and with bfloat16 factor storage. Afterwards the parameters, each
block's factors, counters, decomposition entries and EKFAC counter, and the keys of its
state_dict entry are compared with ``torch.equal`` (dtype and shape included).

    python benchmarks/same_result_revisions.py --base /path/to/old/checkout --new .

(``git archive <commit> | tar -x -C /tmp/base`` makes a checkout of an older revision.) Exit
status 1 when anything differs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

WORKER = textwrap.dedent(r'''
    import sys, warnings
    sys.path.insert(0, sys.argv[1])
    warnings.simplefilter("ignore")
    import torch, torch.nn as nn, torch.nn.functional as F
    torch.set_num_threads(1)
    import kfac_kernels as kk
    assert kk.__file__.startswith(sys.argv[1]), kk.__file__

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Conv2d(4, 3, 3),
                             nn.Tanh(), nn.Flatten(), nn.Linear(27, 10), nn.LayerNorm(10),
                             nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                             nn.Linear(10, 5, bias=False))

    def batch(s, n=16):
        g = torch.Generator().manual_seed(100 + s)
        return torch.randn(n, 2, 7, 7, generator=g), torch.randint(0, 5, (n,), generator=g)

    out = {}
    for inverse in ("eigh", "cholesky", "ekfac", "eigen_adam"):
        for mode in ("every step", "factor_every=2", "2 micro-batches", "bf16 storage"):
            net = model()
            kw = dict(lr=0.05, momentum=0.9, damping=1e-8 if inverse == "eigen_adam" else 1e-2,
                      curvature="fisher", likelihood="categorical", inverse=inverse,
                      inverse_every=3, seed=3, ema_decay=0.9, weight_decay=1e-3)
            if mode == "factor_every=2":
                kw["factor_every"] = 2
            if mode == "bf16 storage":
                kw["factor_storage_dtype"] = torch.bfloat16
            opt = kk.KFAC(net, **kw)
            for s in range(12):
                x, y = batch(s)
                opt.zero_grad()
                parts = (x.split(7), y.split(7)) if mode == "2 micro-batches" else ([x], [y])
                for xb, yb in zip(*parts):
                    o = net(xb)
                    opt.backward(F.cross_entropy(o, yb) * (xb.shape[0] / x.shape[0]), o)
                opt.step()
            rec = {"params": [p.detach().clone() for p in net.parameters()]}
            for n, b in opt.blocks.items():
                rec[n] = dict(A=b.A, G=b.G, count=b.count, skipped=b.skipped,
                              inverse=dict(b.inverse), ekfac_count=b.ekfac_count)
            rec["state_dict keys"] = {n: sorted(e) for n, e in
                                      opt.state_dict()["kfac"]["blocks"].items()}
            out[f"{inverse}, {mode}"] = rec
    torch.save(out, sys.argv[2])
''')


def _same(a, b) -> bool:
    import torch
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--new", required=True)
    args = ap.parse_args(argv)
    import torch
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    with tempfile.TemporaryDirectory() as tmp:
        res = []
        for i, tree in enumerate((args.base, args.new)):
            path = os.path.join(tmp, f"{i}.pt")
            subprocess.run([sys.executable, "-c", WORKER, os.path.abspath(tree), path],
                           env=env, check=True)
            res.append(torch.load(path, weights_only=False))
    differ = 0
    for key in res[0]:
        same = key in res[1] and _same(res[0][key], res[1][key])
        differ += not same
        print(f"{key}: {'identical' if same else 'DIFFERENT'}")
    print("all identical" if not differ else f"{differ} of {len(res[0])} differ")
    return int(differ > 0)


if __name__ == "__main__":
    sys.exit(main())

"""Shared pieces of the optimizer step benchmarks (optim_step_time.py).

Parameter sets with fixed random gradients (an optimizer step's cost does not depend on what the
gradient holds; random gradients are full rank, as real ones of large batches are):

* ``autoencoder``: the demo's deep autoencoder 64-256-128-64-16-64-128-256-64 (8 weights and 8
  biases, all shapes distinct);
* ``gpt2``: GPT-2 small's transformer blocks (d = 768) as parameters laid out as in Hugging
  Face's GPT-2 (``Conv1D`` weights [in, out]): per block ln_1, c_attn [768, 2304], attn c_proj
  [768, 768], ln_2, mlp c_fc [768, 3072], mlp c_proj [3072, 768] and their biases, plus wpe
  [1024, 768] and ln_f. ``blocks`` of the 12 (2 on CPU to keep CPU time sane); the tied token
  embedding wte [50257, 768] is left out (its 768 x 768 Gram over 50257 rows alone is ~3e10
  flops a step on CPU, the same for every implementation). With ``max_precond_dim = 2048`` the
  2304- and 3072-long sides are diagonal/identity, the 768 sides full.
* ``gpt2-d64``: the same layout at width 64 (all 12 blocks): many small same-shaped matrices,
  where per-call overhead, not arithmetic, sets the step time (what batching by shape is for);
* ``tiny``: a few small shapes (smoke tests).

Optimizers (``make(name, params)``): kk-soap / kk-shampoo (kfac_kernels.optim, one op call per
parameter batch), their ``-looped`` variants (``batch_shapes=False``: one call per parameter), and
heavyball-soap / heavyball-soap-compiled (heavyball.SOAP, eager: its ``compile_mode = None``;
compiled: its default torch.compile of the step's functions); kk-muon / kk-muon-looped
(kfac_kernels.optim.Muon: every 2-D parameter in Muon, as torch's own example splits them, the
rest in its ``use_muon=False`` AdamW group) against torch-muon (``torch.optim.Muon`` on the same
2-D parameters plus ``torch.optim.AdamW`` on the rest, stepped together).
"""
from __future__ import annotations

import torch

SOAP_KW = dict(lr=3e-3, betas=(0.9, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.01,
               precondition_frequency=10, max_precond_dim=2048)
MUON_KW = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5)  # torch's, lr
ADAMW_KW = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)              # the rest
SHAMPOO_KW = dict(lr=1e-3, epsilon=1e-6, beta2=0.999, momentum=0.9, grafting="adam",
                  precondition_frequency=10, max_precond_dim=2048)


def param_shapes(case: str, blocks: int = 2):
    if case == "autoencoder":
        dims = (64, 256, 128, 64, 16, 64, 128, 256, 64)
        out = []
        for a, b in zip(dims[:-1], dims[1:]):
            out += [(b, a), (b,)]
        return out
    if case in ("gpt2", "gpt2-d64"):
        d = 768 if case == "gpt2" else 64
        out = [(1024, d)]                                    # wpe
        for _ in range(blocks):
            out += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),          # ln_1, attn
                    (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]      # ln_2, mlp
        return out + [(d,), (d,)]                            # ln_f
    if case == "tiny":
        return [(9, 5), (9, 5), (4, 9), (9,), (4,)]
    raise ValueError(f"unknown case {case!r}")


class Params(list):
    """The parameters, with their fixed gradients re-attached by ``feed()`` before each step
    (heavyball sets ``p.grad = None`` after its step; kfac_kernels leaves it, as torch.optim)."""

    def __init__(self, params, grads):
        super().__init__(params)
        self.grads = grads

    def feed(self):
        for p, g in zip(self, self.grads):
            p.grad = g


def make_params(case: str, device="cpu", blocks: int = 2, seed: int = 0) -> Params:
    g = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for shape in param_shapes(case, blocks):
        params.append(torch.nn.Parameter((0.02 * torch.randn(shape, generator=g)).to(device)))
        grads.append(torch.randn(shape, generator=g).to(device))
    out = Params(params, grads)
    out.feed()
    return out


def steps(opt, params, n, device="cpu"):
    """``n`` optimizer steps, the gradients re-attached before each."""
    mode = getattr(opt, "_bench_compile_mode", False)
    if mode is False:
        for _ in range(n):
            params.feed()
            opt.step()
        sync(device)
        return
    # heavyball reads ``heavyball.utils.compile_mode`` (a module global) at every call, so an
    # eager and a compiled instance timed in interleaved rounds must each set it while stepping;
    # otherwise both would run in whichever mode was set last. Restored afterwards.
    hb_utils = heavyball_module().utils
    saved, hb_utils.compile_mode = hb_utils.compile_mode, mode
    try:
        for _ in range(n):
            params.feed()
            opt.step()
        sync(device)
    finally:
        hb_utils.compile_mode = saved


OPTIMIZERS = ("kk-soap", "kk-shampoo", "kk-soap-looped", "kk-shampoo-looped", "heavyball-soap",
              "heavyball-soap-compiled", "kk-muon", "kk-muon-looped", "torch-muon")


class _Pair:
    """Two optimizers stepped as one (torch.optim.Muon for the matrices, AdamW for the rest)."""

    def __init__(self, *opts):
        self.opts = [o for o in opts if o is not None]

    def step(self):
        for o in self.opts:
            o.step()


def _muon_split(params):
    mats = [p for p in params if p.dim() == 2]
    return mats, [p for p in params if p.dim() != 2]


HB_COMPILE_MODE = "max-autotune-no-cudagraphs"     # heavyball 3.2.1's default compile_mode


def heavyball_module():
    try:
        import heavyball
    except ImportError:
        return None
    return heavyball


def make(name: str, params):
    from kfac_kernels.optim import SOAP, Shampoo
    if name == "kk-soap":
        return SOAP(params, **SOAP_KW)
    if name == "kk-soap-looped":
        return SOAP(params, batch_shapes=False, **SOAP_KW)
    if name == "kk-shampoo":
        return Shampoo(params, **SHAMPOO_KW)
    if name == "kk-shampoo-looped":
        return Shampoo(params, batch_shapes=False, **SHAMPOO_KW)
    if name in ("kk-muon", "kk-muon-looped"):
        from kfac_kernels.optim import Muon
        mats, rest = _muon_split(params)
        groups = [dict(params=mats)] + ([dict(params=rest, use_muon=False, **ADAMW_KW)]
                                        if rest else [])
        return Muon(groups, batch_shapes=name == "kk-muon", **MUON_KW)
    if name == "torch-muon":
        mats, rest = _muon_split(params)
        return _Pair(torch.optim.Muon(mats, **MUON_KW),
                     torch.optim.AdamW(rest, **ADAMW_KW) if rest else None)
    if name.startswith("heavyball-soap"):
        hb = heavyball_module()
        if hb is None:
            raise RuntimeError("heavyball not installed")
        opt = hb.SOAP(params, **SOAP_KW)
        opt._bench_compile_mode = HB_COMPILE_MODE if name.endswith("compiled") else None
        return opt
    raise ValueError(f"unknown optimizer {name!r}")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()

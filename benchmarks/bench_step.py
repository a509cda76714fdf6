"""One full training step, K-FAC against AdamW, on a GPT-2-small-sized model.

Target (benchmarks/README.md, "Performance targets"): one K-FAC step with factor_every=10 and inverse_every=100 costs <= 1.1x an
AdamW step. A step is everything a training loop does: forward, backward (and K-FAC's sampled
Fisher pass on factor steps), the factor update on factor steps, the eigendecompositions on
inverse steps, the preconditioning, KL clip and update. Each timed round is one whole period of
100 steps, so it holds exactly 10 factor updates and 1 inverse update: the round's time / 100 is
the amortised step, nothing extrapolated. ``extra_info["metric"]`` gives ms/step.

Model (GPU): GPT-2 small's shape (12 layers, d 768, 12 heads, 50257-token vocabulary, untied
head) from kfac_kernels.examples.transformer_lm, batch 8 x 256 tokens, bf16 autocast, fp32
weights. K-FAC preconditions every weight except the 50257-wide output head (its G factor alone
would be 50257^2 fp32 = 10 GB; it takes the plain SGD-with-momentum rule, as ``describe()`` says),
curvature "fisher" (one categorical sample per token), eigendecompositions, KL clip.
The ratio in summary.md is AdamW's time / K-FAC's: the target of <= 1.1x cost is a ratio >= 0.91.

One timed period per provider, after one warm-up period (the device check's time limit allows no
more; a single sample, so the ratio carries that period's noise). GPU: an estimated 30-60 s, run by
gpu_check.sh on its own with a 90 s limit. CPU: a 2-layer, d 32 model and a 20-step period
(factor_every=2, inverse_every=20), smoke only (--benchmark-disable).
"""
import pytest
import torch
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.examples.transformer_lm import GPT

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    SIZE = dict(vocab=50257, ctx=1024, d=768, heads=12, layers=12)
    BATCH, SEQ, PERIOD, FACTOR_EVERY, ROUNDS = 8, 256, 100, 10, 1
else:
    SIZE = dict(vocab=50, ctx=16, d=32, heads=4, layers=2)
    BATCH, SEQ, PERIOD, FACTOR_EVERY, ROUNDS = 4, 16, 20, 2, 1
CASE = (f"gpt2-small {BATCH}x{SEQ} tokens, {PERIOD}-step period" if CUDA else
        f"tiny gpt d{SIZE['d']} {BATCH}x{SEQ}, {PERIOD}-step period")


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _setup(provider):
    torch.manual_seed(0)
    model = GPT(SIZE["vocab"], SIZE["ctx"], d=SIZE["d"], heads=SIZE["heads"],
                layers=SIZE["layers"]).to(DEVICE)
    if provider == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    else:
        opt = kk.KFAC(model, lr=0.1, momentum=0.9, damping=1e-3, curvature="fisher",
                      likelihood="categorical", factor_every=FACTOR_EVERY, inverse_every=PERIOD,
                      kl_clip=1e-3, skip=["head"], seed=0)
    g = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.randint(0, SIZE["vocab"], (BATCH, SEQ + 1), generator=g).to(DEVICE)
               for _ in range(4)]
    return model, opt, batches


def _train(model, opt, batches, steps, kfac):
    loss = None
    for i in range(steps):
        tokens = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
            out = model(tokens[:, :-1])
            loss = F.cross_entropy(out.flatten(0, 1).float(), tokens[:, 1:].flatten())
        opt.zero_grad()
        if kfac:
            opt.backward(loss, out)
        else:
            loss.backward()
        opt.step()
    return loss


@pytest.mark.parametrize("provider", ["adamw", "kfac"])
def test_full_step_gpt2_small(benchmark, provider):
    model, opt, batches = _setup(provider)
    kfac = provider == "kfac"
    # Warm-up: one whole period (compiles Triton kernels, allocates, fills the factors); the timed
    # periods then start where an inverse update is due, like every later period of a run.
    _train(model, opt, batches, PERIOD, kfac)
    _sync()
    if kfac:
        assert opt.engine.inverse_updates == 1 and opt.engine.factor_updates == PERIOD // FACTOR_EVERY

    calls = []

    def period():
        loss = _train(model, opt, batches, PERIOD, kfac)
        _sync()
        calls.append(1)
        return loss

    benchmark.extra_info.update(op="full_train_step", case=CASE, provider=provider,
                                baseline=provider == "adamw", target=0.91)
    loss = benchmark.pedantic(period, rounds=ROUNDS, iterations=1)
    assert torch.isfinite(loss)
    if kfac:   # every timed period held exactly its factor and inverse updates
        periods = 1 + len(calls)
        assert opt.engine.inverse_updates == periods
        assert opt.engine.factor_updates == periods * (PERIOD // FACTOR_EVERY)
    if not benchmark.disabled:
        ms = benchmark.stats.stats.median * 1e3 / PERIOD
        benchmark.extra_info["metric"] = f"{ms:.2f} ms/step"

"""Muon on the kernel ops: ops.newton_schulz's reference (float64 transcription, bf16 against torch's
own bf16 iteration, checks, custom op) and kfac_kernels.optim.Muon (float64 against a transcription
of the update, bf16 step for step against torch.optim.Muon, state_dict, schedulers, AdamW group)."""
import math

import pytest
import torch
from torch import nn

from kfac_kernels import ops
from kfac_kernels.ops import reference
from kfac_kernels.optim import Muon, muon_param_groups

COEF = reference.NS_COEFFICIENTS
U_BF16 = 2.0 ** -8          # unit roundoff of bfloat16 (8 significand bits, round to nearest)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def ns64(X, steps=5, coef=COEF, eps=1e-7):
    """Newton-Schulz in float64 written out with plain matmuls, one matrix at a time."""
    a, b, c = coef
    Y = X.double()
    tall = Y.shape[0] > Y.shape[1]
    if tall:
        Y = Y.T
    Y = Y / max(float(Y.norm()), eps)
    for _ in range(steps):
        A = Y @ Y.T
        Y = a * Y + (b * A + c * A @ A) @ Y
    return Y.T if tall else Y


# ----------------------------------------------------------------------------- the op
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (33, 7), (3, 65, 129), (2, 400, 130)])
def test_reference_float64_matches_transcription(shape):
    """Float64: every symmetric product as one product mirrored (below three 128-wide blocks)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(shape, dtype=torch.float64, generator=g)
    got = ops.newton_schulz(X)
    want = torch.stack([ns64(x) for x in X]) if X.dim() == 3 else ns64(X)
    assert got.shape == X.shape and got.dtype == torch.float64
    assert rel(got, want) <= 1e-12


def test_reference_block_path_and_non_contiguous():
    """m = 400 > 3 blocks of 128: the symmetric products run block row by block row; the input
    is a strided, transposed view."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 900, 401, dtype=torch.float64, generator=g)
    X = base.transpose(1, 2)[:, :400, ::2]                   # [2, 400, 450], not contiguous
    got = ops.newton_schulz(X, steps=3)
    want = torch.stack([ns64(x, 3) for x in X])
    assert rel(got, want) <= 1e-12
    for M in (got, ops.newton_schulz(X.transpose(1, 2), steps=3)):
        assert torch.isfinite(M).all()


@pytest.mark.parametrize("shape", [(33, 129), (129, 33), (4, 64, 96), (1, 400, 520)])
def test_reference_bf16_within_twice_torch_error(shape):
    """bf16: error against float64 at most twice that of torch.optim.Muon's own bf16 iteration,
    plus one unit roundoff (the rule of docs/math.md for low-precision kernels)."""
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns
    g = torch.Generator().manual_seed(3)
    X = torch.randn(shape, generator=g)
    X3 = X if X.dim() == 3 else X[None]
    got = ops.newton_schulz(X3, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    want = torch.stack([ns64(x) for x in X3])
    base = torch.stack([torch_ns(x, COEF, 5, 1e-7) for x in X3])
    assert rel(got, want) <= 2 * rel(base, want) + U_BF16


def test_orthogonalises():
    """The quintic's fixed band: after 5 steps every singular value of a well-conditioned input
    lies in [0.6, 1.25] (Jordan et al.: roughly Uniform(0.5, 1.5) at worst); 30 steps of the
    convergent cubic (1.5, -0.5, 0) give the orthogonal factor to 1e-10."""
    g = torch.Generator().manual_seed(4)
    Q1, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(60, 40, dtype=torch.float64, generator=g))
    X = (Q1 * torch.linspace(0.1, 1.0, 40, dtype=torch.float64)) @ Q2.T      # 40 x 60
    s = torch.linalg.svdvals(ops.newton_schulz(X))
    assert float(s.min()) >= 0.6 and float(s.max()) <= 1.25, s
    O = ops.newton_schulz(X, 30, (1.5, -0.5, 0.0))
    assert rel(O, Q1 @ Q2.T) <= 1e-10


def test_zero_steps_zero_matrix_and_checks():
    X = torch.randn(5, 8)
    assert torch.allclose(ops.newton_schulz(X, 0), X / X.norm(), rtol=1e-6, atol=0)
    assert torch.equal(ops.newton_schulz(torch.zeros(2, 3, 4)), torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="pass dtype=torch.bfloat16"):
        ops.newton_schulz(X.half())
    assert ops.newton_schulz(X.half(), dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        ops.newton_schulz(X, -1)
    with pytest.raises(ValueError, match="three numbers"):
        ops.newton_schulz(X, 5, (1.0, 2.0))
    with pytest.raises(ValueError, match="eps must be > 0"):
        ops.newton_schulz(X, eps=0.0)
    with pytest.raises(ValueError, match="must have 2 or 3 dims"):
        ops.newton_schulz(torch.randn(2, 2, 3, 4))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ops.newton_schulz([[1.0]])


def test_custom_op_schema_fake_and_compile():
    X = torch.randn(2, 5, 7)
    torch.library.opcheck(torch.ops.kfac_kernels.newton_schulz.default,
                          (X, 5, *COEF, 1e-7, torch.float32, False, "auto"),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
    torch._dynamo.reset()
    fn = torch.compile(lambda x: ops.newton_schulz(x * 2, dtype=torch.float64), fullgraph=True,
                       backend="aot_eager")
    got = fn(X)
    assert got.dtype == torch.float64 and torch.allclose(got, ops.newton_schulz(
        X * 2, dtype=torch.float64), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- the optimizer
def _adjust(lr, fn, shape):
    A, B = shape
    return lr * (0.2 * math.sqrt(max(A, B)) if fn == "match_rms_adamw"
                 else math.sqrt(max(1.0, A / B)))


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12, bias=False), nn.Tanh(), nn.Linear(12, 12, bias=False),
                         nn.Tanh(), nn.Linear(12, 12, bias=False), nn.Tanh(),
                         nn.Linear(12, 5, bias=False)).to(dtype)


def _loss(model, step, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(32, 6, generator=g).to(dtype), torch.randn(32, 5, generator=g).to(dtype)
    return ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("nesterov,adjust,wd", [(True, None, 0.1), (False, "match_rms_adamw", 0.0),
                                                (True, "original", 0.3)])
@pytest.mark.parametrize("batch_shapes", [True, False])
def test_float64_matches_transcription_over_20_steps(nesterov, adjust, wd, batch_shapes):
    """With the iteration in float64, 20 training steps on a tanh network equal a float64
    transcription of the update formula to 1e-10 relative (gradients feed back through the
    parameters, so any difference would grow)."""
    model, twin = _model(), _model()
    opt = Muon(model.parameters(), lr=0.05, weight_decay=wd, momentum=0.9, nesterov=nesterov,
               adjust_lr_fn=adjust, ns_dtype=torch.float64, batch_shapes=batch_shapes)
    ws = list(twin.parameters())
    bufs = [torch.zeros_like(w) for w in ws]
    for t in range(20):
        opt.zero_grad()
        _loss(model, t).backward()
        opt.step()
        twin.zero_grad()
        _loss(twin, t).backward()
        with torch.no_grad():
            for w, buf in zip(ws, bufs):
                buf.mul_(0.9).add_(0.1 * w.grad)
                u = 0.1 * w.grad + 0.9 * buf if nesterov else buf
                w.mul_(1 - 0.05 * wd).sub_(_adjust(0.05, adjust, w.shape) * ns64(u))
    for p, w in zip(model.parameters(), ws):
        assert rel(p, w) <= 1e-10


def _track_torch(nesterov=True, flip=False, steps=12, device="cpu"):
    """Run ours (default bf16 iteration) and torch.optim.Muon on one fixed gradient sequence;
    return the largest deviation as a fraction of its bound (see the test)."""
    g = torch.Generator().manual_seed(5)
    shapes = [(24, 40), (24, 40), (40, 24), (130, 70), (520, 400)]
    init = [torch.randn(s, generator=g).to(device) for s in shapes]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    lr = 0.02
    a = Muon(ours, lr=lr, nesterov=nesterov != flip)
    b = torch.optim.Muon(theirs, lr=lr, nesterov=nesterov)
    bound = [0.0] * len(shapes)
    worst = 0.0
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            grad = torch.randn(p.shape, generator=g).to(device)
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            # ||O||_F <= sqrt(min(m, n)) * 1.5: O's singular values stay below 1.5 (the quintic)
            o_norm = 1.5 * math.sqrt(min(p.shape))
            bound[i] = bound[i] + _adjust(lr, None, p.shape) * 30 * U_BF16 * o_norm
            worst = max(worst, float((p - q).detach().norm()) / bound[i])
    return worst


def test_bf16_tracks_torch_muon_step_for_step():
    """Default bf16 iteration against torch.optim.Muon on identical gradients, 12 steps.

    Bound: both iterate in bf16 and round each of the 3 products of each of the 5 Newton-Schulz
    steps once (relative error <= u = 2^-8 each); counted as independent errors, the updates of
    the two differ by at most 2 * 15 u = 30 u relative, and ||O||_F <= 1.5 sqrt(min(m, n)).
    Weight decay (a factor <= 1) and momentum (identical buffers: the gradients are the same)
    do not amplify a difference, so after t steps ||W_ours - W_torch||_F <= sum_s lr' 30 u ||O||.
    On a CPU the reference makes the same bf16 products as torch (exact agreement here); the
    Triton kernels on a GPU sum in another order, which the bound covers."""
    assert _track_torch() <= 1.0
    assert _track_torch(nesterov=False) <= 1.0


@pytest.mark.gpu
def test_bf16_tracks_torch_muon_on_cuda():
    """The same on a GPU: our Newton-Schulz runs on the Triton kernels (backend "auto"), torch's
    on cuBLAS; the bound of the CPU test holds."""
    assert _track_torch(device="cuda") <= 1.0


def test_bf16_tracking_bound_can_fail():
    """The same bound rejects a different update (nesterov flipped on our side only)."""
    assert _track_torch(flip=True, steps=4) > 1.0


def test_state_dict_round_trip_and_torch_state():
    """Stop after 5 of 10 steps, save, load into a fresh optimizer, go on: the same parameters as
    an uninterrupted run, exactly; the momentum buffer is named as torch's, so a
    torch.optim.Muon state_dict loads too."""
    def run(split):
        model = _model(torch.float32)
        opt = Muon(model.parameters(), lr=0.02)
        for t in range(10):
            if t == split:
                sd = opt.state_dict()
                opt = Muon(model.parameters(), lr=0.02)
                opt.load_state_dict(sd)
            opt.zero_grad()
            _loss(model, t, torch.float32).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for p, q in zip(run(None), run(5)):
        assert torch.equal(p, q)
    model = _model(torch.float32)
    theirs = torch.optim.Muon(model.parameters(), lr=0.02)
    _loss(model, 0, torch.float32).backward()
    theirs.step()
    ours = Muon(model.parameters(), lr=0.02)
    ours.load_state_dict(theirs.state_dict())
    ours.step()
    theirs.step()
    for p in model.parameters():
        assert torch.equal(ours.state[p]["momentum_buffer"], theirs.state[p]["momentum_buffer"])


def test_lr_scheduler():
    """A scheduler's lr reaches the update: StepLR halving every 2 steps against the float64
    transcription with the same lr sequence."""
    model, twin = _model(), _model()
    opt = Muon(model.parameters(), lr=0.04, momentum=0.0, weight_decay=0.1,
               ns_dtype=torch.float64)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for t in range(6):
        lr = 0.04 * 0.5 ** (t // 2)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-15)
        opt.zero_grad()
        _loss(model, t).backward()
        opt.step()
        sched.step()
        twin.zero_grad()
        _loss(twin, t).backward()
        with torch.no_grad():
            for w in twin.parameters():
                w.mul_(1 - lr * 0.1).sub_(_adjust(lr, None, w.shape) * ns64(w.grad))
    for p, w in zip(model.parameters(), twin.parameters()):
        assert rel(p, w) <= 1e-10


def test_refuses_non_matrix_parameters_naming_the_split():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"2-D weight matrices only.*shape \(8,\).*AdamW.*"
                                         r"use_muon"):
        Muon(model.parameters())
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.randn(2, 3, 4))])
    for kw, msg in ((dict(lr=-1.0), "lr"), (dict(momentum=-0.1), "momentum"),
                    (dict(ns_steps=100), "ns_steps"), (dict(adjust_lr_fn="rms"), "adjust_lr_fn"),
                    (dict(ns_dtype=torch.float16), "ns_dtype"),
                    (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients"),
                    (dict(lr=torch.ones(2)), "one element")):
        with pytest.raises(ValueError, match=msg):
            Muon([nn.Parameter(torch.randn(3, 4))], **kw)


def test_adamw_group_matches_torch_adamw():
    """A use_muon=False group is torch.optim.AdamW (its defaults, or the group's own settings);
    muon_param_groups puts hidden Linear weights in Muon and the rest (head, norm, biases,
    convolution) in that group."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(12, 16), nn.LayerNorm(16),
                          nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    groups = muon_param_groups(model, adamw_lr=3e-3, betas=(0.9, 0.95))
    hidden = {id(model[2].weight), id(model[4].weight)}
    assert {id(p) for p in groups[0]["params"]} == hidden
    rest = groups[1]["params"]
    assert len(rest) == len(list(model.parameters())) - 2 and groups[1]["use_muon"] is False
    twin = [p.detach().clone().requires_grad_() for p in rest]
    opt = Muon(groups, lr=0.02, ns_dtype=torch.float64)
    ref = torch.optim.AdamW(twin, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-2)
    x = torch.randn(8, 2, 6, dtype=torch.float64)
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        for p, q in zip(rest, twin):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for p, q in zip(rest, twin):
            assert rel(p, q) <= 1e-12

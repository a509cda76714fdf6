"""Bad input gets a clear error or a documented warning, never a silent wrong update."""
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels.engine import KFACWarning


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def test_model_without_supported_layer():
    with pytest.raises(ValueError, match="no layer K-FAC supports.*0 \\(no block for "
                                         "PReLU\\): weight"):
        kk.KFAC(nn.Sequential(nn.PReLU(4)))
    # one reason per module, its parameters listed after it
    with pytest.raises(ValueError) as exc:
        kk.KFAC(nn.Sequential(nn.Bilinear(3, 3, 2)))
    assert str(exc.value).count("no block for Bilinear") == 1
    assert "0 (no block for Bilinear): weight, bias" in str(exc.value)
    with pytest.raises(TypeError, match="takes the model"):
        kk.KFAC(mlp().parameters())


@pytest.mark.parametrize("kw,msg", [
    (dict(curvature="hessian"), "unknown curvature 'hessian'"),
    (dict(curvature="fisher", likelihood="poisson"), "unknown likelihood 'poisson'"),
    (dict(curvature="fisher"), "curvature='fisher' needs a likelihood"),
    (dict(inverse="svd"), "unknown inverse 'svd'"),
    (dict(backend="opencl"), "unknown backend 'opencl'"),
    (dict(damping_mode="levenberg"), "unknown damping_mode"),
    (dict(inverse="cholesky", damping_mode="eigen"), "supports damping_mode='pi' only"),
    (dict(weight_sharing="mean"), "unknown weight_sharing"),
    (dict(mc_samples=0), "mc_samples must be"),
    (dict(inverse_every=0), "inverse_every must be"),
    (dict(damping=-1.0), "damping must be"),
    (dict(ema_decay=1.0), "ema_decay must be"),
    (dict(kl_clip=0.0), "kl_clip must be"),
    (dict(loss_reduction="none"), "unknown loss_reduction"),
])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        kk.KFAC(mlp(), **kw)


def test_named_backend_that_cannot_run_here():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the cuda backend may be usable")
    with pytest.raises(kk.ops.BackendUnavailable, match="backend='cuda' cannot run here"):
        kk.KFAC(mlp(), backend="cuda")


def test_backward_without_outputs_when_the_metric_needs_them():
    model = mlp()
    opt = kk.KFAC(model, curvature="fisher", likelihood="categorical")
    x = torch.randn(8, 4)
    loss = F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="needs the model outputs"):
        opt.backward(loss)


def test_plain_backward_with_fisher_is_an_error_at_step():
    model = mlp()
    opt = kk.KFAC(model, curvature="fisher", likelihood="categorical")
    x = torch.randn(8, 4)
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    with pytest.raises(RuntimeError, match="call opt.backward\\(loss, out\\)"):
        opt.step()


@pytest.mark.parametrize("likelihood,shape,msg", [
    ("categorical", (8,), "logits of shape \\[N, ..., C\\]"),
    ("categorical", (8, 1), "at least 2 classes"),
])
def test_likelihood_that_does_not_fit_the_output(likelihood, shape, msg):
    torch.manual_seed(0)
    model = nn.Linear(4, shape[-1] if len(shape) > 1 else 1)
    opt = kk.KFAC(model, curvature="ggn", likelihood=likelihood)
    out = model(torch.randn(8, 4))
    out = out.reshape(shape)
    with pytest.raises(ValueError, match=msg):
        opt.backward(out.sum(), out)


def test_output_batch_size_mismatch():
    model = mlp()
    opt = kk.KFAC(model, curvature="ggn", likelihood="categorical")
    out = model(torch.randn(8, 4))
    with pytest.raises(ValueError, match="batch size 4 does not match"):
        opt.backward(out.sum(), out[:4])


def test_integer_output_and_detached_output():
    model = mlp()
    opt = kk.KFAC(model, curvature="ggn", likelihood="gaussian")
    out = model(torch.randn(8, 4))
    with pytest.raises(ValueError, match="does not require grad"):
        opt.backward(out.sum(), out.detach())


def test_nonfinite_statistics_skip_the_factor_update_and_warn_once():
    model = mlp().double()
    opt = kk.KFAC(model, lr=0.1, curvature="empirical", inverse_every=1)
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))

    def step(inp, keep_grad=True):
        out = model(inp)
        opt.zero_grad()
        F.cross_entropy(out, y).backward()
        if not keep_grad:
            opt.zero_grad(set_to_none=True)   # no parameter update: only the factors are tested
        opt.step()

    step(x)
    before = {n: (b.A.clone(), b.G.clone(), b.count.clone()) for n, b in opt.blocks.items()}
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.warns(KFACWarning, match="non-finite activations or gradients; its factor "
                                         "update was skipped"):
        step(bad, keep_grad=False)
    for n, b in opt.blocks.items():
        assert torch.equal(b.A, before[n][0]) and torch.equal(b.G, before[n][1])
        assert torch.equal(b.count, before[n][2])
        assert int(b.skipped) == 1
    inf = x.clone()
    inf[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", KFACWarning)      # once per block: no second warning
        step(inf, keep_grad=False)
    step(x)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the inf input saturates tanh: layer "2" saw finite statistics and took that update
    assert int(opt.blocks["0"].count) == 2 and int(opt.blocks["2"].count) == 3


def test_import_is_light():
    code = ("import sys, torch, kfac_kernels as kk; kk.KFAC; kk.KFACPreconditioner; kk.ops; "
            "bad = [m for m in ('triton', 'cupy', 'kfac_kernels._C', 'sklearn', 'matplotlib', "
            "'torch.distributed.fsdp', 'torch.distributed.tensor', 'kfac_kernels.fsdp', "
            "'kfac_kernels.comm.fsdp', 'kfac_kernels.comm.ddp', 'kfac_kernels.distributed') "
            "if m in sys.modules]; "
            "assert not bad, bad; assert not torch.cuda.is_initialized(); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_shared_input_with_nan_rejects_every_layer_that_reads_it():
    """Layers fed the same input share one A estimate; a NaN in it must reject all of them (the
    verdicts are taken before any estimate is cleaned in place)."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x).nan_to_num(), self.b(x).nan_to_num()

    torch.manual_seed(0)
    model = TwoHeads().double()
    opt = kk.KFAC(model, lr=0.0, inverse_every=1)
    x = torch.randn(8, 4, dtype=torch.float64)
    x[2, 1] = float("nan")
    ya, yb = model(x)
    (ya.sum() + (yb ** 2).sum()).backward()    # output gradients (so G) stay finite
    opt.zero_grad(set_to_none=True)            # only the factors are under test
    with pytest.warns(KFACWarning) as rec:
        opt.step()
    assert {str(w.message).split("'")[1] for w in rec} == {"a", "b"}
    assert int(opt.blocks["a"].count) == 0 and int(opt.blocks["b"].count) == 0


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.act = nn.PReLU(8)            # a 1-d weight: left to the fallback without a warning
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.act(h).mean(1))


def _fallback_warnings(make):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        make()
    return [str(w.message) for w in rec if issubclass(w.category, KFACWarning)]


def test_weight_matrices_left_to_the_first_order_rule_warn_once_at_construction():
    for make, rule in ((lambda: kk.KFAC(_Attn()), "plain SGD step"),
                       (lambda: kk.KFACPreconditioner(_Attn()), "base optimiser")):
        got = _fallback_warnings(make)
        assert len(got) == 1, got
        msg = got[0]
        assert rule in msg and "2 weight parameters" in msg
        assert "attn.in_proj_weight (24, 8)" in msg and "attn.out_proj.weight (8, 8)" in msg
        assert "kk.nn.convert(model)" in msg and "skip=" in msg
        assert "act.weight" not in msg                  # 1-d: not a weight matrix
    # left out on purpose: no warning (skip= and only=)
    assert _fallback_warnings(lambda: kk.KFAC(_Attn(), skip=["attn"])) == []
    assert _fallback_warnings(lambda: kk.KFAC(_Attn(), only=["inp", "head"])) == []
    # converted: the projections are blocks, nothing to warn about
    assert _fallback_warnings(lambda: kk.KFAC(kk.nn.convert(_Attn()))) == []
    # a parameter of the param groups that no module of the model holds
    extra = nn.Parameter(torch.randn(3, 4))
    m = mlp()
    got = _fallback_warnings(lambda: kk.KFAC(m, params=list(m.parameters()) + [extra]))
    assert len(got) == 1 and "param (3, 4)" in got[0] and "not in a module" in got[0]


def test_likelihood_with_empirical_curvature_warns_that_it_is_unused():
    with pytest.warns(KFACWarning, match="likelihood='categorical' is unused with "
                                         "curvature='empirical'"):
        kk.KFAC(mlp(), likelihood="categorical")
    with warnings.catch_warnings():
        warnings.simplefilter("error", KFACWarning)
        kk.KFAC(mlp(), curvature="fisher", likelihood="categorical")


def test_dir_of_the_package_lists_its_public_names():
    names = dir(kk)
    for n in ("KFAC", "KFACPreconditioner", "nn", "ops", "__version__"):
        assert n in names


def test_an_evaluation_pass_with_gradients_on_warns_and_paused_keeps_it_out():
    def factors(use_pause):
        torch.manual_seed(0)
        m = mlp()
        opt = kk.KFAC(m)
        x, xv = torch.randn(8, 4), 100 * torch.randn(8, 4)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            loss = F.cross_entropy(m(x), torch.arange(8) % 3)
            m.eval()
            if use_pause:
                with opt.paused():
                    m(xv)                      # an evaluation pass with gradients on
            else:
                m(xv)
            m.train()
            opt.zero_grad()
            loss.backward()
            opt.step()
        msgs = [str(w.message) for w in rec if issubclass(w.category, KFACWarning)]
        return opt.blocks["0"].A.clone(), msgs
    A_plain, msgs = factors(False)
    assert any("training mode and in eval mode" in s and "opt.paused()" in s for s in msgs)
    A_paused, msgs = factors(True)
    assert not any("eval mode" in s for s in msgs)
    assert not torch.allclose(A_plain, A_paused)     # the unpaused pass entered A


def test_batch_size_mismatch_lists_every_captured_size_and_names_the_cause():
    m = mlp()
    opt = kk.KFAC(m, curvature="fisher", likelihood="categorical")
    m(torch.randn(5, 4))                               # a stray pass with gradients on
    out = m(torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"\[5, 8\].*torch.no_grad\(\).*opt.paused\(\)"):
        opt.backward(F.cross_entropy(out, torch.arange(8) % 3), out)

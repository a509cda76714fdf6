"""Faults never crash a run: the decomposition fallback chain under bad factors (indefinite, NaN,
inf, rank-deficient, huge condition numbers, decompositions that fail to converge) for eigh and
cholesky, on the first decomposition and on later ones; hooks and references do not outlive the
optimiser; a checkpoint from another model names the mismatch."""
import gc
import re
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from kfac_kernels import ops
from kfac_kernels.engine import KFACWarning


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 5, generator=g)
    return x.to(dtype), (x[:, :3] - x[:, 2:]).argmax(1)


def forward_backward(model, opt, step):
    x, y = batch(step, next(model.parameters()).dtype)
    out = model(x)
    opt.zero_grad()
    opt.backward(F.cross_entropy(out, y), out)


def bad_factor(kind, n, dtype):
    """A symmetric n x n factor of the given pathology (rank-deficient, indefinite, ...)."""
    g = torch.Generator().manual_seed(n)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -2, n, dtype=torch.float64)
    if kind == "indefinite":
        lam[::2] *= -1.0
    elif kind == "rank_deficient":
        lam[n // 2:] = 0.0
    elif kind == "ill_conditioned":
        lam = torch.logspace(0, -14, n, dtype=torch.float64)
    elif kind == "huge":
        lam = lam * 1e36                          # fp32 max is 3.4e38: products overflow
    f = (Q * lam) @ Q.T
    f = 0.5 * (f + f.T)
    if kind == "zero":
        f = torch.zeros(n, n, dtype=torch.float64)
    elif kind == "nan":
        f[0, 1] = f[1, 0] = float("nan")
    elif kind == "inf":
        f[2, 2] = float("inf")
    return f.to(dtype)


KINDS = ["indefinite", "rank_deficient", "ill_conditioned", "zero", "huge", "nan", "inf"]
NONFINITE = ("nan", "inf")


def _known(msg):
    return re.search(r"failed in torch.float32; recovered in float64|failed; used|keeping the "
                     r"previous|no previous one; using a scaled identity|no previous inverse; "
                     r"using a scaled identity|restarts from the next factor estimate", msg)


@pytest.mark.parametrize("when", ["first", "later"])
@pytest.mark.parametrize("inverse", ["eigh", "cholesky"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_factors_never_crash_and_training_recovers(kind, inverse, when):
    model = mlp()
    opt = kk.KFAC(model, lr=0.05, momentum=0.0, damping=1e-3, inverse=inverse, inverse_every=1,
                  curvature="empirical")
    eng = opt.engine
    if when == "later":
        for s in range(2):
            forward_backward(model, opt, s)
            opt.step()
        previous = {n: {k: v.clone() for k, v in b.inverse.items()} for n, b in opt.blocks.items()}
    forward_backward(model, opt, 2)
    eng.finish_factor_update()                      # this step's factors, then corrupt them
    for b in opt.blocks.values():      # in place: the block's saved state is its record's
        b.A.copy_(bad_factor(kind, b.A.shape[0], b.A.dtype))
        b.G.copy_(bad_factor(kind, b.G.shape[0], b.G.dtype))
    eng.needs_inverse = True
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.step()                                  # decomposes the corrupted factors
    msgs = [str(w.message) for w in rec if issubclass(w.category, KFACWarning)]
    assert all(_known(m) for m in msgs), msgs
    if kind == "indefinite" and inverse == "cholesky":   # no Cholesky: damped until it has one
        assert any("failed; used extra damping" in m for m in msgs), msgs
    elif kind not in NONFINITE:   # eigh clamps negative eigenvalues at 0; damping covers the rest
        assert msgs == []
    for name, b in opt.blocks.items():
        assert b.inverse and all(torch.isfinite(v).all() for v in b.inverse.values()), name
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if kind in NONFINITE:
        # no decomposition of a non-finite factor exists: the previous one, or a scaled identity
        expect = "keeping the previous" if when == "later" else "scaled identity"
        assert any(expect in m for m in msgs), msgs
        if when == "later":
            for name, b in opt.blocks.items():
                for k, v in previous[name].items():
                    assert torch.equal(b.inverse[k], v)
    # training goes on; a non-finite running factor restarts from the next estimate
    for s in range(3, 6):
        forward_backward(model, opt, s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KFACWarning)
            opt.step()
    for b in opt.blocks.values():
        assert torch.isfinite(b.A).all() and torch.isfinite(b.G).all()
        assert all(torch.isfinite(v).all() for v in b.inverse.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("inverse", ["eigh", "cholesky"])
@pytest.mark.parametrize("when", ["first", "later"])
def test_decomposition_that_fails_on_the_fast_path_is_recovered_in_float64(inverse, when,
                                                                           monkeypatch):
    """A backend that reports failure (non-convergence, not positive definite in fp32) on the
    first try: the chain retries in float64 and the result equals a direct fp64 decomposition."""
    model = mlp()
    opt = kk.KFAC(model, lr=0.05, damping=1e-3, inverse=inverse, inverse_every=1,
                  curvature="empirical")
    if when == "later":
        forward_backward(model, opt, 0)
        opt.step()
    name = "symeig" if inverse == "eigh" else "damped_inverse"
    real = getattr(ops, name)

    def flaky(*args, backend="auto", **kw):
        res = real(*args, backend=backend, **kw)
        if backend == "torch":                   # the fallback's own call
            return res
        *vals, info = res
        info = torch.ones_like(info)             # every matrix "failed"
        vals = [torch.full_like(v, float("nan")) for v in vals]
        return (*vals, info)

    monkeypatch.setattr(ops, name, flaky)
    forward_backward(model, opt, 1)
    with pytest.warns(KFACWarning, match="recovered in float64"):
        opt.step()
    monkeypatch.undo()
    for b in opt.blocks.values():
        if inverse == "eigh":
            lam, Q = torch.linalg.eigh(b.A.double())
            assert torch.allclose(b.inverse["lamA"].double(), lam, rtol=1e-5, atol=1e-7)
        else:
            pi = kk.inverses.pi(b).double()
            ref = torch.linalg.inv(b.A.double() + pi * 1e-3 ** 0.5 * torch.eye(b.A.shape[0],
                                                                               dtype=torch.float64))
            assert torch.allclose(b.inverse["A_inv"].double(), ref, rtol=1e-4, atol=1e-6)


def test_damping_zero_on_singular_factors_with_cholesky_does_not_crash():
    model = mlp(torch.float64)
    opt = kk.KFAC(model, lr=0.05, damping=0.0, inverse="cholesky", inverse_every=1,
                  curvature="empirical")
    forward_backward(model, opt, 0)
    opt.engine.finish_factor_update()
    for b in opt.blocks.values():
        b.A.copy_(bad_factor("rank_deficient", b.A.shape[0], b.A.dtype))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.step()
    assert any("Cholesky of A failed" in str(w.message) for w in rec)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------- lifetime
def test_dropped_optimizer_frees_its_engine_and_hooks():
    model = mlp()
    opt = kk.KFAC(model, curvature="empirical")
    forward_backward(model, opt, 0)
    opt.step()
    ref = weakref.ref(opt.engine)
    del opt
    gc.collect()
    assert ref() is None
    assert not any(m._forward_hooks for m in model.modules())
    model(batch(0)[0]).sum().backward()             # the model works without its optimiser


def test_close_removes_hooks_and_later_steps_use_the_last_factors():
    model = mlp()
    opt = kk.KFAC(model, lr=0.1, curvature="empirical", inverse_every=1)
    forward_backward(model, opt, 0)
    opt.step()
    A = {n: b.A.clone() for n, b in opt.blocks.items()}
    opt.close()
    assert not any(m._forward_hooks for m in model.modules())
    forward_backward(model, opt, 1)
    w = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(w, model[0].weight.detach())
    assert all(torch.equal(A[n], b.A) for n, b in opt.blocks.items())
    assert not any(opt.engine.capture.of(b).inputs for b in opt.blocks.values())


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_from_a_model_with_the_same_names_and_shapes_but_other_layer_types():
    """Linear(9 -> 4) and Conv2d(1 -> 4, 3x3) both have a 4 x 10 gradient matrix."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(9, 4))
    conv = nn.Sequential(nn.Identity(), nn.Conv2d(1, 4, 3))
    o_lin = kk.KFAC(lin, curvature="empirical")
    o_conv = kk.KFAC(conv, curvature="empirical")
    x = torch.randn(8, 1, 3, 3)
    o_conv.zero_grad()
    conv(x).sum().backward()
    o_conv.step()
    with pytest.raises(ValueError, match=r"block '1' is a conv block there and a linear block "
                                         r"here"):
        o_lin.load_state_dict(o_conv.state_dict())


# ---------------------------------------------------------------------------- torch.distributed
@pytest.mark.timeout(60)
def test_skip_decision_agrees_across_ranks():
    """A non-finite gradient on one rank skips the step on every rank (the decision is summed
    over the process group on the device), so replicas and their factors stay identical."""
    from dist_harness import run_ranks
    import robust_dist_scenarios as R
    r0, r1 = run_ranks(R.nonfinite_gradient_on_one_rank, 2, timeout=60)
    assert r0["unchanged"] and r1["unchanged"]
    assert r0["skipped"] == r1["skipped"] == 1
    assert r0["counts"] == r1["counts"] == [2.0, 2.0, 2.0]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    assert all(torch.equal(a, b) for a, b in zip(r0["A"], r1["A"]))

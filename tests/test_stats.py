"""opt.stats() for loggers, and damping / kl_clip in param_groups (schedulers, callbacks)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk
from helpers import host_sync_forbidden


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def data(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 6, generator=g)
    return x, (x[:, :3] - x[:, 3:]).argmax(1)


def train(opt, model, steps, start=0, hook=None):
    for s in range(start, start + steps):
        if hook is not None:
            hook(s)
        x, y = data(s)
        out = model(x)
        opt.zero_grad()
        opt.backward(F.cross_entropy(out, y), out)
        opt.step()


@pytest.mark.parametrize("inverse", ["eigh", "cholesky", "ekfac"])
def test_stats_keys_values_and_no_host_sync(inverse):
    model = mlp()
    opt = kk.KFAC(model, lr=0.1, curvature="ggn", likelihood="categorical", inverse=inverse,
                  kl_clip=1e-3, inverse_every=2)
    train(opt, model, 2)
    with host_sync_forbidden():
        st = opt.stats()                       # device values stay tensors
    assert "0/update_norm" not in st           # recorded from the next step on
    train(opt, model, 1, start=2)
    st = opt.stats(sync=True)
    assert all(isinstance(v, (int, float)) for v in st.values()), st
    assert st["damping"] == opt.damping and st["kl_clip"] == 1e-3 and st["lr"] == 0.1
    assert st["steps"] == 3 and st["factor_updates"] == 3 and st["inverse_updates"] == 2
    assert st["skipped_steps"] == 0 and st["time/inverse_update_s"] > 0
    assert 0 < st["kl_clip/factor"] <= 1
    for name, b in opt.blocks.items():
        g = torch.cat([b.weight.grad, b.bias.grad[:, None]], 1)
        assert math.isclose(st[f"{name}/grad_norm"], float(g.norm()), rel_tol=1e-6)
        assert st[f"{name}/update_norm"] > 0
        if inverse == "cholesky":
            d = b.A.diagonal()
            assert math.isclose(st[f"{name}/A_diag_max"], float(d.max()), rel_tol=1e-6)
        else:
            lam = b.inverse["lamG"]
            assert math.isclose(st[f"{name}/G_eig_min"], float(lam.min()), rel_tol=1e-6)
            assert st[f"{name}/A_eig_max"] >= st[f"{name}/A_eig_min"]


def test_update_norm_is_the_clipped_direction():
    model = mlp()
    opt = kk.KFAC(model, lr=0.5, momentum=0.0, curvature="ggn", likelihood="categorical",
                  kl_clip=1e-4, inverse_every=1)
    opt.stats()
    before = [p.detach().clone() for p in model.parameters()]
    train(opt, model, 1)
    st = opt.stats(sync=True)
    ps = list(model.parameters())
    for i, name in enumerate(opt.blocks):     # momentum 0, no weight decay: p -= lr * nu * U
        dw = (before[2 * i] - ps[2 * i].detach()) / 0.5
        db = (before[2 * i + 1] - ps[2 * i + 1].detach()) / 0.5
        assert math.isclose(st[f"{name}/update_norm"], float(torch.cat([dw, db[:, None]], 1)
                                                             .norm()), rel_tol=1e-4)


def test_damping_and_kl_clip_in_param_groups_drive_the_step():
    def run(how):
        model = mlp()
        opt = kk.KFAC(model, lr=0.1, damping=1e-2, curvature="ggn", likelihood="categorical",
                      inverse_every=1)

        def hook(s):
            if s == 2 and how == "groups":
                for g in opt.param_groups:
                    g["damping"] = 0.3
                    g["kl_clip"] = 1e-3
            if s == 2 and how == "attr":
                opt.damping, opt.kl_clip = 0.3, 1e-3
        train(opt, model, 4, hook=hook)
        return opt, [p.detach().clone() for p in model.parameters()]

    o1, p1 = run("groups")
    o2, p2 = run("attr")
    _, p3 = run("none")
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert not all(torch.equal(a, b) for a, b in zip(p1, p3))
    assert o1.damping == 0.3 and o1.kl_clip == 1e-3
    assert all(g["damping"] == 0.3 and g["kl_clip"] == 1e-3 for g in o2.param_groups)


def test_a_scheduler_like_callback_over_param_groups():
    model = mlp()
    opt = kk.KFAC(model, lr=0.1, damping=1.0, curvature="ggn", likelihood="categorical")
    seen = []
    for s in range(4):
        for g in opt.param_groups:          # exponential damping decay, the way lr is scheduled
            g["damping"] = 1.0 * 0.5 ** s
        train(opt, model, 1, start=s)
        seen.append(opt.stats()["damping"])
    assert seen == [1.0, 0.5, 0.25, 0.125]


def test_groups_with_different_damping_raise():
    model = mlp()
    opt = kk.KFAC(model, params=[{"params": model[0].parameters()},
                                 {"params": model[2].parameters(), "damping": 0.5}],
                  curvature="ggn", likelihood="categorical")
    x, y = data(0)
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out)
    with pytest.raises(ValueError, match=r"different damping.*same value in every group"):
        opt.step()


def test_group_damping_survives_a_state_dict_round_trip():
    model = mlp()
    opt = kk.KFAC(model, lr=0.1, curvature="ggn", likelihood="categorical")
    train(opt, model, 2)
    for g in opt.param_groups:
        g["damping"] = 0.07
    train(opt, model, 1, start=2)
    sd = opt.state_dict()
    model2 = mlp()
    opt2 = kk.KFAC(model2, lr=0.1, curvature="ggn", likelihood="categorical")
    opt2.load_state_dict(sd)
    assert opt2.damping == 0.07 and opt2.param_groups[0]["damping"] == 0.07


def test_preconditioner_stats():
    model = mlp()
    pre = kk.KFACPreconditioner(model, curvature="ggn", likelihood="categorical")
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(2):
        x, y = data(s)
        out = model(x)
        base.zero_grad()
        pre.backward(F.cross_entropy(out, y), out)
        pre.step()
        base.step()
    st = pre.stats(sync=True)
    assert st["factor_updates"] == 2 and "0/G_eig_max" in st


def test_logging_example_runs_and_writes_the_stats(tmp_path, monkeypatch, capsys):
    import json
    from kfac_kernels.examples import log_stats
    monkeypatch.setattr(log_stats, "writer_for", lambda d: (log_stats.JsonLines(d), "jsonl"))
    assert log_stats.main(["--logdir", str(tmp_path), "--steps", "21", "--log-every", "10"]) == 0
    rows = [json.loads(s) for s in (tmp_path / "stats.jsonl").read_text().splitlines()]
    tags = {r["tag"] for r in rows}
    assert {"loss", "damping", "kl_clip/factor", "0/grad_norm", "2/G_eig_max",
            "0/update_norm"} <= tags
    damp = [r["value"] for r in rows if r["tag"] == "damping"]
    assert damp[0] > damp[-1]                  # the schedule through param_groups took effect
    loss = [r["value"] for r in rows if r["tag"] == "loss"]
    assert loss[-1] < loss[0]

"""benchmarks/optim_step_time.py as a smoke test: the tiny parameter set, one round, every
eager variant (heavyball's when installed), the results page written with its ratio lines."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import optim_step_time
    yield optim_step_time
    sys.modules.pop("optim_step_time", None)


def test_optim_step_time_smoke(bench, tmp_path):
    import _optim_bench as B
    names = ["kk-soap", "kk-shampoo", "kk-soap-looped", "kk-shampoo-looped", "kk-muon",
             "kk-muon-looped", "torch-muon"]
    hb = B.heavyball_module()
    if hb is not None:
        names.append("heavyball-soap")
        mode_before = hb.utils.compile_mode
    out = tmp_path / "r.md"
    assert bench.main(["--cases", "tiny", "--optimizers", ",".join(names), "--period", "3",
                       "--rounds", "1", "--threads", "1", "--out", str(out)]) == 0
    text = out.read_text()
    for n in names:
        assert f"| {n} | " in text and "failed" not in text
    assert "looped time / batched time = soap" in text and "shampoo" in text
    assert "muon" in text.split("looped time / batched time")[1].splitlines()[0]
    assert "time / torch-muon's time = kk-muon" in text
    if hb is not None:
        assert hb.utils.compile_mode == mode_before       # the benchmark restores heavyball's global


def test_params_feed_reattaches_grads():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import _optim_bench as B
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    p = B.make_params("tiny")
    assert [tuple(x.shape) for x in p] == [tuple(s) for s in B.param_shapes("tiny")]
    for x in p:
        x.grad = None
    p.feed()
    assert all(x.grad is g for x, g in zip(p, p.grads))

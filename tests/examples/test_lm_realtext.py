"""Smoke test of the real-text benchmark (kfac_kernels/examples/lm_realtext.py) and unit tests of
its parsing and time-to-target arithmetic."""
import json
import math
import os

import pytest

from kfac_kernels.examples import lm_realtext as lm


def test_quick_run_writes_results(tmp_path):
    md = lm.main(["--quick", "--out", str(tmp_path), "--name", "q"])
    for label in ("AdamW", "SOAP", "Shampoo", "K-FAC", "KFACPre+AdamW", "K-FAC recipe"):
        assert f"| {label} |" in md
    data = json.load(open(os.path.join(tmp_path, "q.json")))
    for run in data["runs"]:
        assert len(run["step"]) == 8 and all(math.isfinite(v) for v in run["val_loss"])
        assert run["val_loss"][-1] < run["val_loss"][0], run["label"]   # 8 steps from init
        assert run["eval_time"] == sorted(run["eval_time"])
    assert all(v and v > 0 for v in data["aten_per_step"].values())
    assert os.path.exists(os.path.join(tmp_path, "q.md"))


def test_subcommand_is_reachable(tmp_path):
    from kfac_kernels.__main__ import main
    assert main(["lm-realtext", "--quick", "--out", str(tmp_path), "--name", "s",
                 "--opt", "adamw:lr=3e-3,label=A", "--aten-steps", "0"]) == 0
    assert os.path.exists(os.path.join(tmp_path, "s.md"))


def test_spec_parsing():
    fam, kw = lm.parse_spec("kfac:lr=3,damping=1.0/T,skip=tok|pos,only=head,kl_clip=None,"
                            "curvature=fisher", 128)
    assert fam == "kfac"
    assert kw == {"lr": 3, "damping": 1.0 / 128, "skip": ["tok", "pos"], "only": ["head"],
                  "kl_clip": None, "curvature": "fisher"}
    with pytest.raises(ValueError, match="key=value"):
        lm.parse_spec("adamw:lr", 8)


def test_time_to_target():
    h = {"val_loss": [5.0, 3.0, 2.0, 1.5], "eval_time": [0.0, 1.0, 2.5, 4.0],
         "eval_step": [0, 10, 20, 30]}
    assert lm.first_reach(h, 2.0) == 2.5
    assert lm.first_reach(h, 2.0, "eval_step") == 20
    assert lm.first_reach(h, 1.0) is None
    assert lm.value_at(h, 3.0) == 2.0 and lm.value_at(h, 4.0) == 1.5


def test_stdlib_text_is_deterministic_prefix():
    a, b = lm.stdlib_text(0.05), lm.stdlib_text(0.1)
    assert len(a) == 50_000 and b[:50_000] == a


def test_resnet_bn_quick(tmp_path):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "resnet_bn.py")
    spec = importlib.util.spec_from_file_location("resnet_bn", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    md = mod.main(["--quick", "--out", str(tmp_path), "--name", "r"])
    for label in ("SGD-momentum lr 0.05", "AdamW lr 3e-3", "K-FAC (issue 23 settings)"):
        assert f"| {label} |" in md
    runs = json.load(open(os.path.join(tmp_path, "r.json")))["runs"]
    assert all(len(r["eval_step"]) == 2 and 0.0 <= min(r["test_acc"]) for r in runs)

"""Smoke test of the language-model examples: a few steps of each optimiser, outputs written."""
import json
import math

import pytest

from kfac_kernels.examples import rnn_lm, transformer_lm


@pytest.mark.parametrize("main,stem,extra", [
    (transformer_lm.main, "transformer_lm", []),
    (rnn_lm.main, "rnn_lm_lstm", ["--cell", "lstm"]),
])
def test_example_runs(tmp_path, main, stem, extra, capsys):
    pytest.importorskip("matplotlib", reason="the examples plot with matplotlib")
    assert main(["--steps", "4", "--eval-every", "2", "--batch", "4", "--train-problems", "200",
                 "--val-problems", "20", "--out", str(tmp_path)] + extra) == 0
    out = capsys.readouterr().out
    assert "fallback parameters: none" in out              # every weight in a block
    runs = json.load(open(tmp_path / f"{stem}.json"))["runs"]
    assert [r["name"] for r in runs] == ["K-FAC", "AdamW"]
    for r in runs:
        assert len(r["train_loss"]) == 4 and all(math.isfinite(v) for v in r["train_loss"])
        assert math.isfinite(r["val_loss"][-1])
    assert (tmp_path / f"{stem}.png").stat().st_size > 1000
    assert "| K-FAC | 4 |" in (tmp_path / f"{stem}.md").read_text()
    assert "val loss @ step 2" in (tmp_path / f"{stem}.md").read_text()

"""The demo (`python -m kfac_kernels demo`) in --quick mode, in-process, plus its import hygiene."""
import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import kfac_kernels.demo as demo  # noqa: E402

MODELS = ("autoencoder", "cnn")
LABELS = {"kfac": "K-FAC", "adam": "Adam", "sgd": "SGD+momentum"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import io
    from contextlib import redirect_stderr, redirect_stdout
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        rc = demo.main(["--quick", "--out", str(out), "--seed", "0"])
    with open(out / "results.json") as fh:
        results = json.load(fh)
    return dict(rc=rc, out=out, stdout=stdout.getvalue(), stderr=stderr.getvalue(),
                results=results)


def _runs(results, model):
    return {r["optimizer"]: r for r in results["runs"] if r["task"] == model}


def test_quick_demo_exit_code_and_files(quick):
    assert quick["rc"] == 0, quick["stderr"][-2000:]
    for name in ("results.md", "results.json", "demo_loss_curves.png"):
        assert (quick["out"] / name).is_file(), name


def test_table_has_every_model_and_optimiser_with_finite_numbers(quick):
    text = quick["stdout"]
    md = (quick["out"] / "results.md").read_text()
    for model in MODELS:
        runs = _runs(quick["results"], model)
        assert set(runs) == set(LABELS), (model, sorted(runs))
        for opt, r in runs.items():
            f = r["final"]
            for key in ("train_loss", "test_loss", "test_metric", "seconds"):
                assert f[key] is not None and math.isfinite(f[key]), (model, opt, key, f[key])
            assert f["steps"] == demo.QUICK_STEPS
            assert r["ms_per_step"] > 0 and math.isfinite(r["ms_per_step"])
            assert r["diverged_at"] is None
    # the printed table and the markdown one: one row per (model, optimiser), numbers in them
    tables = text.split("\n\n")
    for model, caption in (("autoencoder", "deep autoencoder"), ("cnn", "CNN classifier")):
        block = next(b for b in tables if b.startswith(caption))
        rows = [ln for ln in block.splitlines()[3:] if not ln.startswith("settings:")]
        assert [r.split("  ")[0].strip() for r in rows] == [LABELS[o] for o in LABELS]
        for row in rows:
            nums = [float(c.rstrip("%")) for c in row.split()[-3:]]   # train, test, metric
            assert all(math.isfinite(v) for v in nums), row
    for label in LABELS.values():
        assert md.count(f"| {label} |") == len(MODELS)


def test_png_is_a_valid_png(quick):
    data = (quick["out"] / "demo_loss_curves.png").read_bytes()
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    width, height = struct.unpack(">II", data[16:24])
    assert kind == b"IHDR" and length == 13 and width > 300 and height > 300
    assert data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND"
    import matplotlib.image
    img = matplotlib.image.imread(str(quick["out"] / "demo_loss_curves.png"))
    assert img.shape[:2] == (height, width)
    assert img[..., :3].std() > 0.05          # not a blank canvas


def test_kfac_loss_decreased(quick):
    for model in MODELS:
        k = _runs(quick["results"], model)["kfac"]
        first, last = k["train_loss"][0], k["train_loss"][-1]
        assert last < 0.8 * first, (model, first, last)


def test_same_initial_weights_for_every_optimiser(quick):
    for model in MODELS:
        starts = {o: r["train_loss"][0] for o, r in _runs(quick["results"], model).items()}
        assert len(set(starts.values())) == 1, (model, starts)


def test_batch_schedule_is_seeded_and_covers_each_epoch():
    from kfac_kernels.demo.train import batch_schedule
    a = batch_schedule(100, 32, 7, seed=3)
    b = batch_schedule(100, 32, 7, seed=3)
    c = batch_schedule(100, 32, 7, seed=4)
    assert a.shape == (7, 32) and bool((a == b).all()) and not bool((a == c).all())
    for epoch in (a[0:3], a[3:6]):            # 3 batches per epoch, no repeats within one
        assert epoch.flatten().unique().numel() == 96
    assert batch_schedule(100, 0, 5, seed=0) is None        # full batch
    assert batch_schedule(100, 100, 5, seed=0) is None


def test_import_kfac_kernels_does_not_import_demo_dependencies():
    # torch itself may import tqdm (torch.hub does, when tqdm is installed): what counts is what
    # importing kfac_kernels (and the demo package, before it runs) adds on top of torch
    code = ("import sys, torch\n"
            "before = set(sys.modules)\n"
            "import kfac_kernels, kfac_kernels.optimizer, kfac_kernels.demo\n"
            "added = {m.split('.')[0] for m in set(sys.modules) - before}\n"
            "heavy = sorted(added & {'sklearn', 'matplotlib', 'tqdm', 'scipy'})\n"
            "assert not heavy, heavy\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] +
        [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def test_missing_dependencies_are_named_with_the_pip_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(demo, "missing_dependencies", lambda: ["matplotlib", "tqdm"])
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "pip install 'kfac_kernels[demo]'" in err and "pip install matplotlib tqdm" in err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("argv", [["--optimizers", "lbfgs"], ["--steps", "0"],
                                  ["--batch-size", "-1"], ["--set", "kfac.dampin=0.1"],
                                  ["--set", "kfac-damping=0.1"], ["--set", "lbfgs.lr=1"]])
def test_bad_arguments_are_refused(argv, capsys, tmp_path):
    assert demo.main(argv + ["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err


def test_tune_keeps_the_best_value_and_runs_the_demo_with_it(monkeypatch, tmp_path, capsys):
    from kfac_kernels.demo import settings
    monkeypatch.setattr(settings, "GRIDS", dict(settings.GRIDS, adam=[dict(lr=3.0), dict(lr=1e-2)]))
    rc = demo.main(["--quick", "--tune", "--models", "autoencoder", "--optimizers", "adam",
                    "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    with open(tmp_path / "results.json") as fh:
        results = json.load(fh)
    sweep = results["meta"]["tuning"]["autoencoder"]["adam"]
    assert [s["lr"] for s in sweep] == [3.0, 1e-2]
    assert sweep[1]["score"] < sweep[0]["score"]           # lr=3 wrecks a tanh autoencoder
    (run,) = results["runs"]
    assert run["settings"] == "lr=0.01"
    assert "step-size sweeps (--tune)" in (tmp_path / "results.md").read_text()
    assert "*lr=0.01" in capsys.readouterr().out.replace(" ", "")


def test_default_run_keeps_its_three_optimisers():
    from kfac_kernels.demo import settings
    assert settings.OPTIMIZERS == ("kfac", "adam", "sgd")
    assert demo._parser().parse_args([]).optimizers == "kfac,adam,sgd"
    assert set(settings.CHOICES) == {"kfac", "adam", "sgd", "soap", "shampoo", "muon"}
    for task in settings.DEFAULTS.values():          # every choice has defaults and a --tune grid
        assert set(task) == set(settings.CHOICES)
    assert set(settings.GRIDS) == set(settings.CHOICES)


def test_quick_demo_with_soap_and_shampoo(tmp_path):
    """--optimizers kfac,adam,sgd,soap,shampoo: kfac_kernels.optim's SOAP and Shampoo run beside
    the three defaults (quick mode, both models), finite, from the same initial weights, and their
    losses go down; --set reaches their constructors."""
    import io
    from contextlib import redirect_stderr, redirect_stdout
    with redirect_stdout(io.StringIO()) as out, redirect_stderr(io.StringIO()) as err:
        rc = demo.main(["--quick", "--optimizers", "kfac,adam,sgd,soap,shampoo", "--out",
                        str(tmp_path), "--no-progress", "--set", "shampoo.epsilon=1e-6"])
    assert rc == 0, err.getvalue()[-2000:]
    with open(tmp_path / "results.json") as fh:
        results = json.load(fh)
    md = (tmp_path / "results.md").read_text()
    for model in MODELS:
        runs = _runs(results, model)
        assert list(runs) == ["kfac", "adam", "sgd", "soap", "shampoo"]
        assert len({r["train_loss"][0] for r in runs.values()}) == 1
        for opt in ("soap", "shampoo"):
            r = runs[opt]
            assert r["final"]["steps"] == demo.QUICK_STEPS and r["diverged_at"] is None
            assert all(math.isfinite(v) for v in r["train_loss"])
            assert r["train_loss"][-1] < r["train_loss"][0], (model, opt, r["train_loss"])
        assert "epsilon=1e-06" in runs["shampoo"]["settings"]
    assert md.count("| SOAP |") == len(MODELS) and md.count("| Shampoo |") == len(MODELS)
    assert "SOAP" in out.getvalue() and "Shampoo" in out.getvalue()


def test_quick_demo_with_muon(tmp_path):
    """--optimizers adam,muon: kfac_kernels.optim.Muon on the hidden Linear weights with its AdamW
    group for the rest (both models), finite, losses going down; --set reaches Muon and its
    AdamW group (adamw_lr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()) as err:
        rc = demo.main(["--quick", "--optimizers", "adam,muon", "--out", str(tmp_path),
                        "--no-progress", "--set", "muon.adamw_lr=0.002",
                        "--set", "muon.ns_steps=4"])
    assert rc == 0, err.getvalue()[-2000:]
    with open(tmp_path / "results.json") as fh:
        results = json.load(fh)
    for model in MODELS:
        r = _runs(results, model)["muon"]
        assert r["final"]["steps"] == demo.QUICK_STEPS and r["diverged_at"] is None
        assert all(math.isfinite(v) for v in r["train_loss"])
        assert r["train_loss"][-1] < r["train_loss"][0], (model, r["train_loss"])
        assert "adamw_lr=0.002" in r["settings"] and "ns_steps=4" in r["settings"]
    assert (tmp_path / "results.md").read_text().count("| Muon |") == len(MODELS)


def test_muon_demo_groups():
    """The demo's Muon: hidden Linear weights in Muon, everything else in the AdamW group."""
    from kfac_kernels.demo import models
    from kfac_kernels.demo.train import make_muon
    from torch import nn
    for name in MODELS:
        model = models.build(name, 0)
        opt = make_muon(model, 0.03, adamw_lr=3e-3)
        muon, rest = opt.param_groups
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert [id(p) for p in muon["params"]] == [id(m.weight) for m in linears[:-1]]
        assert rest["use_muon"] is False and rest["lr"] == 3e-3
        assert len(muon["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_unknown_soap_setting_is_refused(capsys, tmp_path):
    assert demo.main(["--quick", "--optimizers", "soap", "--set", "soap.momentum=0.9",
                      "--out", str(tmp_path)]) == 2
    assert "soap.momentum" in capsys.readouterr().err


def test_set_overrides_are_parsed():
    got = demo.parse_overrides(["kfac.damping=0.1", "kfac.kl_clip=none", "kfac.curvature=ggn",
                                "kfac.inverse_every=1", "adam.lr=1e-3", "adam.amsgrad=true",
                                "kfac.factor_storage_dtype=bfloat16"])
    assert got == {"kfac": {"damping": 0.1, "kl_clip": None, "curvature": "ggn",
                            "inverse_every": 1, "factor_storage_dtype": torch.bfloat16},
                   "adam": {"lr": 1e-3, "amsgrad": True}}
    assert isinstance(got["kfac"]["inverse_every"], int)


def test_plot_legend_explains_the_line_styles(tmp_path, monkeypatch):
    """The dashed (test loss) and dotted (thresholds) lines are named in every legend."""
    import matplotlib.figure
    from kfac_kernels.demo import report
    from kfac_kernels.demo.train import Run, Task
    task = Task("autoencoder", "AE", "gaussian", "loss", "mse", False, 0, 3, (2.0, 1.0))
    run = Run("autoencoder", "kfac", "K-FAC", "", steps=[0, 1, 2], seconds=[0.0, 0.1, 0.2],
              train_loss=[3.0, 2.0, 1.0], test_loss=[3.1, 2.2, 1.3], test_metric=[0, 0, 0])
    legends = []
    real = matplotlib.figure.Figure.savefig

    def grab(fig, *a, **k):
        legends.extend([[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes])
        return real(fig, *a, **k)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", grab)
    report.plot(str(tmp_path / "p.png"), [task], {"autoencoder": [run]}, "sub")
    steps_panel, time_panel = legends
    assert "test loss (dashed)" in steps_panel and "K-FAC (train)" in steps_panel
    assert all("thresholds" in " ".join(lg) for lg in legends)
    assert "test loss (dashed)" not in time_panel

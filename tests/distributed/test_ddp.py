"""Distributed K-FAC (issue 6): 2, 3 and 4 gloo ranks on CPU against the single-process run on the
concatenated batch, checkpoints, error paths, and the pure helpers (packing, assignment, grid).

The multi-process runs go through tests/_support/dist_harness.py: ranks are forked from a
forkserver that has imported torch once, rendezvous through a file store, and every run has a hard
timeout (a hang fails the test instead of blocking CI). Each world size is spawned once for the whole matrix of
configurations (a module-scoped fixture); the tests then check one configuration each.
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch

import kfac_kernels as kk
from kfac_kernels import distributed as kd

import dist_scenarios as S
from dist_harness import run_ranks, run_ranks_raw

# float64 throughout: the distributed run and the single-process run differ only in the order of
# floating-point sums, so they agree to ~1e-13 after several steps (the issue asks <= 1e-6).
TOL = 1e-9


def _matrix(world):
    fracs = [1.0, 1.0 / world] if world < 4 else [1.0, 0.5, 0.25]
    cfgs = []
    for i, (curv, frac, assign) in enumerate(itertools.product(
            ("empirical", "ggn"), fracs, kd.ASSIGNMENTS)):
        for inverse in ("eigh", "cholesky"):
            if world > 2 and (i + (inverse == "cholesky")) % 2:   # halve the matrix beyond 2
                continue
            cfgs.append(dict(name=f"{curv}-{inverse}-f{frac:.2f}-{assign}", curvature=curv,
                             inverse=inverse, frac=frac, assign=assign))
    return cfgs


SPECIAL = {
    2: [dict(name="ddp-empirical-eigh-f1", curvature="empirical", inverse="eigh", ddp=True),
        dict(name="mixed-ggn-cholesky-f0.5", curvature="ggn", inverse="cholesky", frac=0.5,
             model="mixed"),
        # EKFAC: scalings reduced per step and restarted from this step's passes in a new basis.
        # More examples than any factor's dimension: in a rank-deficient factor's null space
        # the eigenbasis is arbitrary, and EKFAC's scalings (unlike K-FAC's) depend on it, so
        # runs whose sums round differently would legitimately differ there.
        dict(name="mixed-ggn-ekfac-f1", curvature="ggn", inverse="ekfac", model="mixed",
             sizes=[48, 48]),
        dict(name="ekfac-empirical-f1-sum", curvature="empirical", inverse="ekfac", red="sum",
             lr=0.001, sizes=[23, 34]),
        dict(name="ddp-ggn-cholesky-f0.5", curvature="ggn", inverse="cholesky", frac=0.5,
             assign="memory", ddp=True),
        dict(name="pre-empirical-eigh-f1", curvature="empirical", inverse="eigh", kind="pre"),
        dict(name="pre-ggn-cholesky-f0.5", curvature="ggn", inverse="cholesky", frac=0.5,
             kind="pre", kl=1e-4),
        dict(name="sum-ggn-eigh-f0.5", curvature="ggn", inverse="eigh", frac=0.5, red="sum",
             lr=0.005),
        dict(name="sum-empirical-cholesky-f1", curvature="empirical", inverse="cholesky",
             red="sum", lr=0.005),
        dict(name="unequal-empirical-eigh-f1", curvature="empirical", inverse="eigh",
             sizes=[3, 9]),
        dict(name="unequal-ggn-cholesky-f0.5", curvature="ggn", inverse="cholesky", frac=0.5,
             sizes=[7, 2]),
        dict(name="klclip-empirical-eigh-f0.5", curvature="empirical", inverse="eigh", frac=0.5,
             kl=1e-5),
        dict(name="every-ggn-eigh-f1", curvature="ggn", inverse="eigh", fe=2, inv=3, steps=7),
        # warm-started eigenbasis refresh between full decompositions, on each owner's share
        dict(name="refresh-ggn-eigh-f0.5", curvature="ggn", inverse="eigh", frac=0.5,
             full_every=3, inv=1, steps=5),
        dict(name="refresh-empirical-eigh-f1", curvature="empirical", inverse="eigh",
             full_every=2, inv=1, steps=5),
        # two forward/backward passes per step: the A reduction launched in the first backward
        # pass misses the second pass's inputs and must be redone in step()
        dict(name="accumulate-empirical-eigh-f0.5", curvature="empirical", inverse="eigh",
             frac=0.5, accum=2),
        # factor sides over max_factor_dim kept diagonal (vectors in the flat buffers, lamA /
        # lamG without an eigenbasis shared between ranks)
        dict(name="diag-ggn-eigh-f0.5", curvature="ggn", inverse="eigh", frac=0.5,
             model="wide", maxdim=24),
        dict(name="diag-empirical-cholesky-f1", curvature="empirical", inverse="cholesky",
             model="wide", maxdim=24)],
    3: [dict(name="unequal-empirical-eigh-f1", curvature="empirical", inverse="eigh",
             sizes=[2, 5, 4]),
        # every block family: stacked (grouped conv, GroupNorm, LayerNorm), diagonal A (embedding)
        dict(name="mixed-empirical-eigh-f1", curvature="empirical", inverse="eigh",
             model="mixed"),
        dict(name="mixed-ggn-cholesky-f0.33", curvature="ggn", inverse="cholesky", frac=1 / 3,
             model="mixed", assign="memory"),
        dict(name="mixed-empirical-eigh-f0.33-ddp", curvature="empirical", inverse="eigh",
             frac=1 / 3, model="mixed", ddp=True),
        dict(name="mixed-empirical-ekfac-f1-ddp", curvature="empirical", inverse="ekfac",
             model="mixed", ddp=True, inv=3, steps=5, sizes=[32, 32, 32]),
        dict(name="unequal-ggn-cholesky-f0.33", curvature="ggn", inverse="cholesky",
             frac=1 / 3, sizes=[4, 1, 6], assign="memory"),
        dict(name="ddp-ggn-eigh-f0.33", curvature="ggn", inverse="eigh", frac=1 / 3, ddp=True),
        # gradient accumulation under DDP's no_sync (3 micro-batches, the last one uneven)
        dict(name="nosync-ggn-eigh-f0.33-ddp", curvature="ggn", inverse="eigh", frac=1 / 3,
             model="mixed", ddp=True, no_sync=True, accum=3, sizes=[8, 8, 8])],
    4: [dict(name="ddp-empirical-cholesky-f0.5", curvature="empirical", inverse="cholesky",
             frac=0.5, ddp=True)],
}


def configs(world):
    return _matrix(world) + SPECIAL[world]


_RESULTS = {}


def results(world):
    """Run the whole matrix once per world size (the first test that needs it pays)."""
    if world not in _RESULTS:
        try:
            _RESULTS[world] = run_ranks(S.equivalence, world, configs(world), timeout=150)
        except Exception as exc:   # every test of this world size reports the same failure
            _RESULTS[world] = exc
    res = _RESULTS[world]
    if isinstance(res, Exception):
        raise res
    return res


CASES = [(w, c["name"]) for w in (2, 3, 4) for c in configs(w)]
BLOCKS = {"mlp": ["0", "3", "5"], "mixed": ["conv", "emb", "fc", "gn", "ln", "out"],
          "wide": ["1", "3", "5"]}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world,name", CASES, ids=[f"w{w}-{n}" for w, n in CASES])
def test_matches_single_process_on_concatenated_batch(world, name):
    per_rank = [r[name] for r in results(world)]
    for r, res in enumerate(per_rank):
        assert res["err"] <= TOL, (r, res["err"])
        assert res["factor_err"] <= TOL, (r, res["factor_err"])
        assert res["moved"] > 1e-3, "the run must actually train for the comparison to mean much"
        cfg = next(c for c in configs(world) if c["name"] == name)
        assert res["blocks"] == BLOCKS[cfg.get("model", "mlp")]   # DDP: no "module." prefix
        if cfg.get("maxdim"):                 # 1: A 33, 3: G 30, 5: A 31 kept diagonal
            assert res["describe"].count("(diagonal)") == 3, res["describe"]
    for res in per_rank[1:]:                                # ranks hold bit-identical parameters
        assert all(torch.equal(a, b) for a, b in zip(res["params"], per_rank[0]["params"]))


@pytest.mark.timeout(200)
def test_communication_follows_the_gradient_worker_fraction():
    """fraction 1: decompositions are broadcast, no per-step traffic; fraction 1/world: no
    decomposition moves, preconditioned gradients are broadcast every step."""
    res = results(2)[0]
    full = res["empirical-eigh-f1.00-compute"]["comm"]
    half = res["empirical-eigh-f0.50-compute"]["comm"]
    assert full["inverse"] > 0 and "precondition" not in full
    assert half["precondition"] > 0 and "inverse" not in half
    assert full["factor"] == half["factor"] > 0
    assert "grad_worker_fraction=0.5" in res["empirical-eigh-f0.50-compute"]["describe"]
    # the counters' former name (opt.engine.dist.comm) still reads them
    assert res["empirical-eigh-f1.00-compute"]["comm_alias"]


@pytest.mark.timeout(60)
def test_average_helper_for_further_statistics():
    assert all(e <= 1e-14 for e in run_ranks(S.average_helper, 3, timeout=60))


@pytest.mark.timeout(60)
def test_a_given_process_group_is_used():
    cfgs = [dict(name="f1", curvature="ggn", inverse="eigh"),
            dict(name="f0.5", curvature="empirical", inverse="cholesky", frac=0.5, ddp=True)]
    res = run_ranks(S.subgroup, 3, cfgs, timeout=60)
    assert res[0] is None
    for name in ("f1", "f0.5"):
        for r in res[1:]:
            assert r[name]["err"] <= TOL and r[name]["factor_err"] <= TOL
            assert "world 2" in r[name]["describe"]
        assert all(torch.equal(a, b) for a, b in zip(res[1][name]["params"],
                                                      res[2][name]["params"]))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("frac", [1.0, 0.5])
def test_fisher_factors_are_the_weighted_average_of_per_rank_draws(frac):
    """Ranks draw their own Fisher samples (seed sampling_seed(seed, rank, step)): the averaged
    factors equal the example-weighted mean of single-process estimates on each shard with those
    seeds, and differ between ranks' draws."""
    sizes = [5, 3]
    res = run_ranks(S.fisher_factors, 2, sizes, 7, frac, timeout=60)
    for r in res:
        assert r["err"] <= 1e-12
    assert all(torch.equal(a, b) for a, b in zip(res[0]["G"], res[1]["G"]))
    assert kd.sampling_seed(7, 0, 0) != kd.sampling_seed(7, 1, 0)
    assert kd.sampling_seed(7, 0, 0) != kd.sampling_seed(7, 0, 1)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world,frac,inverse,model", [
    (2, 1.0, "eigh", "mlp"), (2, 0.5, "cholesky", "mlp"), (3, 1 / 3, "eigh", "mlp"),
    (2, 0.5, "eigh", "mixed")])
def test_checkpoint_saved_on_rank0_resumes_every_rank_identically(tmp_path, world, frac, inverse,
                                                                   model):
    cfg = dict(curvature="fisher", inverse=inverse, frac=frac, seed=11, kl=1e-3, inv=2,
               model=model)
    res = run_ranks(S.checkpoint, world, cfg, str(tmp_path / "ckpt.pt"), timeout=90)
    for r, out in enumerate(res):
        assert out["same"], f"rank {r}: resumed run differs from the uninterrupted one"
        assert out["single_complete"]       # loads into one process with every decomposition
        assert all(torch.equal(a, b) for a, b in zip(out["params"], res[0]["params"]))
    if frac < 1:     # one holder per block (k = 1): the ranks' shares partition the blocks
        assert "consolidate_state_dict" in res[0]["refused"]
        assert sum(o["held"] for o in res) == res[0]["blocks"]
        assert max(o["held"] for o in res) < res[0]["blocks"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("frac,kind", [(1.0, "mlp"), (0.5, "mlp"), (0.5, "mixed")])
def test_factor_step_has_no_host_sync(frac, kind):
    assert run_ranks(S.no_host_sync, 2, frac, kind, timeout=60) == [2, 2]


@pytest.mark.timeout(60)
def test_nonfinite_statistics_on_one_rank_are_rejected_on_every_rank():
    res = run_ranks(S.nonfinite, 2, timeout=60)
    for out in res:
        assert out["unchanged"] and out["warned"]
        assert out["counts"] == [1.0, 1.0, 1.0] and out["skipped"] == [1, 1, 1]


def _errors(outcomes):
    assert all(o[0] == "error" for o in outcomes), outcomes
    return [(o[1], o[2]) for o in outcomes]


@pytest.mark.timeout(60)
def test_mismatched_models_raise_on_every_rank_instead_of_hanging():
    for t, msg in _errors(run_ranks_raw(S.mismatched_model, 3, timeout=60)):
        assert t == "MismatchError"
        assert "rank 0 has \"block '3': Linear grad (6, 49)" in msg and "rank 2 has" in msg
        assert "(7, 49)" in msg
    for t, msg in _errors(run_ranks_raw(S.mismatched_options, 2, timeout=60)):
        assert t == "MismatchError" and "inverse_every=10" in msg and "inverse_every=11" in msg
    for t, msg in _errors(run_ranks_raw(S.mismatched_warmup, 2, timeout=60)):
        assert t == "MismatchError" and "inverse_warmup=False" in msg and "inverse_warmup=True" in msg
    for t, msg in _errors(run_ranks_raw(S.mismatched_skip_nonfinite, 2, timeout=60)):
        assert (t == "MismatchError" and "skip_nonfinite=True" in msg
                and "skip_nonfinite=False" in msg)
    for t, msg in _errors(run_ranks_raw(S.mismatched_fraction, 4, timeout=60)):
        assert t == "MismatchError" and "grad_worker_fraction=1.0" in msg


@pytest.mark.timeout(60)
def test_layers_used_on_some_ranks_only_raise_at_the_next_inverse_update():
    res = run_ranks(S.layer_use_mismatch, 2, timeout=60)
    for out in res:
        assert out["step"] == 2
        assert "['extra']" in out["message"] and "same layers" in out["message"]


@pytest.mark.timeout(60)
def test_gradient_worker_count_must_divide_the_world():
    for t, msg in _errors(run_ranks_raw(S.bad_fraction, 3, 0.5, timeout=60)):
        assert t == "ValueError" and "does not divide the world size 3" in msg


@pytest.mark.timeout(60)
def test_ekfac_needs_every_eigenbasis_on_every_rank():
    for t, msg in _errors(run_ranks_raw(S.bad_fraction, 2, 0.5, "ekfac", timeout=60)):
        assert t == "NotImplementedError" and "needs grad_worker_fraction=1" in msg


@pytest.mark.timeout(120)
def test_torchrun_example_runs_on_cpu(tmp_path):
    """The command docs/distributed.md gives, as written (2 CPU processes, gloo)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kfac_kernels.examples.ddp", "--steps", "12", "--log-every", "4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-12000:]
    assert "ranks agree" in proc.stdout, proc.stdout
    line = [s for s in proc.stdout.splitlines() if s.startswith("test loss ") and "->" in s][-1]
    before, after = (float(v) for v in line.split()[2::2])
    assert after < 0.8 * before, line            # it learns, not only agrees


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_torchrun_example_on_two_gpus_with_nccl(tmp_path):
    """The same command picks NCCL and one GPU per process where two GPUs are present."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, found {torch.cuda.device_count()}")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for frac in ("1", "0.5"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "kfac_kernels.examples.ddp", "--steps", "30",
               "--fraction", frac]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=280)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-12000:]
        assert "nccl" in proc.stdout and "ranks agree" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------- single process
def test_single_process_has_no_strategy_and_no_collectives(monkeypatch):
    import torch.distributed as dist

    def boom(*a, **k):
        raise AssertionError("collective in a single process")
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_object", "send", "recv"):
        monkeypatch.setattr(dist, name, boom)
    model = S.make_model()
    opt = kk.KFAC(model, curvature="ggn", likelihood="categorical", inverse_every=1)
    assert opt.engine.dist is None
    x, y = S.global_batch(0, 6)
    for _ in range(2):
        out = model(x)
        opt.zero_grad()
        opt.backward(torch.nn.functional.cross_entropy(out, y), out)
        opt.step()
    assert "distributed" not in opt.state_dict()["kfac"]


def test_distributed_options_are_checked_without_torch_distributed():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        kk.KFAC(S.make_model(), distributed=True)
    with pytest.raises(ValueError, match="grad_worker_fraction must be"):
        kk.KFAC(S.make_model(), grad_worker_fraction=0)
    with pytest.raises(ValueError, match="unknown assignment 'fastest'"):
        kk.KFACPreconditioner(S.make_model(), assignment="fastest")
    with pytest.raises(ValueError, match="bucket_cap_mb must be"):
        kk.KFAC(S.make_model(), bucket_cap_mb=0)
    assert kk.KFAC(S.make_model(), distributed=False).engine.dist is None


@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_triangle_pack_round_trip(n):
    F = torch.randn(3, n, n, dtype=torch.float64)
    F = F + F.transpose(1, 2)
    v = kd.pack_triu(F)
    assert v.shape == (3, n * (n + 1) // 2)
    assert torch.equal(kd.unpack_triu(v, n), F)
    out = torch.empty(n * (n + 1) // 2, dtype=torch.float64)
    kd.pack_triu(F[1], out=out)
    assert torch.equal(out, v[1])


def test_greedy_assignment_is_largest_first_and_balanced():
    costs = [7.0, 5.0, 4.0, 4.0, 3.0, 3.0, 1.0]
    owners = kd.greedy_assignment(costs, 3)
    assert owners == [0, 1, 2, 2, 1, 0, 1]       # LPT by hand: loads 10, 9, 8
    loads = [sum(c for c, o in zip(costs, owners) if o == w) for w in range(3)]
    assert max(loads) - min(loads) <= max(costs)
    assert kd.greedy_assignment(costs, 3) == owners          # deterministic: no communication
    assert kd.greedy_assignment([], 4) == []
    assert kd.greedy_assignment([1.0] * 5, 1) == [0] * 5


@pytest.mark.parametrize("world,frac,grid", [(1, 1.0, (1, 1)), (4, 1.0, (4, 1)),
                                             (4, 0.25, (1, 4)), (4, 0.5, (2, 2)),
                                             (6, 1 / 3, (2, 3)), (8, 0.1, (1, 8))])
def test_worker_grid(world, frac, grid):
    assert kd.worker_grid(world, frac) == grid


def test_ddp_wrapper_is_unwrapped_for_block_names():
    model = S.make_model()
    assert kd.unwrap_model(model) is model

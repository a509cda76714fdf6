"""K-FAC on FSDP2 (fully_shard) and HSDP models, on 2 and 4 local gloo ranks (CPU).

Every rank trains its shard of a global batch with the model sharded by ``fully_shard``; the
parameters (``full_tensor()``) must equal a single process trained on the concatenated batch in
float64, the replicated K-FAC state must be bit-identical across ranks, and so must the shards
HSDP replicates. The scenarios run inside the ranks (tests/_support/fsdp_scenarios.py)."""
import os
import subprocess
import sys

import pytest
import torch

from dist_harness import run_ranks, run_ranks_raw
import fsdp_scenarios as FS

pytest.importorskip("torch.distributed.fsdp", reason="needs torch.distributed (FSDP2)")

TOL = 1e-9


def _configs(world):
    if world == 2:
        cfgs = [dict(name=f"{c}-{i}", curvature=c, inverse=i, inv=1 if i == "ekfac" else 2)
                for i in ("eigh", "cholesky", "ekfac") for c in ("empirical", "ggn")]
        cfgs += [
            # only the root is sharded (one FSDP group holds every layer)
            dict(name="root-only-mlp", curvature="ggn", inverse="eigh", model="mlp",
                 shard="root"),
            # two layers sharded, the others plain tensors (their gradients averaged by hand)
            dict(name="partly-sharded", curvature="empirical", inverse="eigh", shard="layers"),
            # KFACPreconditioner in front of torch's SGD, with a KL clip
            dict(name="preconditioner", curvature="ggn", inverse="cholesky", kind="pre",
                 kl=1e-4),
            # no weight decay (gradients only are gathered), a KL clip
            dict(name="klclip-nowd", curvature="empirical", inverse="eigh", kl=1e-3, wd=0.0)]
        return cfgs
    return [dict(name="hsdp-ggn-eigh", curvature="ggn", inverse="eigh", hsdp=True),
            dict(name="hsdp-empirical-ekfac", curvature="empirical", inverse="ekfac", inv=1,
                 hsdp=True),
            # 1-D mesh of 4: the 3-channel conv leaves rank 3 an empty shard
            dict(name="w4-empirical-cholesky", curvature="empirical", inverse="cholesky",
                 model="mlp")]


_RESULTS = {}


def results(world):
    if world not in _RESULTS:
        try:
            _RESULTS[world] = run_ranks(FS.equivalence, world, _configs(world), timeout=240)
        except Exception as exc:       # every test of this world size reports the failure
            _RESULTS[world] = exc
    res = _RESULTS[world]
    if isinstance(res, Exception):
        raise res
    return res


CASES = [(w, c["name"]) for w in (2, 4) for c in _configs(w)]


@pytest.mark.timeout(250)
@pytest.mark.parametrize("world,name", CASES, ids=[f"w{w}-{n}" for w, n in CASES])
def test_matches_single_process_on_concatenated_batch(world, name):
    per_rank = [r[name] for r in results(world)]
    cfg = next(c for c in _configs(world) if c["name"] == name)
    for r, res in enumerate(per_rank):
        assert res["strategy"] == "FSDPKFAC"
        assert res["dtensors"] > 0
        assert res["err"] <= TOL, (r, res["err"])
        assert res["factor_err"] <= TOL, (r, res["factor_err"])
        assert res["moved"] > 1e-3, "the run must actually train for the comparison to mean much"
        assert res["comm"]["gradient"] > 0 and "precondition" not in res["comm"]
        assert "fsdp:" in res["describe"]
        if cfg.get("kind", "kfac") == "kfac":   # momentum buffers stay sharded like the params
            sharded = {n for n in res["local"]}
            assert sharded and all(res["momentum"][n] == "DTensor" for n in sharded)
    for res in per_rank[1:]:     # the replicated state and the gathered parameters agree exactly
        assert all(torch.equal(a, b) for a, b in zip(res["params"], per_rank[0]["params"]))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(res["factors"], per_rank[0]["factors"]))
    if cfg.get("hsdp"):          # replicas of one shard hold bit-identical shards
        by_coord = {res["coord"]: res["local"] for res in per_rank}
        for s in (0, 1):
            a, b = by_coord[(0, s)], by_coord[(1, s)]
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        assert "Replicate, Shard(0)" in per_rank[0]["describe"]


@pytest.mark.timeout(60)
def test_fisher_equals_the_ddp_strategy_on_the_same_draws():
    """"fisher" draws per rank: the sharded run equals the DDP-style run of the same data and
    seeds (no single process can make those draws)."""
    res = run_ranks(FS.fisher_matches_ddp, 2, dict(curvature="fisher", inverse="eigh", seed=3),
                    timeout=60)
    for r in res:
        assert r["err"] <= TOL and r["moved"] > 1e-3, r


@pytest.mark.timeout(60)
def test_nan_on_one_rank_skips_the_step_on_every_rank():
    res = run_ranks(FS.nonfinite, 2, timeout=60)
    for out in res:
        assert out["unchanged"] and out["skipped"] == 1 and out["warned"]
        assert out["finite"] and out["moved_after"]
    assert all(torch.equal(a, b) for a, b in zip(res[0]["params"], res[1]["params"]))


@pytest.mark.timeout(90)
def test_checkpoint_saved_on_rank0_resumes_bit_identically(tmp_path):
    cfg = dict(curvature="ggn", inverse="eigh", inv=2, kl=1e-3)
    res = run_ranks(FS.checkpoint, 2, cfg, str(tmp_path / "ckpt.pt"), timeout=90)
    for r, out in enumerate(res):
        assert out["same"], f"rank {r}: the resumed run differs from the uninterrupted one"
        assert not out["control_same"], "without the momentum buffers the runs must differ"
        assert "consolidate_state_dict" in out["refused"]
        assert out["state_kinds"] == ["DTensor"]       # loaded back as this rank's shards
        assert out["single_moved"]
    assert all(torch.equal(a, b) for a, b in zip(res[0]["params"], res[1]["params"]))


@pytest.mark.timeout(60)
def test_unsupported_layouts_raise_at_construction_naming_the_alternative():
    for out in run_ranks(FS.refusals, 2, timeout=60):
        t, msg = out["fraction"]
        assert t == "NotImplementedError" and "grad_worker_fraction=1" in msg and "DDP" in msg
        t, msg = out["adaptive"]
        assert t == "NotImplementedError" and "kl_clip" in msg
        t, msg = out["local"]
        assert t == "ValueError" and "drop distributed=False" in msg
        t, msg = out["tp-dim1"]
        assert t == "NotImplementedError" and "Shard(dim=1)" in msg and "tensor parallelism" in msg
        t, msg = out["tp-dim0"]
        assert t == "NotImplementedError" and "no fully_shard module manages it" in msg
        t, msg = out["fsdp1"]
        assert t == "TypeError" and "FullyShardedDataParallel" in msg and "fully_shard" in msg


@pytest.mark.timeout(120)
def test_torchrun_fsdp_example_runs_on_cpu(tmp_path):
    """The command README.md and docs/distributed.md give, as written (2 CPU processes)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kfac_kernels.examples.fsdp", "--steps", "12", "--log-every", "4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-12000:]
    assert "fsdp: 3 of 3 blocks sharded" in proc.stdout, proc.stdout
    assert "checkpoint resumed bit-identically" in proc.stdout, proc.stdout
    # it learns with the DDP example's defaults (momentum 0: 0.9 plateaued, 1.49 against 0.54)
    line = [s for s in proc.stdout.splitlines() if s.startswith("test loss ") and "->" in s][-1]
    before, after = (float(v) for v in line.split()[2::2])
    assert after < 0.8 * before, line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("curvature", ["empirical", "ggn"])
def test_bfloat16_mixed_precision_policy_keeps_float32_factors(curvature):
    for out in run_ranks(FS.mixed_precision, 2, curvature, timeout=60):
        assert out["bf16"]["inputs"] == ["torch.bfloat16"]      # the policy is in effect
        assert out["fp32"]["inputs"] == ["torch.float32"]
        for run in ("fp32", "bf16"):
            assert out[run]["factors"] == {"torch.float32"}
            assert out[run]["params_dtype"] == {"torch.float32"}
            assert out[run]["skipped"] == 0
        # bfloat16 layers move the parameters by about its precision, not more
        assert 1e-5 < out["rel"] < 0.1 and out["moved"] > 0.1, out


@pytest.mark.timeout(60)
def test_a_mesh_over_other_ranks_needs_a_matching_process_group():
    res = run_ranks(FS.mesh_subgroup, 3, timeout=60)
    assert res[2] is None
    for out in res[:2]:
        t, msg = out["refused"]
        assert t == "ValueError" and "ranks [0, 1]" in msg and "process_group=" in msg
        assert out["world"] == 2 and out["updates"] == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("curvature", ["empirical", "fisher"])
def test_factor_step_of_a_sharded_model_has_no_host_sync(curvature):
    assert run_ranks(FS.no_host_sync, 2, curvature, timeout=60) == [2, 2]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("curvature", ["empirical", "fisher"])
def test_autograd_grad_probe_between_steps_changes_nothing(curvature):
    """FSDP2's forward reshards the weight before K-FAC's forward hook runs: the recording check
    must read the weight the call used (capture.py)."""
    assert all(run_ranks(FS.foreign_probe, 2, curvature, timeout=110))

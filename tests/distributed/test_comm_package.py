"""kfac_kernels/comm: one file per part, imports one way, the old import paths still work."""
import ast
import os
import subprocess
import sys

import torch.nn as nn

import kfac_kernels as kk

PKG = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "kfac_kernels",
                                   "comm"))
MODULES = ("base", "factory", "buckets", "assignment", "ddp", "fsdp")


def _relative_imports(name):
    """{sibling module: [names imported from it]} of comm/<name>.py, lazy imports included."""
    with open(os.path.join(PKG, name + ".py")) as f:
        tree = ast.parse(f.read())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.setdefault(node.module, []).extend(a.name for a in node.names)
    return out


def test_imports_form_no_cycle_and_name_nothing_private():
    graph = {m: _relative_imports(m) for m in MODULES}
    for m, deps in graph.items():
        assert set(deps) <= set(MODULES), (m, deps)
        for dep, names in deps.items():
            private = [n for n in names if n.startswith("_")]
            assert not private, f"comm/{m}.py imports private {private} from comm/{dep}.py"
    # the documented direction: factory -> fsdp -> ddp -> buckets, assignment, base
    assert set(graph["base"]) == set() and set(graph["buckets"]) == set()
    assert set(graph["assignment"]) == set()
    seen, order = set(), []

    def visit(m, path):
        assert m not in path, f"import cycle: {' -> '.join(path + [m])}"
        if m in seen:
            return
        for dep in graph[m]:
            visit(dep, path + [m])
        seen.add(m)
        order.append(m)

    for m in MODULES:
        visit(m, [])


def test_old_import_paths_are_the_new_objects():
    from kfac_kernels import comm, distributed, fsdp
    from kfac_kernels.comm import assignment, base, buckets, ddp
    from kfac_kernels.comm import fsdp as cfsdp
    assert distributed.MismatchError is base.MismatchError is comm.MismatchError
    assert distributed.sampling_seed is ddp.sampling_seed
    assert distributed.DistributedKFAC is ddp.DistributedKFAC is comm.DistributedKFAC
    assert distributed.DistributedOptions is base.DistributedOptions
    assert distributed.CommStats is base.CommStats
    assert distributed.greedy_assignment is assignment.greedy_assignment
    assert distributed.worker_grid is assignment.worker_grid
    assert distributed.pack_triu is buckets.pack_triu
    assert distributed.unpack_triu is buckets.unpack_triu
    assert distributed.unwrap_model is comm.unwrap_model
    assert fsdp.FSDPKFAC is cfsdp.FSDPKFAC is comm.FSDPKFAC
    assert fsdp.is_dtensor is cfsdp.is_dtensor and fsdp.refuse_fsdp1 is cfsdp.refuse_fsdp1
    assert comm.LocalComm is base.LocalComm
    assert set(distributed.__all__) <= set(dir(distributed))


def test_importing_the_package_loads_no_strategy():
    code = ("import sys, kfac_kernels.comm as c; "
            "bad = [m for m in ('kfac_kernels.comm.ddp', 'kfac_kernels.comm.fsdp', "
            "'torch.distributed.fsdp') if m in sys.modules]; assert not bad, bad; "
            "c.DistributedKFAC; assert 'kfac_kernels.comm.ddp' in sys.modules; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_one_process_gets_local_comm():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = kk.KFAC(model, lr=0.1)
    assert type(opt.engine.comm) is kk.comm.LocalComm and opt.engine.dist is None
    from kfac_kernels import distributed
    blocks = list(opt.engine.blocks.values())
    assert distributed.setup(blocks, opt.opts, opt.engine.kind) is None   # its old contract

"""README.md's "Building your own optimizer on the ops": its Shampoo snippet runs as written, its
loss goes down, and its ``shampoo_step`` takes the same steps as kfac_kernels.optim.Shampoo with the
same settings (Algorithm 1: summed statistics, roots every step, no grafting or momentum)."""
import copy
import os
import re

import torch

from kfac_kernels.optim import Shampoo

README = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"))
HEADING = "## Building your own optimizer on the ops"


def _snippet() -> str:
    text = open(README, encoding="utf-8").read()
    assert HEADING in text
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S)
              if "def shampoo_step" in b]
    assert len(blocks) == 1, "no Shampoo block (def shampoo_step) in the README section"
    return blocks[0]


def test_readme_muon_snippet_runs():
    """The section's Muon lines run as written on a small model and take a step."""
    text = open(README, encoding="utf-8").read()
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S)
              if "muon_param_groups" in b]
    assert len(blocks) == 1, "no Muon block in the README section"
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 16),
                                torch.nn.Tanh(), torch.nn.Linear(16, 10))
    ns = {"model": model}
    exec(compile(blocks[0], "README.md:muon", "exec"), ns)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 10, (4, 5))
    torch.nn.functional.cross_entropy(model(x).reshape(-1, 10), x.reshape(-1)).backward()
    ns["opt"].step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def _run_snippet(capsys):
    ns = {"__name__": "readme_snippet"}
    exec(compile(_snippet(), "README.md:shampoo", "exec"), ns)
    return ns, capsys.readouterr().out


def test_readme_snippet_runs_and_learns(capsys):
    ns, out = _run_snippet(capsys)
    m = re.search(r"loss after 30 steps: ([0-9.]+)", out)
    assert m, out
    final = float(m.group(1))
    first = re.search(r"from ([0-9.]+) at step 0", _snippet())
    assert first, "the snippet's comment states the starting loss"
    assert final < 0.9 * float(first.group(1))
    # the state is one (L, R) pair per parameter batch: the two 16 x 16 weights share one
    shapes = {k: v[0].shape[0] for k, v in ns["state"].items()}
    assert shapes[(16, 16)] == 2 and len(shapes) == 3


def test_readme_snippet_matches_kfac_kernels_optim_shampoo(capsys):
    ns, _ = _run_snippet(capsys)
    torch.manual_seed(1)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.Tanh(),
                            torch.nn.Linear(16, 16, bias=False), torch.nn.Tanh(),
                            torch.nn.Linear(16, 16, bias=False), torch.nn.Tanh(),
                            torch.nn.Linear(16, 4, bias=False))
    b = copy.deepcopy(a)
    x, y = torch.randn(64, 8), torch.randn(64, 4)
    opt = Shampoo(b.parameters(), lr=0.2, epsilon=1e-6)
    state = {}
    for _ in range(6):
        for m in (a, b):
            m.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        ns["shampoo_step"](list(a.parameters()), state, lr=0.2)
        opt.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)

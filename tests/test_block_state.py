"""blocks/state.py: a block's saved state is one record, changed only through its methods, and
state_dicts saved by the release before that record existed still load."""
import importlib.util
import os
import warnings

import pytest
import torch

import kfac_kernels as kk
from kfac_kernels.blocks import BlockState

DATA = os.path.join(os.path.dirname(__file__), "data")
_spec = importlib.util.spec_from_file_location(
    "make_release_state_dicts", os.path.join(DATA, "make_release_state_dicts.py"))
release = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(release)


@pytest.fixture(scope="module")
def saved():
    return torch.load(os.path.join(DATA, "state_dicts_release.pt"), weights_only=False)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and sorted(a) == sorted(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("inverse", release.KINDS)
def test_release_state_dict_loads_and_training_continues(saved, inverse):
    """The fixture was written by the code before BlockState (tests/data/
    make_release_state_dicts.py): each block's saved entry loads into the record unchanged,
    saving it again gives the same entries, and the continued run matches the release's."""
    ckpt = saved[inverse]
    net = release.model(seed=7)        # another init: everything comes from the checkpoint
    net.load_state_dict(ckpt["model"])
    opt = kk.KFAC(net, **release.options(inverse))
    opt.load_state_dict(ckpt["opt"])
    entries = ckpt["opt"]["kfac"]["blocks"]
    for name, b in opt.blocks.items():
        e = entries[name]
        for key in ("A", "G", "count", "skipped", "inverse"):
            assert _same(getattr(b, key), e[key]), (name, key)
        assert _same(b.ekfac_count, e.get("ekfac_count"))
        assert (b.ekfac_count is not None) == (inverse == "ekfac")
    again = opt.state_dict()["kfac"]["blocks"]
    assert sorted(again) == sorted(entries)
    for name, e in entries.items():
        assert _same(again[name], e), name
    for s in range(release.SAVED_AT, release.SAVED_AT + release.AFTER):
        release.step(net, opt, s)
    # float64 throughout: bit-identical on the machine that wrote the fixture; elsewhere (other
    # BLAS code paths) the three steps differ by rounding, amplified at most by the damped
    # factors' conditioning (damping 1e-2 against factor entries of order 1, or Eigen-Adam's
    # normalised update): far below 1e-9 of the parameters' scale
    for p, want in zip(net.parameters(), ckpt["after"]):
        assert p.dtype == want.dtype
        assert (p.detach() - want).abs().max() <= 1e-9 * want.abs().max()


def test_block_fields_are_read_only():
    model = release.model()
    opt = kk.KFAC(model, **release.options("eigh"))
    release.step(model, opt, 0)
    b = opt.blocks["3"]
    for name in ("A", "G", "count", "skipped", "inverse", "ekfac_count"):
        with pytest.raises(AttributeError):
            setattr(b, name, None)
    assert b.A is b.state.A and b.inverse is b.state.inverse


def test_state_transitions():
    st = BlockState()
    A_hat, G_hat = torch.eye(3) * 2, torch.eye(2) * 4
    st.start_factors(A_hat, G_hat, torch.bfloat16, torch.float32)
    assert st.A.dtype == torch.bfloat16 and float(st.A.abs().sum()) == 0
    assert st.count.dtype == torch.float32 and st.skipped.dtype == torch.int64
    st.average_factors(A_hat.clone(), G_hat.clone(), torch.tensor(True), 0.9)
    assert torch.equal(st.A.float(), A_hat) and float(st.count) == 1    # first estimate whole
    bad = torch.full((3, 3), float("nan"))
    st.average_factors(bad, G_hat.clone(), torch.tensor(False), 0.9)
    assert torch.equal(st.A.float(), A_hat) and float(st.count) == 1 and int(st.skipped) == 1

    view = torch.zeros(2, 9).view(-1)[:9].view(3, 3)
    st.rebind_factor("A", view)
    assert st.A is view and torch.equal(view.float(), A_hat.to(view.dtype).float())

    st.set_decomposition({"QA": torch.eye(3), "lamA": torch.ones(3)})
    st.set_decomposition({"QG": torch.eye(2)}, keep_others=True)
    assert sorted(st.inverse) == ["QA", "QG", "lamA"]
    old = st.inverse
    st.set_decomposition({"QG": torch.eye(2)})
    assert sorted(st.inverse) == ["QG"] and sorted(old) == ["QA", "QG", "lamA"]
    st.put_entries({"M2": torch.zeros(2, 3)})
    assert sorted(st.inverse) == ["M2", "QG"]

    st.restart_scalings(torch.ones(2, 3), torch.zeros(()))
    st.average_scalings(torch.full((2, 3), 3.0), torch.tensor(True), 0.9)
    assert torch.equal(st.inverse["S"], torch.full((2, 3), 3.0)) and float(st.ekfac_count) == 1

    st.restart_factor("G")
    assert float(st.G.abs().sum()) == 0 and float(st.count) == 0 and st.A is view
    st.clear_decomposition()
    assert st.inverse == {}

    saved = st.saved()
    st2 = BlockState()
    st2.load(saved, torch.device("cpu"), with_inverse=True, count_dtype=torch.float32)
    assert all(_same(getattr(st2, k), saved[k]) for k in ("A", "G", "count", "skipped", "inverse"))
    st2.load({}, torch.device("cpu"), with_inverse=True, count_dtype=torch.float32)
    assert st2.A is None and st2.inverse == {} and st2.ekfac_count is None
    assert BlockState().saved() == {}


def test_older_ekfac_scalings_without_their_counter_count_as_one():
    st = BlockState()
    entry = dict(A=torch.eye(2), G=torch.eye(2), count=torch.tensor(3.0),
                 skipped=torch.tensor(0), inverse={"S": torch.ones(2, 2)})
    st.load(entry, torch.device("cpu"), with_inverse=True, count_dtype=torch.float64)
    assert st.ekfac_count.dtype == torch.float64 and float(st.ekfac_count) == 1
    st.load(entry, torch.device("cpu"), with_inverse=False, count_dtype=torch.float64)
    assert st.inverse == {} and st.ekfac_count is None


@pytest.mark.parametrize("inverse", ["eigh", "cholesky"])
def test_nonfinite_factor_of_a_stacked_block_restarts_it(inverse):
    """A stacked block (grouped convolution) is decomposed member by member; a non-finite member
    restarts the block's whole factor (its members share one counter), warned once, and training
    goes on with finite factors (before BlockState this raised AttributeError on the member)."""
    model = release.model()
    opt = kk.KFAC(model, **release.options(inverse))
    for s in range(2):
        release.step(model, opt, s)
    b = opt.blocks["0"]
    assert b.stacked
    b.A[1, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for s in range(2, 6):
            release.step(model, opt, s)
    assert any("'0[1]': the running factor A is not finite" in str(w.message) for w in rec)
    assert bool(torch.isfinite(b.A).all()) and bool(torch.isfinite(b.G).all())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())

"""kfac_kernels.nn's sequence modules against torch's fused RNN/GRU/LSTM after from_torch: any
number of layers, both directions, dropout between layers, batch_first, initial states and
unbatched inputs; outputs, final states and parameter gradients equal torch's in float64."""
import pytest
import torch
import torch.nn as nn

import kfac_kernels as kk

TOL = 1e-12
OURS = {nn.RNN: kk.nn.RNN, nn.GRU: kk.nn.GRU, nn.LSTM: kk.nn.LSTM}


def _states(cls, L, D, N, H, g):
    h = torch.randn(L * D, N, H, generator=g, dtype=torch.float64)
    if cls is nn.LSTM:
        return (h, torch.randn(L * D, N, H, generator=g, dtype=torch.float64))
    return h


def _flat(h):
    return torch.cat([t.flatten() for t in h]) if isinstance(h, tuple) else h.flatten()


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("layers,bidirectional", [(1, True), (2, True), (3, False)])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_torch_outputs_states_and_gradients(cls, layers, bidirectional, batch_first,
                                                    with_state):
    torch.manual_seed(0)
    ref = cls(4, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
              dropout=0.3 if layers > 1 else 0.0).double().eval()   # eval: dropout off in both
    ours = OURS[cls].from_torch(ref)
    assert not ours.training and ours.dropout == ref.dropout
    g = torch.Generator().manual_seed(1)
    N, T, D = 3, 6, 2 if bidirectional else 1
    x = torch.randn(N, T, 4, generator=g, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    hx = _states(cls, layers, D, N, 5, g) if with_state else None
    a, ha = ref(x, hx)
    b, hb = ours(x, hx)
    assert b.shape == a.shape == ((N, T, D * 5) if batch_first else (T, N, D * 5))
    assert (a - b).abs().max() <= TOL and (_flat(ha) - _flat(hb)).abs().max() <= TOL
    dy = torch.randn(a.shape, generator=g, dtype=torch.float64)
    (a * dy).sum().backward()
    (b * dy).sum().backward()
    for i in range(layers):
        for suffix, cells in (("", ours.layers), ("_reverse", ours.layers_reverse)):
            if cells is None:
                continue
            got = cells[i].ih.weight.grad
            want = getattr(ref, f"weight_ih_l{i}{suffix}").grad
            assert (got - want).abs().max() <= TOL
            got = cells[i].hh.bias.grad
            want = getattr(ref, f"bias_hh_l{i}{suffix}").grad
            assert (got - want).abs().max() <= TOL


def test_unbatched_input_and_dropout_in_training():
    torch.manual_seed(0)
    ref = nn.LSTM(4, 5, num_layers=2, bidirectional=True, dropout=0.5).double()
    ours = kk.nn.LSTM.from_torch(ref)
    x = torch.randn(6, 4, dtype=torch.float64)                       # [T, k]: one sequence
    ref.eval()
    ours.eval()
    a, (ha, ca) = ref(x)
    b, (hb, cb) = ours(x)
    assert b.shape == (6, 10) and hb.shape == (4, 5)
    assert (a - b).abs().max() <= TOL and (ca - cb).abs().max() <= TOL
    ours.train()
    assert not torch.allclose(ours(x)[0], ours(x)[0])              # dropout between layers


def test_kfac_sees_both_directions():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("rnn", nn.GRU(4, 5, num_layers=2, bidirectional=True, batch_first=True))
    kk.nn.convert(model)
    opt = kk.KFAC(model, lr=0.1, damping=1e-2, kl_clip=1e-3)
    assert set(opt.blocks) == {f"rnn.{side}.{i}.{w}" for side in ("layers", "layers_reverse")
                               for i in range(2) for w in ("ih", "hh")}
    x = torch.randn(8, 6, 4)
    target = torch.randn(8, 6, 10)
    losses = []
    for _ in range(10):
        out = model(x)[0]
        loss = 0.5 * ((out - target) ** 2).flatten(1).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_lstm_projections_are_refused_by_name():
    with pytest.raises(ValueError, match="proj_size"):
        kk.nn.LSTM.from_torch(nn.LSTM(4, 6, proj_size=3))
    with pytest.raises(ValueError, match=r"cannot convert '1' \(LSTM\)"):
        kk.nn.convert(nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 6, proj_size=3)))

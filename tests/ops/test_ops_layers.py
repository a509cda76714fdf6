"""The layer-specific kernel ops against independent float64 computations: grouped KFC factors,
preconditioning with a diagonal right factor, EKFAC statistics (dense, chunked, embeddings)."""
import pytest
import torch
import torch.nn.functional as F

from kfac_kernels import ops
from kfac_kernels.ops import reference
from helpers import onehot_patches, rel_err

D = torch.float64


def orth(n, g, batch=()):
    q, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=D))
    return q


@pytest.mark.parametrize("nd,groups,hom", [(1, 3, True), (2, 2, False), (3, 4, True)])
def test_conv_input_factor_grouped_is_each_groups_kfc_factor(nd, groups, hom):
    g = torch.Generator().manual_seed(0)
    C = 2 * groups
    x = torch.randn(3, C, *([5] * nd), generator=g, dtype=D)
    k, s, p, dl = (2,) * nd, (2,) + (1,) * (nd - 1), (1,) * nd, (1,) * (nd - 1) + (2,)
    got = ops.conv_input_factor_grouped(x, k, s, p, dl, groups, homogeneous=hom)
    assert got.shape[0] == groups
    for j in range(groups):
        ref = ops.conv_input_factor(x[:, 2 * j:2 * j + 2], k, s, p, dl, homogeneous=hom)
        assert rel_err(got[j], ref) < 1e-13
    with pytest.raises(ValueError, match="not divisible by groups=4"):
        ops.conv_input_factor_grouped(torch.randn(1, 6, 5), 2, groups=4)


def test_kron_precondition_diag_equals_eigen_form_with_identity_basis():
    g = torch.Generator().manual_seed(1)
    B, m, n = 3, 5, 33
    V = torch.randn(B, m, n, generator=g, dtype=D)[..., ::1].transpose(-1, -2).contiguous() \
        .transpose(-1, -2)
    QG = orth(m, g, (B,))
    lamG = torch.rand(B, m, generator=g, dtype=D)
    a = torch.rand(B, n, generator=g, dtype=D)
    a[:, 3] = 0.0                                              # an unseen token
    eye = torch.eye(n, dtype=D).expand(B, n, n)
    for damping in (0.0, 1e-2):
        ref, rdot = ops.kron_precondition_eigen(V, QG, lamG, eye, a, damping, return_dot=True)
        got, gdot = ops.kron_precondition_diag(V, QG, lamG.unsqueeze(-1) * a.unsqueeze(-2), damping,
                                               return_dot=True)
        assert rel_err(got, ref) < 1e-13 and rel_err(gdot, rdot) < 1e-13
    with pytest.raises(ValueError, match="scalings must have 3 dims"):
        ops.kron_precondition_diag(V, QG, lamG, 0.0)
    with pytest.raises(ValueError, match=r"scalings has shape \(3, 5, 32\)"):
        ops.kron_precondition_diag(V, QG, torch.ones(B, m, n - 1, dtype=D), 0.0)


def per_example_reference(g, a, QG, QA, hom):
    """sum_n (QG^T D_n QA)^2 with D_n = sum_t g_nt abar_nt^T, by explicit loops."""
    if hom:
        a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=D)], -1)
    out = 0.0
    for n in range(g.shape[-3]):
        Dn = g[..., n, :, :].transpose(-1, -2) @ a[..., n, :, :]
        out = out + (QG.transpose(-1, -2) @ Dn @ QA) ** 2
    return out


@pytest.mark.parametrize("T,batch,hom", [(1, (), True), (1, (2,), False), (7, (), False),
                                         (7, (3,), True)])
def test_ekfac_scalings_against_per_example_gradients(T, batch, hom):
    g = torch.Generator().manual_seed(2)
    N, m, k = 9, 4, 5
    gr = torch.randn(*batch, N, T, m, generator=g, dtype=D)
    a = torch.randn(*batch, N, T, k, generator=g, dtype=D)
    QG, QA = orth(m, g, batch), orth(k + hom, g, batch)
    ref = per_example_reference(gr, a, QG, QA, hom)
    got = ops.ekfac_scalings(gr, a, QG, QA, homogeneous=hom, alpha=0.5)
    assert rel_err(got, 0.5 * ref) < 1e-13
    # chunked path: several chunks of examples give the same sums
    small = reference.ekfac_scalings(gr, a, QG, QA, homogeneous=hom, chunk_elements=2 * m * (k + hom))
    assert rel_err(small, ref) < 1e-13


def test_ekfac_scalings_embedding_against_one_hot_inputs():
    g = torch.Generator().manual_seed(3)
    N, T, m, V = 5, 8, 3, 11
    gr = torch.randn(N, T, m, generator=g, dtype=D)
    tok = torch.randint(0, V, (N, T), generator=g)
    tok[0, :4] = 2                                      # repeated tokens within an example
    tok[1, :] = 0                                       # an example of padding only
    QG = orth(m, g)
    for pad in (None, 0):
        keep = torch.ones(N, T, dtype=D) if pad is None else (tok != pad).to(D)
        a = F.one_hot(tok, V).to(D) * keep.unsqueeze(-1)
        ref = per_example_reference(gr, a, QG, torch.eye(V, dtype=D), False)
        got = ops.ekfac_scalings_embedding(gr, tok, QG, V, padding_idx=pad)
        assert rel_err(got, ref) < 1e-13
    with pytest.raises(TypeError, match="int32/int64"):
        ops.ekfac_scalings_embedding(gr, tok.float(), QG, V)


def test_onehot_patches_helper_matches_unfold():
    """The brute-force helper's patches (grouped one-hot convolution) equal F.unfold's."""
    conv = torch.nn.Conv2d(3, 4, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)).double()
    x = torch.randn(1, 3, 6, 7, dtype=D)
    ref = F.unfold(x, (2, 3), dilation=(1, 2), padding=(1, 0), stride=(2, 1))[0].T
    assert torch.equal(onehot_patches(conv, x), ref)

"""inverse="cholesky": pi-damped inverses of A and G through a batched Cholesky."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, Optional

import torch

from .. import ops
from .base import InverseKind, buckets, diagonal_side, finite_each, pi, select
from .plan import StepPlan
from .eigh import eigh_units

__all__ = ["CholeskyInverse"]


class CholeskyInverse(InverseKind):
    """Stores ``A_inv = (A + pi sqrt(gamma) I)^-1`` and ``G_inv = (G + sqrt(gamma)/pi I)^-1``;
    preconditions with ``ops.kron_precondition_inverse``: U = G_inv V A_inv. A block with a
    diagonal A has its G decomposed by eigh instead (the pi-damped update is then computed
    exactly in G's eigenbasis, docs/layers.md); likewise a block with a diagonal G (a side over
    ``max_factor_dim``) has its A decomposed by eigh."""

    name = "cholesky"
    damping_modes = ("pi",)
    default_damping_mode = "pi"
    decomposition_op = "damped_inverse"
    precondition_op = "kron_precondition_inverse"

    @classmethod
    def check_options(cls, values: dict) -> None:
        if values["damping_mode"] != "pi":
            raise ValueError("inverse='cholesky' supports damping_mode='pi' only (eigenvalue "
                             "damping needs the eigenbasis: use inverse='eigh')")

    def entries(self, b, which: str):
        if b.diag_A or b.diag_G:
            return super().entries(b, which)
        n = b.in_dim if which == "A" else b.out_dim
        return [(which + "_inv", (n, n), True)]

    def decompose_units(self, units, only: Optional[set], inverse_updates: int) -> None:
        diag = [u for u in units if u.diag_A or u.diag_G]
        self._cholesky([u for u in units if not (u.diag_A or u.diag_G)], only)
        eigh_units(self, diag, only, inverse_updates)

    def precondition(self, members, st, V, damping: float):
        if diagonal_side(st):     # a diagonal side: the other through its eigenbasis
            return self.precondition_diag(members, st, V, damping)
        return ops.kron_precondition_inverse(V, st["G_inv"], st["A_inv"], return_dot=True,
                                             backend=self.backend("kron_precondition_inverse"))

    def plan(self, members, st, damping: float):
        if diagonal_side(st):
            return self.plan_diag(members, st, damping)
        if not self.torch_path("kron_precondition_inverse", st["G_inv"].device):
            return None
        return StepPlan(st["G_inv"].dtype, Li=st["G_inv"], Ri=st["A_inv"], batched=True)

    # ---------------------------------------------------------------- decompositions
    def _cholesky(self, units, only: Optional[set]) -> None:
        root = math.sqrt(self.opts.damping)
        dampings = {}
        for b in units:
            p = pi(b)
            dampings[(b, "A")] = p * root
            dampings[(b, "G")] = root / p
        new: Dict[Any, dict] = defaultdict(dict)
        for key, items in buckets(units, lambda b: select(b, only)).items():
            stack = torch.stack([f for _, _, f in items])
            damp = torch.stack([dampings[(b, w)].to(stack.dtype) for b, w, _ in items])
            inv, info = ops.damped_inverse(stack, damp, return_info=True,
                                           backend=self.backend("damped_inverse"))
            # a "successful" factorisation of a matrix with an inf can still give a finite inverse
            bad = ((info != 0) | ~finite_each(stack) | ~finite_each(inv)).nonzero().flatten().tolist()
            for i, (b, which, f) in enumerate(items):
                new[b][which + "_inv"] = (self._fallback(b, which, f, damp[i])
                                          if i in bad else inv[i])
        for b, entries in new.items():
            b.state.set_decomposition(entries, keep_others=only is not None)

    def _fallback(self, b, which: str, f: torch.Tensor, damp: torch.Tensor):
        """float64 retry, then three rounds of extra damping, then the previous inverse, then a
        scaled identity (each warned once per block and factor)."""
        warn = self.health.warn_once
        finite_in = not self.restart_if_nonfinite(b, which, f)
        inv, info = ops.damped_inverse(f.double().unsqueeze(0), damp.double().reshape(1),
                                       return_info=True, backend="torch")
        if int(info[0]) == 0 and finite_in and bool(torch.isfinite(inv[0].to(f.dtype)).all()):
            warn(("chol", b.name, which, "fp64"), f"block {b.name!r}: Cholesky of {which} failed "
                 f"in {f.dtype}; recovered in float64")
            return inv[0].to(f.dtype)
        finite = torch.nan_to_num(f.double(), nan=0.0, posinf=0.0, neginf=0.0)
        extra = max(float(damp), 1e-6 * float(finite.diagonal().abs().mean()), 1e-12)
        for _ in range(3):
            extra *= 10.0
            inv, info = ops.damped_inverse(finite.unsqueeze(0), float(damp) + extra,
                                           return_info=True, backend="torch")
            if int(info[0]) == 0 and finite_in and bool(torch.isfinite(inv[0].to(f.dtype)).all()):
                warn(("chol", b.name, which, "damped"), f"block {b.name!r}: Cholesky of {which} "
                     f"failed; used extra damping {extra:.3g}")
                return inv[0].to(f.dtype)
        key = which + "_inv"
        if key in b.inverse:
            warn(("chol", b.name, which, "previous"), f"block {b.name!r}: Cholesky of {which} "
                 f"failed; keeping the previous inverse")
            return b.inverse[key].clone()
        warn(("chol", b.name, which, "identity"), f"block {b.name!r}: Cholesky of {which} failed "
             f"and there is no previous inverse; using a scaled identity")
        n = f.shape[-1]
        scale = 1.0 / (finite.diagonal().abs().mean() + float(damp)).clamp_min(1e-12)
        return (scale * torch.eye(n, dtype=torch.float64, device=f.device)).to(f.dtype)

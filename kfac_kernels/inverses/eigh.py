"""inverse="eigh": eigendecompositions of A and G, eigenvalue or pi damping."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Optional

import torch

from .. import ops
from .base import InverseKind, buckets, diagonal_side, finite_each, select
from .plan import StepPlan, damped_inverse_from_eigh, eigen_reciprocal, two_sided

__all__ = ["EighInverse", "eigh_units"]


class EighInverse(InverseKind):
    """Stores ``QA, lamA, QG, lamG`` (no ``QA`` / ``QG`` for a diagonal side); preconditions with
    ``ops.kron_precondition_eigen``: U = QG [(QG^T V QA) / (lamG lamA^T + gamma)] QA^T."""

    name = "eigh"

    def decompose_units(self, units, only: Optional[set], inverse_updates: int) -> None:
        eigh_units(self, units, only, inverse_updates)

    def precondition(self, members, st, V, damping: float):
        if diagonal_side(st):     # a diagonal A (embeddings) or G (a side over max_factor_dim)
            return self.precondition_diag(members, st, V, damping)
        backend = self.backend("kron_precondition_eigen")
        if self.opts.damping_mode == "pi":
            lamG, lamA = self.pi_damped(members, st["lamG"].clamp_min(0),
                                        st["lamA"].clamp_min(0), damping)
            return ops.kron_precondition_eigen(V, st["QG"], lamG, st["QA"], lamA, 0.0,
                                               return_dot=True, backend=backend)
        return ops.kron_precondition_eigen(V, st["QG"], st["lamG"], st["QA"], st["lamA"],
                                           float(damping), return_dot=True, backend=backend)


    def plan(self, members, st, damping: float):
        if diagonal_side(st):
            return self.plan_diag(members, st, damping)
        if not self.torch_path("kron_precondition_eigen", st["QG"].device):
            return None
        lamG, lamA = st["lamG"], st["lamA"]
        if self.opts.damping_mode == "pi":
            # pi damping factorises, 1/((lamG + g)(lamA + a)) = 1/(lamG + g) * 1/(lamA + a): the
            # damped inverses are built once and a step is two products, G^-1 V A^-1
            lamG, lamA = self.pi_damped(members, lamG.clamp_min(0), lamA.clamp_min(0), damping)
            return StepPlan(st["QG"].dtype, Li=damped_inverse_from_eigh(st["QG"], lamG),
                            Ri=damped_inverse_from_eigh(st["QA"], lamA), batched=True)
        return two_sided(st["QG"], st["QA"], eigen_reciprocal(lamG, lamA, damping), batched=True)


def eigh_units(kind: InverseKind, units, only: Optional[set], inverse_updates: int) -> None:
    """Eigendecompose the factors of ``units``, one batched ``ops.symeig`` per size bucket
    (a warm-started refresh between full decompositions when ``full_eigh_every > 1``); the
    fallback chain handles the matrices that fail."""
    full_every = kind.opts.full_eigh_every
    new: Dict[Any, dict] = defaultdict(dict)
    for key, items in buckets(units, lambda b: select(b, only)).items():
        stack = torch.stack([f for _, _, f in items])
        prev = [b.inverse.get("Q" + which) for b, which, _ in items]
        kw: Dict[str, Any] = {}
        if (full_every > 1 and inverse_updates % full_every != 0
                and all(q is not None and q.dtype == stack.dtype for q in prev)):
            # between full decompositions: one warm-started subspace-iteration refresh
            kw = dict(method="refresh", prev_eigenvectors=torch.stack(prev))
        lam, Q, info = ops.symeig(stack, return_info=True, backend=kind.backend("symeig"), **kw)
        bad = ((info != 0) | ~finite_each(stack)).nonzero().flatten().tolist()  # 1 sync/bucket
        for i, (b, which, f) in enumerate(items):
            if i in bad:
                l_i, q_i = eigh_fallback(kind, b, which, f)
            else:
                l_i, q_i = lam[i], Q[i]
            new[b]["lam" + which] = l_i
            new[b]["Q" + which] = q_i
    for b, entries in new.items():
        b.state.set_decomposition(entries, keep_others=only is not None)


def eigh_fallback(kind: InverseKind, b, which: str, f: torch.Tensor):
    """Retry in float64, then with added damping, then keep the previous decomposition, then a
    scaled identity (each warned once per block and factor)."""
    warn = kind.health.warn_once
    reasons = []
    finite_in = not kind.restart_if_nonfinite(b, which, f)
    lam, Q, info = ops.symeig(f.double().unsqueeze(0), return_info=True, backend="torch")
    if int(info[0]) == 0 and finite_in:
        warn(("eigh", b.name, which, "fp64"), f"block {b.name!r}: eigendecomposition of {which} "
             f"failed in {f.dtype}; recovered in float64")
        return lam[0].to(f.dtype), Q[0].to(f.dtype)
    reasons.append("float64 retry failed")
    finite = torch.nan_to_num(f.double(), nan=0.0, posinf=0.0, neginf=0.0)
    shift = max(float(kind.opts.damping), 1e-6 * float(finite.diagonal().abs().mean()), 1e-12)
    eye = torch.eye(f.shape[-1], dtype=torch.float64, device=f.device)
    lam, Q, info = ops.symeig((finite + shift * eye).unsqueeze(0), return_info=True,
                              backend="torch")
    if int(info[0]) == 0 and bool(torch.isfinite(f).all()):
        warn(("eigh", b.name, which, "damped"), f"block {b.name!r}: eigendecomposition of "
             f"{which} failed; used {which} + {shift:.3g} I ({'; '.join(reasons)})")
        return lam[0].to(f.dtype), Q[0].to(f.dtype)
    reasons.append("damped retry failed")
    if "Q" + which in b.inverse:
        warn(("eigh", b.name, which, "previous"), f"block {b.name!r}: eigendecomposition of "
             f"{which} failed; keeping the previous one ({'; '.join(reasons)})")
        return b.inverse["lam" + which].clone(), b.inverse["Q" + which].clone()
    warn(("eigh", b.name, which, "identity"), f"block {b.name!r}: eigendecomposition of {which} "
         f"failed and there is no previous one; using a scaled identity ({'; '.join(reasons)})")
    n = f.shape[-1]
    scale = finite.diagonal().abs().mean().clamp_min(1e-12).to(f.dtype)
    return scale * torch.ones(n, dtype=f.dtype, device=f.device), torch.eye(
        n, dtype=f.dtype, device=f.device)

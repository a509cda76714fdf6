"""inverse="eigen_adam": Adam's moments in K-FAC's Kronecker eigenbasis.

The eigenbases are those of "eigh" (A = QA diag(lamA) QA^T, G = QG diag(lamG) QG^T, refreshed
every ``inverse_every`` steps). What replaces the eigenvalues is what makes SOAP (Vyas et al.
2024) strong: a running second moment of the ROTATED mini-batch gradient, per coordinate, with
Adam's bias correction, and Adam's square root; with ``rotated_momentum = beta1 > 0`` also
Adam's first moment, kept in the rotated coordinates. For a block's gradient matrix V
(weight | bias) at its t-th preconditioned step::

    R  = QG^T V QA                          (QA = I for a diagonal A: embeddings)
    M2 <- beta M2 + (1 - beta) R^2          (M2 = 0 before the first step; beta = ema_decay)
    M1 <- beta1 M1 + (1 - beta1) R          (only with beta1 > 0; M1 = 0 before the first step)
    N  = R / (sqrt(M2 / (1 - beta^t)) + eps)                          (beta1 = 0)
    N  = [M1 / (1 - beta1^t)] / (sqrt(M2 / (1 - beta^t)) + eps)       (beta1 > 0)
    U  = QG N QA^T,      eps = damping  (0/0 := 0)

and the optimiser's heavy-ball momentum and lr act on U as for every kind (``<U, V>`` is
returned for the KL clip, which this kind does not need: the update is already normalised
per coordinate like Adam's, so lr sets the step size). With ``rotated_momentum`` the recipe
sets ``momentum=0``: the first moment then lives where the normalisation is, as in Adam and
SOAP, instead of summing normalised updates after the rotation back (measured in
docs/transformers.md).

Unlike EKFAC's scalings (per-example second moments, restarted with every new basis), M2 is a
second moment of the mini-batch gradient and is kept across basis refreshes without rotation,
as SOAP keeps its V: a refresh moves the eigenvectors little and keeps their order (by
eigenvalue), so each coordinate's history stays meaningful. M1 is a linear quantity and is
turned into the new basis exactly: ``M1 <- (QG'^T QG) M1 (QA^T QA')`` (QG, QA old; QG', QA'
new). A checkpoint made without M1 (rotated_momentum was 0) resumes with M1 = 0 from the next
basis refresh on, and until then steps as with beta1 = 0.

``damping`` is Adam's epsilon here (in gradient units, e.g. 1e-8), not a curvature damping.
A step in which some blocks of a shape group have no gradient (unused modules) preconditions
that group from a copy of its entries: those blocks' moments skip that step.
The moments are updated once per call of the preconditioning, i.e. once per step; the
adaptive options (which precondition several times per step) are refused.
"""
from __future__ import annotations

from typing import Optional

import torch

from .eigh import EighInverse
from .plan import reciprocal_or_zero

__all__ = ["EigenAdamInverse"]


class EigenAdamInverse(EighInverse):
    """Stores the eigh entries plus ``M2`` (the rotated second moment, the gradient matrix's
    shape), ``t`` (preconditioned steps since the block's first decomposition) and, with
    ``rotated_momentum > 0``, ``M1`` (the rotated first moment)."""

    name = "eigen_adam"
    damping_modes = ("eigen",)
    precondition_op = "kron_rotate"

    @classmethod
    def check_options(cls, values: dict) -> None:
        if values["damping_mode"] != "eigen":
            raise ValueError("inverse='eigen_adam' uses damping as Adam's epsilon: use "
                             "damping_mode='eigen' (the default)")
        for name in ("adaptive_lr", "adaptive_momentum", "adaptive_damping"):
            if values.get(name):
                raise ValueError(f"inverse='eigen_adam' updates its second moment once per "
                                 f"step and cannot be combined with {name}=True (which "
                                 f"preconditions several times per step); use "
                                 f"inverse='eigh' or 'ekfac' for the adaptive options")

    def check_distributed(self, k: int, world: int) -> None:
        if k < world:
            raise NotImplementedError(
                f"inverse='eigen_adam' under torch.distributed needs grad_worker_fraction=1 "
                f"(every rank keeps every block's moments), got "
                f"{self.opts.grad_worker_fraction}")

    @property
    def _beta1(self) -> float:
        return float(getattr(self.opts, "rotated_momentum", 0.0) or 0.0)

    def extra_entries(self):
        return ("M2", "t", "M1") if self._beta1 else ("M2", "t")

    # ---------------------------------------------------------------- decompositions
    def decompose(self, blocks, only: Optional[set], inverse_updates: int) -> None:
        """As "eigh", keeping each block's moments and step count across the refresh (M1
        turned into the new bases)."""
        keys = self.extra_entries()
        kept = {b: {k: b.inverse[k].clone() for k in keys if k in b.inverse} for b in blocks}
        # the old bases by reference: a decomposition stores new tensors, it does not write
        # into the previous ones
        old = {b: {k: b.inverse[k] for k in ("QG", "QA") if k in b.inverse}
               for b in blocks if "M1" in kept[b]}
        super().decompose(blocks, only, inverse_updates)
        for b in blocks:
            if not kept[b]:
                continue
            if "M1" in kept[b]:
                kept[b]["M1"] = self._turn(kept[b]["M1"], old[b], b.inverse)
            elif self._beta1 and "M2" in kept[b]:
                kept[b]["M1"] = torch.zeros_like(kept[b]["M2"])
            # copies (clones above): the old entries may be views of a shape group's stack
            b.state.put_entries(kept[b])

    @staticmethod
    def _turn(M1: torch.Tensor, old: dict, new: dict) -> torch.Tensor:
        """M1 in the old bases -> the same matrix in the new ones (a basis missing on either
        side, a diagonal A, is the identity)."""
        QGo, QGn = old.get("QG"), new.get("QG")
        if QGo is not None and QGn is not None:
            M1 = torch.matmul(QGn.transpose(-1, -2), torch.matmul(QGo, M1))
        QAo, QAn = old.get("QA"), new.get("QA")
        if QAo is not None and QAn is not None:
            M1 = torch.matmul(torch.matmul(M1, QAo.transpose(-1, -2)), QAn)
        return M1.contiguous()

    def after_decomposition(self, blocks, comm) -> None:
        for b in blocks:
            inv = b.inverse
            if "M2" not in inv and "QG" in inv:
                dt, dev = inv["QG"].dtype, inv["QG"].device
                entries = {"M2": torch.zeros(b.shape, dtype=dt, device=dev),
                           "t": torch.zeros((b.num_stack,) if b.stacked else (), dtype=dt,
                                            device=dev)}
                if self._beta1:
                    entries["M1"] = torch.zeros_like(entries["M2"])
                b.state.put_entries(entries)

    def plan(self, members, st, damping: float):
        return None        # the scalings change every step: the per-call path below

    # ---------------------------------------------------------------- preconditioning
    def precondition(self, members, st, V, damping: float):
        """``(U, <U, V>)`` for the stack ``V`` [B, m, n]; updates ``st["M2"]``, ``st["t"]``
        (and ``st["M1"]``) in place (views of the shape group's stacks, so the blocks see
        them)."""
        QG, QA = st["QG"], st.get("QA")
        beta = float(self.opts.ema_decay)
        Vw = V.to(QG.dtype)
        QGt = QG.transpose(-1, -2)
        R = torch.matmul(QGt, Vw)
        if QA is not None:
            R = torch.matmul(R, QA)
        M2, t = st["M2"], st["t"]
        M2.mul_(beta).addcmul_(R, R, value=1.0 - beta)
        t.add_(1.0)
        shape = t.shape + (1, 1)
        corr = (1.0 - torch.pow(torch.full_like(t, beta), t)).reshape(shape)
        # a coordinate with no gradient yet (M2 = 0) at eps = 0 moves by 0, not 0/0
        inv_rms = reciprocal_or_zero((M2 / corr).sqrt_() + float(damping))
        M1 = st.get("M1") if self._beta1 else None
        if M1 is not None:
            b1 = self._beta1
            M1.lerp_(R, 1.0 - b1)
            corr1 = (1.0 - torch.pow(torch.full_like(t, b1), t)).reshape(shape)
            N = (M1 / corr1) * inv_rms
        else:
            N = R * inv_rms
        U = torch.matmul(QG, N)
        if QA is not None:
            U = torch.matmul(U, QA.transpose(-1, -2))
        dot = (U * Vw).sum((-2, -1))
        return U.to(V.dtype), dot

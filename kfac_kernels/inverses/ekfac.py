"""inverse="ekfac": K-FAC's eigenbases with eigenvalue-corrected scalings (George et al. 2018).

S_ij estimates E[(QG^T D_n QA)_ij^2] for the per-example gradient matrices D_n in the current
eigenbasis. It is re-estimated on every factor step from that step's backward passes (the
per-pass statistics are projected into the basis as the passes happen), averaged like the
factors (first-estimate rule, ``ema_decay``), and restarts whenever the basis changes: from that
step's statistics when there are any (kept until the new basis exists), else from the K-FAC
eigenvalues lamG lamA^T. Preconditioning: U = QG [(QG^T V QA) / (S + gamma)] QA^T.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Dict

import torch

from .. import ops
from ..ops.reference import pinv_cut
from .eigh import EighInverse
from .plan import reciprocal_or_zero, two_sided

__all__ = ["EkfacInverse"]


class EkfacInverse(EighInverse):
    """Stores the eigh entries plus ``S`` (and the block's ``ekfac_count``, both through its
    state record's scalings methods)."""

    name = "ekfac"
    damping_modes = ("eigen",)
    precondition_op = "ekfac_precondition"
    wants_passes = True

    def __init__(self, opts, health, backend):
        super().__init__(opts, health, backend)
        # statistics of passes whose eigenbasis is replaced this step, kept until the new basis
        # exists: {block: [(inputs, grads, calls, alpha)]}
        self._stash: Dict[object, list] = defaultdict(list)
        self._n: Dict[object, int] = {}   # local examples behind each block's estimate
        # this step's scalings estimate S_hat of each block (in the current eigenbasis)
        self._s_hat: Dict[object, torch.Tensor] = {}
        # gradient accumulation: weighted S sums of closed micro-batches, stash entries weighed
        self._acc: Dict[object, torch.Tensor] = {}
        self._closed: Dict[object, int] = {}

    @classmethod
    def check_options(cls, values: dict) -> None:
        if values["damping_mode"] != "eigen":
            raise ValueError("inverse='ekfac' damps its corrected eigenvalues: use "
                             "damping_mode='eigen'")

    def check_distributed(self, k: int, world: int) -> None:
        """EKFAC's scalings are reduced when every rank holds every eigenbasis (each rank projects
        its own examples' gradients into it)."""
        if k < world:
            raise NotImplementedError(
                f"inverse='ekfac' under torch.distributed needs grad_worker_fraction=1 (every "
                f"rank projects its examples into every eigenbasis), got "
                f"{self.opts.grad_worker_fraction}")

    def extra_entries(self):
        return ("S",)

    # ---------------------------------------------------------------- preconditioning
    def precondition(self, members, st, V, damping: float):
        if "S" not in st:        # no scalings yet: the K-FAC eigenvalues
            return super().precondition(members, st, V, damping)
        if "lamA" in st and "QA" not in st:     # diagonal A
            return ops.kron_precondition_diag(V, st["QG"], st["S"], float(damping),
                                              return_dot=True,
                                              backend=self.backend("kron_precondition_diag"))
        return ops.ekfac_precondition(V, st["QG"], st["QA"], st["S"], damping, return_dot=True,
                                      backend=self.backend("ekfac_precondition"))

    def plan(self, members, st, damping: float):
        if "S" not in st:
            return super().plan(members, st, damping)
        diag = "lamA" in st and "QA" not in st
        op = "kron_precondition_diag" if diag else "ekfac_precondition"
        if not self.torch_path(op, st["QG"].device):
            return None
        R = reciprocal_or_zero(pinv_cut(st["S"], damping, 2) + float(damping))
        return two_sided(st["QG"], None if diag else st["QA"], R, batched=True)

    def plan_reads_factors(self) -> bool:
        return True       # the scalings move with every factor update

    # ---------------------------------------------------------------- per-step statistics
    def on_pass(self, b, inputs, grads, calls, alpha, n: int, basis_replaced: bool) -> None:
        """Fold one backward pass into the block's S_hat in the CURRENT eigenbasis, or, when that
        basis is replaced in this step's inverse update (or does not exist yet), keep the pass
        until the new basis exists (:meth:`after_decomposition` computes S from it)."""
        self._n[b] = n
        if basis_replaced or "QG" not in b.inverse or "S" not in b.inverse:
            self._stash[b].append((list(inputs), list(grads), list(calls), alpha))
            return
        part = b.ekfac_sums(inputs, grads, calls, b.inverse["QG"], b.inverse.get("QA"))
        part = part.to(b.factor_dtype) * alpha
        self._s_hat[b] = part if b not in self._s_hat else self._s_hat[b] + part

    def close_micro_batch(self, b, weight: float) -> None:
        if b in self._s_hat:
            s = self._s_hat.pop(b) * weight
            self._acc[b] = s if b not in self._acc else self._acc[b] + s
        stash, done = self._stash.get(b, []), self._closed.get(b, 0)
        stash[done:] = [(x, g, c, alpha * weight) for x, g, c, alpha in stash[done:]]
        self._closed[b] = len(stash)

    def finish_micro_batches(self, b, final, examples: int) -> None:
        if b in self._acc:
            s = self._acc.pop(b)
            self._s_hat[b] = s * (final.to(s.dtype) if isinstance(final, torch.Tensor) else final)
        if b in self._stash:
            self._stash[b] = [(x, g, c, alpha * final) for x, g, c, alpha in self._stash[b]]
        self._closed.pop(b, None)
        self._n[b] = examples

    def _reduce(self, comm, s_hats):
        """Combine estimates across processes (identity without communication), weighted by each
        rank's example count like G."""
        if not s_hats:
            return s_hats
        return comm.reduce_scalings(s_hats, {b: self._n.get(b, 0) for b in s_hats})

    def after_factor_update(self, blocks, reject, comm) -> None:
        """S <- rho S + (1 - rho) S_hat, rho = min(1 - 1/k, ema_decay), k counting accepted
        estimates since the eigenbasis last changed; on the device, guarded like the factors."""
        s_hats = OrderedDict((b, self._s_hat.pop(b)) for b in blocks if b in self._s_hat)
        for b, s_hat in self._reduce(comm, s_hats).items():
            ok = torch.isfinite(s_hat).all()
            if reject is not None:      # the whole step was rejected
                ok = ok & ~reject.to(ok.device)
            # in place: S may be a view of a stack (kfac_kernels.averaging)
            b.state.average_scalings(s_hat, ok, self.opts.ema_decay)

    def after_decomposition(self, blocks, comm) -> None:
        """S restarts in the new eigenbasis, from this step's statistics (kept by
        :meth:`on_pass`) when there are any, else from the K-FAC eigenvalues lamG lamA^T."""
        ests: "OrderedDict[object, torch.Tensor]" = OrderedDict()
        for b in blocks:
            inv = b.inverse
            for inputs, grads, calls, alpha in self._stash.pop(b, []):
                part = b.ekfac_sums(inputs, grads, calls, inv["QG"], inv.get("QA"))
                part = part.to(b.factor_dtype) * alpha
                ests[b] = part if b not in ests else ests[b] + part
        ests = self._reduce(comm, ests)      # over ranks (identity in one process)
        for b in blocks:
            inv = b.inverse
            lamA = inv["lamA"].clamp_min(0)
            init = inv["lamG"].clamp_min(0).unsqueeze(-1) * lamA.unsqueeze(-2)
            est = ests.get(b)
            dev = init.device
            if est is None:
                b.state.restart_scalings(init, torch.zeros((), dtype=b.factor_dtype, device=dev))
            else:
                ok = torch.isfinite(est).all()
                b.state.restart_scalings(torch.where(ok, est, init), ok.to(b.factor_dtype))
        self._stash = defaultdict(list)

    def end_step(self) -> None:
        self._stash = defaultdict(list)
        self._acc, self._closed = {}, {}

    def drop_capture(self) -> None:
        """The step's captures were dropped (stale): forget their stashed passes."""
        self._stash = defaultdict(list)
        self._s_hat = {}
        self._acc, self._closed = {}, {}

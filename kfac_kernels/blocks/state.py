"""The saved state of one block, as one record with its transitions.

What a block carries from step to step (and into a checkpoint) is a :class:`BlockState`: the
running factors ``A`` and ``G``, their counters, the decompositions of the inverse kind and
EKFAC's scalings counter. The block holds it (``block.state``) and reads it through read-only
properties (``block.A`` is ``block.state.A``: no copy, no extra tensor call). Every change goes
through a method of the record, named after the transition it is:

* the running factors: :meth:`~BlockState.start_factors` (the first estimate arrives),
  :meth:`~BlockState.average_factors` (the guarded running average of one block),
  :meth:`~BlockState.rebind_factor` (the arena makes a factor a view of its flat buffer),
  :meth:`~BlockState.share_counters` (the batched merge makes the counters views of its
  vectors), :meth:`~BlockState.restart_factor` (a non-finite factor starts over);
* the decompositions: :meth:`~BlockState.set_decomposition` (new entries, all or some),
  :meth:`~BlockState.put_entries` (entries computed beside them: a diagonal side's
  eigenvalues, Eigen-Adam's moments), :meth:`~BlockState.clear_decomposition`;
* EKFAC's scalings: :meth:`~BlockState.restart_scalings` (a new eigenbasis),
  :meth:`~BlockState.average_scalings`;
* a checkpoint: :meth:`~BlockState.saved` and :meth:`~BlockState.load` (the state_dict
  entry's format: ``A``, ``G``, ``count``, ``skipped``, ``inverse``, ``ekfac_count``).

In-place arithmetic on the tensors the record holds (the batched running average over the
arena's buffer, a shape group's stacked decompositions, EKFAC's and Eigen-Adam's in-place
updates of entries that are views of a stack) changes values, not the record: those tensors are
the record's, shared on purpose.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

import torch

from ..averaging import running_average_

__all__ = ["BlockState"]


@dataclass(eq=False)
class BlockState:
    """A block's running factors, counters and decompositions (see the module docstring).

    ``A``, ``G``: the running factors (None before the first accepted estimate was folded in);
    ``count``: accepted factor estimates, a 0-d device tensor of the factor dtype (the weight of
    the first-estimate rule); ``skipped``: estimates rejected (non-finite statistics or a
    rejected step), int64; ``inverse``: the inverse kind's entries ({"QA", "lamA", "QG", "lamG"},
    {"A_inv", "G_inv"}, plus "S" for EKFAC or "M2", "t" for Eigen-Adam), keyed by name;
    ``ekfac_count``: EKFAC's accepted scalings estimates since the eigenbasis changed."""
    A: Optional[torch.Tensor] = None
    G: Optional[torch.Tensor] = None
    count: Optional[torch.Tensor] = None
    skipped: Optional[torch.Tensor] = None
    inverse: Dict[str, torch.Tensor] = field(default_factory=dict)
    ekfac_count: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ running factors
    def start_factors(self, A_hat: torch.Tensor, G_hat: torch.Tensor,
                      storage: Optional[torch.dtype], count_dtype: torch.dtype) -> None:
        """Zero factors shaped like the first estimates (in ``storage`` when given, else the
        estimates' dtype) and zero counters: the first accepted estimate then replaces them."""
        dev = A_hat.device
        self.A = torch.zeros_like(A_hat, dtype=storage or A_hat.dtype)
        self.G = torch.zeros_like(G_hat, dtype=storage or G_hat.dtype)
        self.count = torch.zeros((), dtype=count_dtype, device=dev)
        self.skipped = torch.zeros((), dtype=torch.int64, device=dev)

    def average_factors(self, A_hat: torch.Tensor, G_hat: torch.Tensor, ok: torch.Tensor,
                        ema_decay: float) -> None:
        """Fold one step's estimates into the factors (guarded running average,
        :func:`kfac_kernels.averaging.running_average_`); a rejected estimate (``ok`` false)
        counts in ``skipped``. The estimates are cleaned in place."""
        assert self.A is not None and self.G is not None and self.count is not None
        assert self.skipped is not None
        self.count = running_average_((self.A, self.G), (A_hat, G_hat), ok, self.count,
                                      ema_decay)
        self.skipped = self.skipped + (~ok).to(torch.int64)

    def rebind_factor(self, which: str, view: torch.Tensor) -> None:
        """Keep factor ``which`` ("A" or "G") in ``view`` from now on (a region of the arena's
        running-factor buffer): its values are copied in, and the record holds the view."""
        cur = self.A if which == "A" else self.G
        assert cur is not None
        if cur is view:
            return
        view.copy_(cur)
        if which == "A":
            self.A = view
        else:
            self.G = view

    def share_counters(self, count: torch.Tensor, skipped: torch.Tensor) -> None:
        """Hold ``count`` / ``skipped`` as given: entries of the batched merge's [blocks]
        vectors (views updated in place with every block's at once), holding the same values."""
        self.count, self.skipped = count, skipped

    def restart_factor(self, which: str) -> None:
        """Factor ``which`` starts over: zeros, and the counter back to 0 so that the next
        accepted estimate is taken whole (the first-estimate rule; the other factor shares the
        counter and is replaced with it)."""
        assert self.count is not None
        if which == "A":
            assert self.A is not None
            self.A = torch.zeros_like(self.A)
        else:
            assert self.G is not None
            self.G = torch.zeros_like(self.G)
        self.count = torch.zeros_like(self.count)

    # ------------------------------------------------------------------ decompositions
    def set_decomposition(self, entries: Dict[str, torch.Tensor], *,
                          keep_others: bool = False) -> None:
        """New decomposition entries: they replace all the old ones, or with ``keep_others``
        only those of the same name (a decomposition of one factor, entries shared by another
        rank). The record holds a new dict: views handed out of the old one stay as they were."""
        self.inverse = {**self.inverse, **entries} if keep_others else entries

    def put_entries(self, entries: Mapping[str, torch.Tensor]) -> None:
        """Add or replace entries in the current decomposition dict (entries computed beside a
        decomposition: a diagonal side's eigenvalues, Eigen-Adam's second moment)."""
        self.inverse.update(entries)

    def clear_decomposition(self) -> None:
        """No decomposition on this process (not computed yet, or held by another rank)."""
        self.inverse = {}

    # ------------------------------------------------------------------ EKFAC scalings
    def restart_scalings(self, S: torch.Tensor, count: torch.Tensor) -> None:
        """EKFAC's scalings in a new eigenbasis: ``S`` and its counter of accepted estimates."""
        self.inverse["S"] = S
        self.ekfac_count = count

    def average_scalings(self, S_hat: torch.Tensor, ok: torch.Tensor, ema_decay: float) -> None:
        """Fold one step's scalings estimate into ``S`` (in place: ``S`` may be a view of a shape
        group's stack) under the guarded running average."""
        assert self.ekfac_count is not None
        self.ekfac_count = running_average_((self.inverse["S"],), (S_hat,), ok,
                                            self.ekfac_count, ema_decay)

    # ------------------------------------------------------------------ checkpoints
    def saved(self) -> dict:
        """The state_dict entry's saved state (copies), empty before the first factor update."""
        if self.A is None:
            return {}
        assert self.G is not None and self.count is not None and self.skipped is not None
        entry = dict(A=self.A.clone(), G=self.G.clone(), count=self.count.clone(),
                     skipped=self.skipped.clone(),
                     inverse={k: v.clone() for k, v in self.inverse.items()})
        if self.ekfac_count is not None:
            entry["ekfac_count"] = self.ekfac_count.clone()
        return entry

    def load(self, entry: Mapping, device: torch.device, *, with_inverse: bool,
             count_dtype: torch.dtype) -> None:
        """The saved state of a state_dict entry (tensors moved to ``device``, dtypes kept: never
        cast to the parameter dtype); ``with_inverse`` false drops the decompositions (saved
        with another inverse kind). An entry without factors resets the record. Scalings saved
        without their counter (older checkpoints) count as one estimate."""
        if "A" not in entry:
            self.A = self.G = self.count = self.skipped = None
            self.inverse = {}
            self.ekfac_count = None
            return
        self.A, self.G = entry["A"].to(device), entry["G"].to(device)
        self.count, self.skipped = entry["count"].to(device), entry["skipped"].to(device)
        self.inverse = ({k: v.to(device) for k, v in entry["inverse"].items()}
                        if with_inverse else {})
        self.ekfac_count = (entry["ekfac_count"].to(device)
                            if with_inverse and "ekfac_count" in entry else None)
        if self.ekfac_count is None and "S" in self.inverse:
            self.ekfac_count = torch.ones((), dtype=count_dtype, device=device)

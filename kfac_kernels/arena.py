"""One flat buffer for this step's factor estimates and one for the running factors.

A model with many small layers spends its factor update on per-factor calls: clean the
estimate, scale the old factor, add the new one, check finiteness, twelve to sixteen times. Here
the estimates of one dtype and device are written (by the syrk jobs of
:class:`kfac_kernels.factors.FactorStatistics`) into regions of one zero-padded buffer laid out
as the previous step asked for them, the running factors live in a second buffer of the same
layout (``block.A`` / ``block.G`` are views of it), and the guarded running average of all blocks
is a handful of calls over the two buffers (:meth:`Arena.average`, with the weights of
:mod:`kfac_kernels.averaging`).

Every region starts on a multiple of ``CHUNK`` elements, so the buffers are ``[chunks, CHUNK]``
matrices in which each row belongs to one block: a block's averaging weight is broadcast over
its rows from a [chunks] vector (no per-element weight vector), and the finiteness of a block's
statistics is the finiteness of the sum of its rows.

The layout follows what was asked for: a region is handed out at most once between two
``release()`` calls (the end of a factor step, :meth:`kfac_kernels.capture.Capture.reset`), and a
request the layout does not have gets a fresh tensor and changes the layout from the next step
on. :meth:`kfac_kernels.factors.FactorStatistics.merge` takes the flat path
(:meth:`Arena.flat_layout`, :meth:`Arena.adopt`, :meth:`Arena.finite`, :meth:`Arena.average`)
only when the step's estimates are exactly the regions handed out (one buffer, every region
claimed by its block): gradient accumulation, estimates combined by a distributed strategy,
diagonal factors and the like take its per-block path.

Memory: the running-factor buffer is the factors themselves (plus row padding, under CHUNK
entries per factor). The estimate buffer is kept from one factor step to the next when factors
are updated every step, and freed after each merge otherwise (:meth:`Arena.drop_estimates`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .averaging import blend_

__all__ = ["Arena", "CHUNK"]

CHUNK = 256        # row length of the buffers; each region is padded to whole rows


def _rows(numel: int) -> int:
    return -(-numel // CHUNK)


class ArenaLayout:
    """Regions of one buffer (one dtype and device): key -> (first row, shape)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.regions: Dict[tuple, Tuple[int, torch.Size]] = {}
        self.rows = 0
        self.buffer: Optional[torch.Tensor] = None         # the estimates
        self.factors: Optional[torch.Tensor] = None        # the running factors
        self.views: Dict[tuple, torch.Tensor] = {}         # running-factor views by key
        self.hats: Dict[tuple, torch.Tensor] = {}          # estimate views by key
        self.row_owner: Optional[tuple] = None              # (blocks, [rows] block index)

    def add(self, key: tuple, shape: torch.Size) -> None:
        self.regions[key] = (self.rows, shape)
        self.rows += _rows(shape.numel())

    def region(self, flat: torch.Tensor, key: tuple) -> torch.Tensor:
        row, shape = self.regions[key]
        return flat.view(-1)[row * CHUNK: row * CHUNK + shape.numel()].view(shape)


class Arena:
    """The estimate and running-factor buffers of one :class:`FactorStatistics` (the storage
    dtype of the running factors is passed to :meth:`adopt`)."""

    def __init__(self):
        self.layouts: Dict[tuple, ArenaLayout] = {}  # (dtype, device) -> layout
        self.asked: List[tuple] = []                 # (key, shape, dtype, device) this step
        self.handed: Dict[tuple, tuple] = {}         # key -> (estimate view, layout) this step
        self.closed: Dict[tuple, tuple] = {}         # what the last step handed out

    # ------------------------------------------------------------------ estimates
    def take(self, key: tuple, shape: Sequence[int], dtype: torch.dtype,
             device: torch.device) -> Optional[torch.Tensor]:
        """The region for ``key`` (e.g. ``("A_hat", block)``) in this step's estimate buffer, or
        None when the layout has no such region or it was already handed out this step (then
        the caller allocates and the layout changes from the next step)."""
        size = torch.Size(shape)
        self.asked.append((key, size, dtype, device))
        lay = self.layouts.get((dtype, device))
        if lay is None or key in self.handed or lay.regions.get(key, (0, None))[1] != size:
            return None
        if lay.buffer is None:          # padding stays zero: it must be finite
            lay.buffer = torch.zeros(lay.rows, CHUNK, dtype=dtype, device=device)
        view = lay.hats.get(key)
        if view is None:
            view = lay.hats[key] = lay.region(lay.buffer, key)
        self.handed[key] = (view, lay)
        return view

    def release(self) -> None:
        """End of a factor step (before its merge, which reads what it handed out): every
        region may be handed out again; a step that asked for
        another set of regions than the layout holds lays the buffers out anew (a step that
        asked for nothing, e.g. one without factor work, changes nothing)."""
        asked, self.asked, self.closed, self.handed = self.asked, [], self.handed, {}
        if not asked:
            return
        want: Dict[tuple, List[Tuple[tuple, torch.Size]]] = {}
        seen = set()
        for key, shape, dtype, device in asked:
            if key not in seen:
                seen.add(key)
                want.setdefault((dtype, device), []).append((key, shape))
        have = {bk: [(k, s) for k, (_, s) in lay.regions.items()]
                for bk, lay in self.layouts.items()}
        if want == have:
            return
        self.layouts = {}
        for bk, regions in want.items():
            lay = self.layouts[bk] = ArenaLayout(*bk)
            for key, shape in regions:
                lay.add(key, shape)

    def drop_estimates(self) -> None:
        """Free the estimate buffers after a merge (kept: the layout and the running factors).
        With factors every step the buffer is reused at once and stays; with ``factor_every >
        1`` it is freed until the next factor step, so the memory between factor steps is what
        it was without flat buffers."""
        self.closed = {}
        for lay in self.layouts.values():
            lay.buffer, lay.hats = None, {}

    # ------------------------------------------------------------------ running average
    def flat_layout(self, stats) -> Optional[ArenaLayout]:
        """The layout whose regions are exactly this step's estimates ``{block: (A_hat,
        G_hat)}``, or None (then the per-block path merges them)."""
        handed = self.closed
        if len(self.layouts) != 1 or len(handed) != 2 * len(stats):
            return None
        lay = next(iter(self.layouts.values()))
        if len(lay.regions) != len(handed):
            return None
        none = (None, None)
        for b, (a_hat, g_hat) in stats.items():
            (a, la), (g, lg) = handed.get(("A_hat", b), none), handed.get(("G_hat", b), none)
            if a is not a_hat or g is not g_hat or la is not lay or lg is not lay:
                return None
        return lay

    def adopt(self, lay: ArenaLayout, blocks, storage: Optional[torch.dtype]) -> None:
        """Make each block's running factors views of the layout's factor buffer (copying them
        in the first time, after a new layout, a restart or load_state_dict)."""
        if lay.factors is None:
            lay.factors = torch.zeros(lay.rows, CHUNK, dtype=storage or lay.dtype,
                                      device=lay.device)
            lay.views = {}
        for b in blocks:
            for name in ("A", "G"):
                key = (name + "_hat", b)
                if getattr(b, name) is lay.views.get(key):
                    continue
                view = lay.views[key] = lay.region(lay.factors, key)
                b.state.rebind_factor(name, view)     # copies the factor in

    def row_owners(self, lay: ArenaLayout, blocks: List) -> torch.Tensor:
        """[rows] index of the block (in ``blocks``' order) that owns each row."""
        cache = lay.row_owner
        if cache is not None and cache[0] == blocks:
            return cache[1]
        owner = torch.zeros(lay.rows, dtype=torch.long)
        index = {b: i for i, b in enumerate(blocks)}
        for (name, b), (row, shape) in lay.regions.items():
            owner[row: row + _rows(shape.numel())] = index[b]
        owner = owner.to(lay.device)
        lay.row_owner = (list(blocks), owner)
        return owner

    @staticmethod
    def finite(lay: ArenaLayout, owner: torch.Tensor, nblocks: int,
               dtype: torch.dtype) -> torch.Tensor:
        """[blocks] whether each block's estimates are finite: a sum is finite iff every entry
        is (or it overflowed, which also deserves rejecting)."""
        assert lay.buffer is not None          # take() made it this step
        sums = torch.zeros(nblocks, dtype=dtype, device=lay.device)
        sums.index_add_(0, owner, lay.buffer.sum(1, dtype=dtype))
        return torch.isfinite(sums)

    @staticmethod
    def average(lay: ArenaLayout, owner: torch.Tensor, keep: torch.Tensor,
                fresh: torch.Tensor) -> None:
        """``F <- keep F + fresh F_hat`` for every block at once (``keep``, ``fresh``: [blocks];
        1 and 0 on a rejected update). The estimates are cleaned first so that 0 * F_hat is 0."""
        hat, old = lay.buffer, lay.factors
        assert hat is not None and old is not None    # take() and adopt() made them
        w = torch.stack((keep, fresh)).to(hat.dtype)[:, owner].unsqueeze(-1)   # [2, rows, 1]
        blend_(old, hat, w[0], w[1])

"""Factor statistics: batched syrk jobs, this step's A/G estimates, the guarded running average.

Blocks describe their statistics as :class:`kfac_kernels.blocks.SyrkJob` s; this part runs them
with one ``ops.syrk_update`` per distinct input (identical inputs, e.g. the q/k/v projections of
one activation, computed once), writing into the regions of the flat estimate buffer of
:mod:`kfac_kernels.arena`, and folds the step's estimates into the running factors on the
device: ``F <- rho F + (1 - rho) F_hat``, ``rho = min(1 - 1/k, ema_decay)`` with k counting the
block's accepted updates (first-estimate rule), skipped where the statistics are not finite or the
step was rejected: over the flat buffers in a fixed number of calls when the estimates fill one
layout, block by block otherwise (same arithmetic). No host synchronisation.
"""
from __future__ import annotations

import dataclasses

from collections import OrderedDict, defaultdict
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple, cast

import torch

from . import ops
from ._numerics import flush_all_
from .arena import Arena
from .averaging import blend_, first_estimate_weights
from .blocks import Block, SyrkJob
from .capture_state import BlockCapture

if TYPE_CHECKING:    # for the annotations only
    from .health import Health
    from .options import Options

#: ``of(block)`` -> the block's capture record of this step (``Capture.of``)
CaptureOf = Callable[[Block], BlockCapture]

__all__ = ["FactorStatistics", "diag_update"]

#: a step's estimates ``{block: (A_hat, G_hat)}`` (what the strategies' ``factor_statistics``
#: return)
Estimates = Dict[Block, Tuple[torch.Tensor, torch.Tensor]]


def _count(b: Block) -> torch.Tensor:
    """``b.count`` where it is set (a merge reads it after ``_init`` made it)."""
    return cast(torch.Tensor, b.count)


def _skipped(b: Block) -> torch.Tensor:
    """``b.skipped`` where it is set (as :func:`_count`)."""
    return cast(torch.Tensor, b.skipped)


def diag_update(out: torch.Tensor, x: torch.Tensor, alpha: float, beta: float,
                homogeneous: bool) -> None:
    """``out <- beta out + alpha diag(xbar^T xbar)`` in place: the diagonal that a syrk job
    would write (``xbar = [x, 1]`` when ``homogeneous``), i.e. the sum over the rows of ``x`` of
    its squared entries, without the n x n matrix (``out``: [..., n(+1)], ``x``: [..., rows,
    n]). The sum of squares is taken as a squared norm, a reduction that makes no [rows, n]
    temporary."""
    n, rows = x.shape[-1], x.shape[-2]
    sq = torch.linalg.vector_norm(x, dim=-2, dtype=out.dtype).square_().mul_(alpha)
    body = out[..., :n]
    if beta == 0.0:
        body.copy_(sq)
    else:
        body.mul_(beta).add_(sq)
    if homogeneous:
        last = out[..., n]
        if beta == 0.0:
            last.fill_(alpha * rows)
        else:
            last.mul_(beta).add_(alpha * rows)


class FactorStatistics:
    """The factor phase of one engine (options: ``loss_reduction``, ``ema_decay``,
    ``factor_storage_dtype``; ``backend(op)``: the backend to ask for; ``health``: warn-once)."""

    def __init__(self, opts: Options, health: Health, backend: Callable[[str], str]):
        self.opts = opts
        self.health = health
        self.backend = backend
        self.arena = Arena()
        self._row_offsets = 0       # calls of run_jobs with row subsampling so far

    def subsample(self, job: SyrkJob) -> SyrkJob:
        """``factor_max_rows``: the job on every k-th row of its input (k = ceil(rows / max),
        from an offset that moves with each call), its alpha scaled by k: the k offsets
        partition the rows, so the mean of the k estimates is exactly the full sum's (and the
        estimate from a uniformly drawn offset is unbiased). Jobs within the limit are returned
        as they are."""
        cap = self.opts.factor_max_rows
        rows = job.x.shape[-2] if job.x.dim() >= 2 else 0
        if cap is None or rows <= cap:
            return job
        k = -(-rows // cap)
        x = job.x[..., (self._row_offsets % k)::k, :]
        return dataclasses.replace(job, x=x, alpha=job.alpha * k)

    # ------------------------------------------------------------------ scales
    def g_scale(self, n: int, weight: float, empirical: bool, positions: int = 1) -> float:
        """Scale turning captured output-gradients into the g_n of the metric (docs/math.md): a
        batch-mean loss gives grad = g_n / N, so "empirical" multiplies by N; a summed loss is
        N times the mean loss, so its curvature is N times larger; a mean over examples and
        their ``positions`` ("token_mean") has the metric of the per-example mean divided by the
        positions, and its gradients carry 1 / (N positions)."""
        red = self.opts.loss_reduction
        if red == "token_mean":
            return weight * float(n) * float(n) * positions if empirical else weight / positions
        mean = red == "mean"
        c = float(n) if (empirical and mean) else 1.0
        total = float(n) if not mean else 1.0
        return weight * c * c * total

    def micro_batch_weight(self, n: int, empirical: bool) -> float:
        """Gradient accumulation: the weight of a micro-batch of ``n`` examples, so that
        ``micro_batch_final(N) * sum_i weight_i G_i`` is the G of one step on the concatenated
        batch, each G_i normalised as a step of its own (:meth:`g_scale`). A batch-mean loss
        ("mean", "token_mean"): "fisher"/"ggn" average the micro-batches by size (n, then 1/N);
        "empirical" rescales output-gradients that carry the big batch's 1/N (1/n, then N). A
        summed loss adds them (1, 1)."""
        if self.opts.loss_reduction == "sum":
            return 1.0
        return 1.0 / n if empirical else float(n)

    def micro_batch_final(self, total: int, empirical: bool) -> float:
        """The factor on the weighted sum of :meth:`micro_batch_weight` (``total`` examples)."""
        if self.opts.loss_reduction == "sum":
            return 1.0
        return float(total) if empirical else 1.0 / total

    # ------------------------------------------------------------------ batched syrk
    def run_jobs(self, jobs: List[Tuple[Block, SyrkJob]], target: str,
                 into: Optional[Dict[Block, Optional[torch.Tensor]]] = None
                 ) -> Dict[Block, torch.Tensor]:
        """Execute syrk jobs, grouped by shape; returns {block: result}.

        ``target`` names the estimate ("A_hat" or "G_hat": the arena region the results go
        to). ``into``: each block's estimate so far, which its jobs accumulate into; a block's
        first job initialises its result (beta = 0) when it has none. Identical initialising
        jobs (the same input tensor feeding several layers) are computed once, except for G."""
        out: Dict[Block, torch.Tensor] = {b: t for b, t in (into or {}).items() if t is not None}
        if self.opts.factor_max_rows is not None:
            jobs = [(b, self.subsample(j)) for b, j in jobs]
            self._row_offsets += 1
        first: Dict[Block, bool] = {}
        ordered = []
        for block, job in jobs:
            init = block not in first and block not in out
            first[block] = True
            ordered.append((block, job, init))
        # the initialising jobs run first, then the accumulating ones
        for phase in (True, False):
            groups: Dict[tuple, List[Tuple[Block, SyrkJob]]] = OrderedDict()
            for block, job, init in ordered:
                if init != phase:
                    continue
                x = job.x
                key = (tuple(x.shape), x.dtype, x.device, job.homogeneous, job.alpha,
                       block.factor_dtype, job.diag)
                groups.setdefault(key, []).append((block, job))
            for members in groups.values():
                if phase:
                    self._run_init(members, target, out)
                else:
                    self._run_accumulate(members, out)
        return out

    def _run_init(self, members, target: str, results: Dict[Block, torch.Tensor]) -> None:
        """One syrk per distinct input, into the block's region of the arena
        (:mod:`kfac_kernels.arena`) when the layout has it, else into a new tensor; blocks fed
        the same input tensor (e.g. q/k/v projections of one activation) share one result."""
        x0 = members[0][1].x
        d = x0.shape[-1] + int(members[0][1].homogeneous)
        diag = members[0][1].diag
        shape = (*x0.shape[:-2], d) if diag else (*x0.shape[:-2], d, d)
        dtype = members[0][0].factor_dtype
        alpha, hom = members[0][1].alpha, members[0][1].homogeneous
        backend = self.backend("syrk_update")
        done: Dict[tuple, torch.Tensor] = {}
        for block, job in members:
            x = job.x
            key = (x.data_ptr(), tuple(x.stride()), tuple(x.shape))
            out = done.get(key) if target != "G_hat" else None
            if out is None:
                out = self.arena.take((target, block), shape, dtype, x.device)
                if out is None:
                    out = torch.empty(shape, dtype=dtype, device=x.device)
                if diag:
                    diag_update(out, x, alpha, 0.0, hom)
                else:
                    ops.syrk_update(out, x, alpha=alpha, beta=0.0, homogeneous=hom,
                                    backend=backend)
                done[key] = out
            results[block] = out

    def _run_accumulate(self, members, results: Dict[Block, torch.Tensor]) -> None:
        """Accumulation into distinct targets: one call each."""
        for block, job in members:
            t = results[block]
            if not t.is_contiguous():
                t = t.contiguous()
            if job.diag:
                diag_update(t, job.x, job.alpha, 1.0, job.homogeneous)
            else:
                ops.syrk_update(t, job.x, alpha=job.alpha, beta=1.0,
                                homogeneous=job.homogeneous, backend=self.backend("syrk_update"))
            results[block] = t

    # ------------------------------------------------------------------ this step's estimates
    def statistics(self, captured: List[Block], of: CaptureOf) -> "OrderedDict[Block, Tuple]":
        """This step's estimates {block: (A_hat, G_hat)} from the captured inputs and the folded
        output-gradients (batched syrk / conv_input_factor); ``of(block)``: the block's capture
        record (:meth:`kfac_kernels.capture.Capture.of`)."""
        a_hats = self.a_statistics(captured, of)
        stats: "OrderedDict[Block, Tuple]" = OrderedDict()
        for b in captured:
            g_hat = of(b).G_hat
            if g_hat is None:   # no gradient reached this module this step: nothing to learn
                continue
            stats[b] = (a_hats[b], g_hat)
        return stats

    def a_statistics(self, captured: List[Block], of: CaptureOf
                     ) -> "OrderedDict[Block, torch.Tensor]":
        """This step's A_hat of each captured block (batched), in the block's factor dtype."""
        a_jobs, a_ready = [], {}
        combined: Dict[Block, torch.Tensor] = {
            b: a for b in captured if (a := of(b).A_ready) is not None}
        for b in captured:
            if b in combined:      # gradient accumulation: the micro-batches' combined estimate
                continue
            jobs, mat = b.a_jobs(of(b).inputs)
            a_jobs += [(b, j) for j in jobs]
            if mat is not None:
                a_ready[b] = mat
        done = self.run_jobs(a_jobs, target="A_hat")
        a_hats: "OrderedDict[Block, torch.Tensor]" = OrderedDict()
        for b in captured:
            if b in combined:
                a_hats[b] = combined[b]
                continue
            ready, batched = a_ready.get(b), done.get(b)
            if ready is not None and batched is not None:
                a_hat = ready + batched
            elif ready is not None:     # a ready-made matrix (conv, embedding): into the arena
                a_hat = ready
                view = self.arena.take(("A_hat", b), a_hat.shape, b.factor_dtype, a_hat.device)
                if view is not None:
                    a_hat = view.copy_(a_hat)
            else:
                a_hat = done[b]
            a_hats[b] = a_hat if a_hat.dtype == b.factor_dtype else a_hat.to(b.factor_dtype)
        return a_hats

    # ------------------------------------------------------------------ running average
    def merge(self, stats: Estimates, reject: Optional[torch.Tensor]
              ) -> Optional[torch.Tensor]:
        """Fold the step's estimates into the running factors (guarded, no host sync). Returns
        the [blocks] device flags of non-finite statistics (None when nothing was merged). With
        ``factor_every > 1`` the estimate buffers are freed afterwards (see
        :meth:`kfac_kernels.arena.Arena.drop_estimates`)."""
        try:
            bad = self._merge_all(stats, reject)
            # no subnormal numbers in the running factors (they slow every product after)
            flush_all_(t for b in stats for t in (b.A, b.G))
            return bad
        finally:
            if self.opts.factor_every > 1:
                self.arena.drop_estimates()

    def _merge_all(self, stats: Estimates, reject: Optional[torch.Tensor]
                   ) -> Optional[torch.Tensor]:
        """:meth:`merge` itself: over the flat buffers when the estimates fill one layout
        (:mod:`kfac_kernels.arena`); otherwise blocks whose counters share a device and dtype
        (the usual case) are merged together:
        one finiteness check, one counter update and one vector of averaging weights for all,
        then two in-place calls per factor."""
        if not stats:
            return None
        blocks = list(stats)
        for b, (a_hat, g_hat) in stats.items():
            if b.A is None:
                self._init(b, a_hat, g_hat)
        lay = self.arena.flat_layout(stats)
        if lay is not None and len({(_count(b).device, _count(b).dtype) for b in blocks}) == 1:
            return self._merge_flat(lay, blocks, reject)
        if len({(_count(b).device, _count(b).dtype) for b in blocks}) > 1:
            # every verdict before any merge: merging cleans its (possibly shared) estimates
            oks = [self._finite(a_hat, g_hat) for a_hat, g_hat in stats.values()]
            return torch.stack([self._merge(b, a_hat, g_hat, ok, reject)
                                for (b, (a_hat, g_hat)), ok in zip(stats.items(), oks)])
        # a sum is finite iff every entry is (or it overflowed, which also deserves rejecting)
        sums = torch.stack([t.sum(dtype=_count(b).dtype) for b, hats in stats.items()
                            for t in hats])
        ok = torch.isfinite(sums.view(-1, 2).sum(1))
        ok, bad_stats, keep, fresh = self._weights(blocks, ok, reject)
        for i, (b, hats) in enumerate(stats.items()):
            k, f = keep[i], fresh[i]
            for name, hat in zip(("A", "G"), hats):
                blend_(getattr(b, name), hat, k, f)
        return bad_stats

    def _merge_flat(self, lay, blocks: List[Block], reject: Optional[torch.Tensor]
                    ) -> torch.Tensor:
        """:meth:`merge` of estimates that fill one arena layout: the same rule in a fixed
        number of calls, whatever the number of blocks."""
        self.arena.adopt(lay, blocks, self.opts.factor_storage_dtype)
        owner = self.arena.row_owners(lay, blocks)
        ok = self.arena.finite(lay, owner, len(blocks), _count(blocks[0]).dtype)
        ok, bad_stats, keep, fresh = self._weights(blocks, ok, reject)
        self.arena.average(lay, owner, keep, fresh)
        return bad_stats

    def _weights(self, blocks: List[Block], ok: torch.Tensor, reject: Optional[torch.Tensor]):
        """From the [blocks] finiteness verdicts: the accepted flags, the flags to warn about
        (non-finite, not rejected as a whole step), the counters' update, and the averaging
        weights ``keep`` / ``fresh`` (first-estimate rule; 1 / 0 where not accepted)."""
        bad_stats = ~ok
        if reject is not None:
            r = reject.to(ok.device)
            ok = ok & ~r
            bad_stats = bad_stats & ~r
        counts, skipped = self._counters(blocks)
        _, keep, fresh = first_estimate_weights(counts, ok, self.opts.ema_decay, in_place=True)
        skipped.add_((~ok).to(skipped.dtype))
        return ok, bad_stats, keep, fresh

    def _counters(self, blocks: List[Block]) -> Tuple[torch.Tensor, torch.Tensor]:
        """[blocks] vectors whose entries ARE ``b.count`` / ``b.skipped`` (views, updated in
        place); rebuilt when the block set changed or a counter was replaced (restart,
        load_state_dict)."""
        cache = getattr(self, "_counter_cache", None)
        if (cache is None or cache[0] != blocks
                or any(b.count is not c or b.skipped is not k
                       for b, c, k in zip(blocks, cache[3], cache[4]))):
            counts = torch.stack([_count(b) for b in blocks])
            skipped = torch.stack([_skipped(b) for b in blocks])
            cv, kv = list(counts.unbind(0)), list(skipped.unbind(0))
            for b, c, k in zip(blocks, cv, kv):
                b.state.share_counters(c, k)
            cache = self._counter_cache = (list(blocks), counts, skipped, cv, kv)
        return cache[1], cache[2]

    def _init(self, b: Block, A_hat: torch.Tensor, G_hat: torch.Tensor) -> None:
        b.state.start_factors(A_hat, G_hat, self.opts.factor_storage_dtype, b.factor_dtype)

    @staticmethod
    def _finite(A_hat: torch.Tensor, G_hat: torch.Tensor) -> torch.Tensor:
        """One reduction per factor: a sum is finite iff every entry is (or it overflowed, which
        also deserves rejecting)."""
        return torch.isfinite(A_hat.sum() + G_hat.sum())

    def _merge(self, b: Block, A_hat: torch.Tensor, G_hat: torch.Tensor, ok: torch.Tensor,
               reject: Optional[torch.Tensor]) -> torch.Tensor:
        """Running average with the first-estimate rule, skipped on non-finite statistics or a
        rejected step. Returns whether the statistics were not finite (warned about); a step
        rejected as a whole (``reject``, reported by the optimiser) is counted in ``skipped``
        only."""
        if b.A is None:
            self._init(b, A_hat, G_hat)
        bad_stats = ~ok
        if reject is not None:
            reject = reject.to(ok.device)
            ok = ok & ~reject
            bad_stats = bad_stats & ~reject
        b.state.average_factors(A_hat, G_hat, ok, self.opts.ema_decay)
        return bad_stats

    # ------------------------------------------------------------------ checks
    def check_batch_sizes(self, captured: List[Block], out_batch: Optional[int], of: CaptureOf
                          ) -> None:
        """Warn (once per block) about a layer whose inputs do not have the examples in dim 0:
        the model output's batch size (or, for "empirical", the most common one among the layers)
        differs from it, e.g. a position embedding called on arange(T) or a Linear fed
        x.view(-1, d). Its statistics would not be per-example. Shapes only: no host sync."""
        sizes = {b: {b.batch_size(x) for x in of(b).inputs} for b in captured}
        n = out_batch
        if n is None:
            counts: Dict[int, int] = defaultdict(int)
            for ss in sizes.values():
                for v in ss:
                    counts[v] += 1
            n = max(counts, key=lambda v: (counts[v], v))
        for b, ss in sizes.items():
            if ss != {n}:
                self.health.warn_once(
                    ("batch", b.name),
                    f"module {b.name!r} saw inputs with batch size(s) {sorted(ss)} while the "
                    f"model's batch size is {n}: K-FAC reads dim 0 of a layer's input as the "
                    f"example index, so this block's statistics are not per-example (a position "
                    f"embedding called on arange(T)? a layer fed x.view(-1, d)?). Keep the batch "
                    f"dimension first (e.g. pos.expand(N, T)) or leave the module out with skip=")

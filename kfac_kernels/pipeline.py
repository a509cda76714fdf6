"""The step: one K-FAC step of :class:`kfac_kernels.KFAC` and
:class:`kfac_kernels.KFACPreconditioner`, its phases in order, with the communication strategy (``engine.comm``, a
:class:`kfac_kernels.comm.LocalComm`) called at fixed points::

    guard        gradients finite? (unscaled under a GradScaler)      comm.agree
                 -> ok (device flag) or None
    curvature    engine.finish_factor_update: capture -> this step's   comm.factor_statistics
                   estimates -> factors.merge (rejected when not ok)     (kind: reduce_scalings)
                 engine.update_inverses, when engine.inverse_due():    comm.decompose_here
                   kind.decompose -> preconditioning.regroup            comm.share_inverses
    gradients    {block: V}: gradient matrices (+ weight decay)        comm.full_tensors
    directions   preconditioning.local on this process's blocks       comm.precondition_here
                   -> {block: U}, <U, V>                               comm.share_directions
                 ok & finite(<U, V>), KL-clip factor nu
    update       the optimiser's own rule (KFAC: heavy ball;          comm.local_part
                   KFACPreconditioner: writes .grad)
    end          engine.end_step: counters, capture switched for the next step

The step lives here rather than in the engine: the engine owns the state a step changes (blocks,
counters, the schedule in ``inverse_due``, ``state_dict``) and the two curvature phases that
change it (``finish_factor_update``, ``update_inverses``); this file owns the order of the phases
and calls each part directly. A strategy is given arguments and returns values (which blocks this
process preconditions, the directions it shares); it never calls back into the step. The update
and the end belong to each optimiser (their rules differ), which calls ``engine.end_step()``.

Every per-step flag is an argument (``ok``, ``g_rescale``), never a write into another object.
Everything stays on the device: no host synchronisation in a step without an inverse update.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Iterable, Optional, Tuple, Union

import torch

from . import amp
from .blocks import Block
from .options import Options, check_damping

if TYPE_CHECKING:   # annotations only (the engine imports nothing of this module)
    from .engine import KFACEngine

__all__ = ["StepPipeline", "kl_factor", "ClipCount"]


def kl_factor(kl_clip: float, total: torch.Tensor) -> torch.Tensor:
    """nu = min(1, sqrt(C / total)), on the device (no host sync): ``total`` is
    sum_b lr_b^2 <U_b, V_b> (``kl_clip_mode="step"``) or sum_b <U_b, V_b> ("direction")."""
    nu = torch.sqrt(kl_clip / total.clamp_min(0))
    return torch.where(torch.isfinite(nu), nu.clamp(max=1.0), torch.ones_like(nu))


class ClipCount:
    """How often the KL clip binds (scales the update down, nu < 1), for ``opt.stats()``: a host
    count of the steps the clip was evaluated on and device counts of the binding ones (no host
    sync). Every ``window`` evaluated steps :meth:`record` hands back a device flag "it bound on
    every one of them", which the optimiser queues with its health monitor (a warning read later,
    without a sync)."""

    def __init__(self, window: int = 50):
        self.window = window
        self.steps = 0                                   # steps the clip was evaluated on
        self.binds: Optional[torch.Tensor] = None        # of those, steps with nu < 1 (device)
        self._in_window: Optional[torch.Tensor] = None

    def record(self, nu: torch.Tensor, ok: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Count one step's clip factor ``nu`` (a step rejected by ``ok`` does not bind);
        returns the flag of a window that closed with this step, else None."""
        bound = nu.detach() < 1
        if ok is not None:
            bound = bound & ok.to(bound.device)
        b = bound.to(torch.int64)
        self.binds = b if self.binds is None else self.binds + b
        self._in_window = b if self._in_window is None else self._in_window + b
        self.steps += 1
        if self.steps % self.window:
            return None
        # a new zero counter rather than None: the number of live tensors does not depend on
        # where in a window a step falls (tests/test_soak.py counts them)
        full = self._in_window == self.window
        self._in_window = torch.zeros_like(self._in_window)
        return full

    def state_dict(self) -> dict:
        return {"steps": self.steps, "binds": self.binds}

    def load_state_dict(self, sd: Optional[dict], device) -> None:
        if not sd:
            return
        self.steps = int(sd["steps"])
        b = sd["binds"]
        self.binds = b.to(device) if isinstance(b, torch.Tensor) else b
        self._in_window = None


class StepPipeline:
    """The phases of a step over one engine, in step order (see the module docstring)."""

    def __init__(self, engine: "KFACEngine"):
        self.engine: KFACEngine = engine

    @property
    def opts(self) -> Options:
        """The engine's :class:`kfac_kernels.options.Options`."""
        return self.engine.opts

    # ------------------------------------------------------------------ guard
    def guard(self, grads: Iterable[torch.Tensor], *, inv_scale: Optional[torch.Tensor] = None,
              found_inf: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The step's ok flag (0-d bool on the device): every gradient finite and, under a
        GradScaler, no overflow (``found_inf``); the same on every process. ``inv_scale``:
        unscale the gradients in place on the way. None when nothing was checked."""
        found = amp.check_and_unscale(grads, inv_scale)
        if isinstance(found_inf, torch.Tensor):
            found = found_inf.float() if found is None else found + found_inf.to(found.device)
        if found is None:
            return None
        return self.engine.comm.agree(found) == 0

    def g_rescale(self, scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The factor 1/S^2 on the empirical G of a loss scaled by ``scale`` (None: none), when
        this step captures output-gradients of that loss."""
        eng = self.engine
        if scale is None or not eng.capturing or self.opts.curvature != "empirical":
            return None
        return amp.inverse_scale(scale) ** 2

    # ------------------------------------------------------------------ curvature
    def curvature(self, ok: Optional[torch.Tensor],
                  g_rescale: Optional[torch.Tensor] = None) -> None:
        """The factor update (rejected on the device when ``ok`` is false), then the inverse
        update when the schedule says it is due (every ``inverse_every`` steps, warm-up, a
        block's first factors)."""
        eng = self.engine
        eng.finish_factor_update(reject=None if ok is None else ~ok, g_rescale=g_rescale)
        if eng.inverse_due():
            eng.update_inverses()

    # ------------------------------------------------------------------ gradients
    def gradients(self, weight_decay: Optional[Callable[[Block], float]] = None
                  ) -> Dict[Block, torch.Tensor]:
        """{block: V} for the blocks that have a decomposition and a gradient; ``weight_decay(b)``
        adds ``wd * W`` (the block's parameters as one matrix). V is the whole block's gradient
        even where the parameters are sharded (the strategy's ``full_tensors``)."""
        eng = self.engine
        todo = [(b, weight_decay(b) if weight_decay is not None else 0.0)
                for b in eng.blocks.values() if eng.has_inverse(b)]
        # whole tensors of sharded parameters (FSDP2: gathered); {} where each process holds
        # its blocks' parameters whole
        full = eng.comm.full_tensors([b for b, _ in todo], {b for b, wd in todo if wd})
        grads = {}
        for b, wd in todo:
            g, w = full.get(b, (None, None))
            V = b.grad_matrix(g)
            if V is None:
                continue
            if wd:
                V = V + wd * b.param_matrix(w)
            grads[b] = V
        return grads

    # ------------------------------------------------------------------ directions
    def precondition(self, grads: Dict[Block, torch.Tensor]
                     ) -> Tuple[Dict[Block, torch.Tensor], Dict[Block, torch.Tensor]]:
        """``({block: U}, {block: <U, V>})`` for the gradient matrices ``grads``: this process
        preconditions the blocks the strategy gives it (all of them, unless a DDP grid with
        ``grad_worker_fraction < 1`` splits them) and the strategy shares the results."""
        eng = self.engine
        if not torch.compiler.is_compiling():   # a scheduler may have set it; symbolic if traced
            check_damping("damping", self.opts.damping)
        mine = eng.comm.precondition_here(grads)
        U, dots = self.precondition_local(mine)
        return eng.comm.share_directions(grads, U, dots)

    def precondition_local(self, grads: Dict[Block, torch.Tensor]
                           ) -> Tuple[Dict[Block, torch.Tensor], Dict[Block, torch.Tensor]]:
        """The batched preconditioning of ``grads`` with the decompositions this process holds
        (one plan or op call per shape group; what ``opt.compile()`` compiles when the strategy
        communicates here)."""
        return self.engine.preconditioning.local(grads, self.opts.damping)

    def directions(self, grads: Dict[Block, torch.Tensor], ok: Optional[torch.Tensor],
                   kl_clip: Optional[float], lr: Union[float, Dict[Block, float]]):
        """``(U, ok, nu)``: the preconditioned directions, the ok flag extended by the finiteness
        of the <U, V> sums (when ``ok`` is not None), and the KL-clip factor (None without a
        clip). ``lr``: one learning rate (the clip bounds ``lr^2 sum <U, V>``) or one per block
        (``sum lr_b^2 <U_b, V_b>``); with ``kl_clip_mode="direction"`` the clip bounds
        ``sum <U, V>`` and ``lr`` is not read."""
        U, dots = self.precondition(grads)
        if not dots or (ok is None and kl_clip is None):
            return U, ok, None
        # one stack of the <U, V>, summed in float64 (a few calls, whatever the block count)
        blocks = list(dots)
        stacked = torch.stack([dots[b] for b in blocks])
        if ok is not None:
            ok = ok & torch.isfinite(stacked.sum(dtype=torch.float64)).to(ok.device)
        nu = None
        if kl_clip is not None:
            if self.opts.kl_clip_mode == "direction":
                total = stacked.sum(dtype=torch.float64)
            elif not isinstance(lr, dict):
                total = lr ** 2 * stacked.sum(dtype=torch.float64)
            else:   # group the blocks by learning rate (usually one)
                by_lr: Dict[float, list] = {}
                for i, b in enumerate(blocks):
                    by_lr.setdefault(lr[b], []).append(i)
                parts = [(stacked if len(rows) == len(blocks)
                          else stacked[rows]).sum(dtype=torch.float64) * rate ** 2
                         for rate, rows in by_lr.items()]
                total = parts[0]
                for part in parts[1:]:
                    total = total + part
            nu = kl_factor(kl_clip, total).to(stacked.dtype)
        return U, ok, nu

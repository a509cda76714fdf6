"""The user-facing optimisers: :class:`KFAC` and :class:`KFACPreconditioner`.

Both take their options from the one table in :mod:`kfac_kernels.options` and run the same
step (:class:`kfac_kernels.pipeline.StepPipeline`, whose module docstring lists its phases) over
a :class:`kfac_kernels.engine.KFACEngine`; what differs is the update: KFAC takes a heavy-ball
step itself, KFACPreconditioner writes the directions into ``.grad`` for another optimiser.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import amp, options
from .discovery import fallback_warning
from .engine import KFACEngine, KFACWarning
from .pipeline import ClipCount, StepPipeline

__all__ = ["KFAC", "KFACPreconditioner", "KFACWarning"]


def _heavy_ball(state: dict, d: torch.Tensor, factor) -> torch.Tensor:
    """``buf = factor * buf + d`` in place (``buf = d`` at the first step); returns ``buf``.
    ``factor``: the momentum, or its device factor (1 on a rejected step)."""
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = state["momentum_buffer"] = d.detach().clone()
    else:
        buf.mul_(factor).add_(d)
    return buf


def _compile_pays(engine) -> bool:
    """Whether ``opt.compile()`` engages: not on CPU, where the compiled step measured slower
    than the eager one (it warns and says how to force it)."""
    devs = {b.weight.device.type for b in engine.blocks.values()}
    if devs and devs <= {"cpu"}:
        engine.health.warn_once(
            ("compile-cpu",), "opt.compile() does not engage on CPU: the eager step (its "
            "per-step plan) measured faster than the compiled one (e.g. 2.5 vs 4.5 ms/step on an "
            "MLP; benchmarks/results/compile_vs_eager_cpu_2026-12-03.md); pass force=True to "
            "compile anyway")
        return False
    return True


def _compile_precondition(pipeline: StepPipeline, compile_kwargs) -> None:
    """Compile the step's local preconditioning (the batched ops of this process's blocks);
    a communication strategy's collectives around it stay eager."""
    compile_kwargs.setdefault("fullgraph", True)
    pipeline.precondition_local = torch.compile(   # type: ignore[method-assign]
        type(pipeline).precondition_local.__get__(pipeline), **compile_kwargs)


class _EngineViews:
    """What KFAC and KFACPreconditioner both expose of their engine."""
    engine: KFACEngine
    pipeline: StepPipeline
    clip_count: ClipCount

    @property
    def blocks(self):
        """{module name: block}; ``block.A``/``block.G`` are the running factors."""
        return self.engine.blocks

    @property
    def damping(self) -> float:
        return self.engine.damping

    @damping.setter
    def damping(self, value: float) -> None:
        self.engine.damping = value     # checked (a finite number >= 0)
        self._damping_set()

    def _damping_set(self) -> None:
        """After ``damping`` was set (KFAC mirrors it into its param groups)."""

    def backward(self, loss: torch.Tensor, out: Optional[torch.Tensor] = None, *,
                 retain_graph: bool = False) -> None:
        """Back-propagate ``loss`` and, on factor steps, the curvature passes of the metric.

        ``out`` is the model output the loss was computed from; "fisher" and "ggn" need it
        (their passes start from it), "empirical" does not.
        """
        self.engine.curvature_backward(out)
        loss.backward(retain_graph=retain_graph)

    def stats(self, sync: bool = False) -> dict:
        """A flat ``{name: scalar}`` dict for loggers (TensorBoard, wandb): damping, the KL-clip
        factor of the last step, counters, the last inverse update's seconds, and per block the
        gradient and update norms and the factors' eigenvalue ranges (keys:
        :mod:`kfac_kernels.stats`). Device values stay 0-d tensors (no host sync) unless
        ``sync=True``, which turns every value into a float with one transfer per device. Update
        norms are recorded from the first step after the first call."""
        from . import stats as _stats
        self._track_updates = True
        return _stats.collect(self, sync)

    def _record(self, U, nu) -> None:
        """Keep what :meth:`stats` reports of this step's directions (references only)."""
        self._last_nu = nu
        if getattr(self, "_track_updates", False):
            self._last_updates = {b.name: u for b, u in U.items()}

    def _count_clip(self, ok: Optional[torch.Tensor], warn: bool) -> None:
        """Count whether this step's KL clip bound (device counters, :class:`ClipCount`); with
        ``warn``, a clip that bound on every step of a window is warned about (read later)."""
        nu = getattr(self, "_last_nu", None)
        if not isinstance(nu, torch.Tensor) or nu is getattr(self, "_counted_nu", None):
            return
        self._counted_nu = nu
        full = self.clip_count.record(nu, ok)
        if full is not None and warn and self.engine.opts.kl_clip_mode == "step":
            w = self.clip_count.window
            self.engine.health.push(full, [(("kl_clip", "binds"), (
                f"the KL clip bound on every one of the last {w} steps: while it binds, the "
                f"step is sqrt(kl_clip / <U, V>) U whatever lr is, so lr has no effect "
                f"(opt.stats()['kl_clip/bind_fraction'] counts it). To make lr the step size "
                f"again, raise kl_clip until it binds only on outlier steps, or pass "
                f"kl_clip_mode='direction' (the clip bounds the direction, lr scales the step; "
                f"docs/math.md, 'The update')"))])

    def paused(self):
        """Context manager: forward/backward passes inside are not captured for the factors
        (evaluation batches with gradients on, probes, extra passes of step control)::

            with opt.paused():
                val_loss = loss_fn(model(x_val), y_val)
        """
        return self.engine.paused()

    def close(self) -> None:
        """Remove the hooks K-FAC put on the model."""
        self.engine.close()

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective (call on every rank): gather the decompositions on rank ``to`` so that its
        ``state_dict()`` is complete. Needed only with ``grad_worker_fraction < 1``."""
        self.engine.comm.consolidate(to, self.engine.inverse_updates)

    def _warn_fallback(self, extra, rule: str) -> None:
        msg = fallback_warning([(n, p, r) for n, p, r in self.engine.fallback] + list(extra), rule)
        if msg is not None:
            warnings.warn(f"kfac_kernels: {msg}", KFACWarning, stacklevel=3)


class KFAC(_EngineViews, torch.optim.Optimizer):
    """K-FAC: natural-gradient descent with a Kronecker-factored metric (Luk & Grosse).

    Layers K-FAC supports (nn.Linear, nn.Conv1d/2d/3d including grouped, ConvTranspose,
    nn.Embedding, normalisation layers' affine parameters, the layers of :mod:`kfac_kernels.nn`;
    see docs/layers.md) are preconditioned by ``G^-1 V A^-1`` (damped as ``damping_mode``
    says); all other trainable parameters take a plain SGD step with the same lr, momentum and
    weight decay (``describe()`` lists them; construction warns about weight matrices among
    them). Usage::

        opt = KFAC(model, lr=1e-2, curvature="fisher", likelihood="categorical")
        out = model(x); loss = F.cross_entropy(out, y)
        opt.zero_grad(); opt.backward(loss, out); opt.step()

    Update per block: V = grad + weight_decay * W; U = preconditioned V (scaled by the KL-clip
    factor nu when ``kl_clip`` is set); buf = momentum * buf + U; W -= lr * buf. The mathematics
    is stated in docs/math.md.

    ``params``: param groups over the model's parameters, like any torch optimiser (each
    block's weight and bias must share a group). Robustness (docs/robustness.md): with
    ``grad_scaler`` step through ``scaler.step(opt)``; ``skip_nonfinite`` decides on the device,
    warns once and counts in ``skipped_steps``; the adaptive options are
    :mod:`kfac_kernels.adaptive`. torch.distributed (docs/distributed.md): the model may be
    wrapped in DistributedDataParallel (block names are the wrapped module's, without
    "module.").

    The step's phases are public for step-control code (:mod:`kfac_kernels.adaptive` uses
    them): :meth:`begin_step`, :meth:`directions`, :meth:`apply_update`, :meth:`end_step`.
    """

    # GradScaler hands this optimiser grad_scale / found_inf and always calls step(): the
    # unscaling and the skip of an overflowed step happen here, on the device (amp.py)
    _step_supports_amp_scaling = True

    def __init__(self, model: nn.Module, *args, **kwargs):
        if not isinstance(model, nn.Module):
            raise TypeError(f"KFAC takes the model (an nn.Module) first, got {type(model).__name__}")
        model, opts = options.resolve("KFAC", (model, *args), kwargs)
        self.opts = opts
        params = opts.params
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        # damping and kl_clip live in the param groups too, so that schedulers and callbacks
        # can drive them like lr (one value for all groups: K-FAC damps every block alike)
        super().__init__(params, dict(lr=opts.lr, momentum=opts.momentum,
                                      weight_decay=opts.weight_decay, damping=opts.damping,
                                      kl_clip=opts.kl_clip))
        trainable = {id(p) for g in self.param_groups for p in g["params"]}
        self._kl_clip = opts.kl_clip
        self.grad_scaler = opts.grad_scaler
        self.skip_nonfinite = bool(opts.skip_nonfinite)
        self.control = None          # step control from the quadratic model (adaptive.py)
        if opts.adaptive_lr or opts.adaptive_momentum or opts.adaptive_damping:
            if opts.kl_clip is not None and opts.adaptive_lr:
                raise ValueError("kl_clip and adaptive_lr both set the step length: use one")
            if opts.grad_scaler is not None:
                raise ValueError("the adaptive options do not support a GradScaler (the "
                                 "quadratic model needs unscaled curvature products)")
            from .adaptive import StepControl
            self.control = StepControl(adaptive_lr=opts.adaptive_lr,
                                       adaptive_momentum=opts.adaptive_momentum,
                                       adaptive_damping=opts.adaptive_damping,
                                       every=opts.damping_adaptation_every,
                                       decay=opts.damping_adaptation_decay,
                                       bounds=opts.damping_bounds)
        self._skipped: Union[int, torch.Tensor] = 0
        self.clip_count = ClipCount()
        self._driven = False         # this step came through scaler.step(opt)
        self.engine = KFACEngine(model, opts, trainable=trainable)
        self.pipeline = StepPipeline(self.engine)
        self._check_groups()
        self._warn_fallback(self._outside_model(), "a plain SGD step with K-FAC's lr")

    def _damping_set(self) -> None:
        for g in self.param_groups:
            g["damping"] = self.engine.damping

    @property
    def kl_clip(self) -> Optional[float]:
        return self._kl_clip

    @kl_clip.setter
    def kl_clip(self, value: Optional[float]) -> None:
        options.check_kl_clip("kl_clip", value)
        self._kl_clip = value
        for g in self.param_groups:
            g["kl_clip"] = value

    def _sync_groups(self) -> None:
        """Take ``damping`` / ``kl_clip`` from the param groups (a scheduler or callback may have
        set them); every group must hold the same value."""
        for key, current in (("damping", self.engine.damping), ("kl_clip", self._kl_clip)):
            vals: List[Any] = []
            for g in self.param_groups:
                v = g.setdefault(key, current)     # a group from an older state_dict
                if not any(v == w for w in vals):
                    vals.append(v)
            if len(vals) > 1:
                raise ValueError(
                    f"the param groups hold different {key} values {vals}: K-FAC applies one "
                    f"{key} to every block; set the same value in every group (or opt.{key} = "
                    f"value, which does)")
            if vals[0] != current:
                setattr(self, key, vals[0])

    def _check_groups(self) -> None:
        where = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        for b in self.engine.blocks.values():
            gs = {where.get(id(p)) for p in b.params}
            if len(gs) > 1:
                raise ValueError(f"block {b.name!r}: its weight and bias are in different param "
                                 f"groups; K-FAC preconditions them as one block")

    def group_of(self) -> Dict[int, dict]:
        """{id(param): its param group}."""
        return {id(p): g for g in self.param_groups for p in g["params"]}

    def _outside_model(self, params=None) -> List[Tuple[str, torch.Tensor, str]]:
        """Parameters of the param groups (or of ``params``) that have neither a block nor a
        reason recorded at construction: parameters no module of the model holds, and the
        model's parameters that were frozen or not in the optimiser when KFAC was built (added
        later with ``add_param_group``)."""
        in_blocks = self.engine.block_params()
        known = {id(p) for _, p, _ in self.engine.fallback}
        names = self.engine.param_names
        if params is None:
            params = [p for g in self.param_groups for p in g["params"]]
        out = []
        for p in params:
            if id(p) in in_blocks or id(p) in known:
                continue
            if id(p) in names:
                out.append((names[id(p)], p, "frozen (requires_grad=False) or not in the "
                            "optimiser when KFAC was built, so its module has no block"))
            else:
                out.append((f"param {tuple(p.shape)}", p,
                            "not in a module of the model given to KFAC"))
        return out

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``. K-FAC finds its blocks when it is built, so a parameter
        added later (e.g. a layer unfrozen during fine-tuning) takes the plain SGD step; a weight
        matrix among them is warned about with the remedy."""
        super().add_param_group(param_group)
        if getattr(self, "engine", None) is None:      # torch's __init__ adds the first groups
            return
        extra = self._outside_model(self.param_groups[-1]["params"])
        hit = [(n, p) for n, p, _ in extra if p.dim() >= 2]
        if hit:
            shown = ", ".join(f"{n} {tuple(p.shape)}" for n, p in hit[:10])
            warnings.warn(
                f"kfac_kernels: add_param_group: {len(hit)} weight parameter"
                f"{'s' if len(hit) > 1 else ''} ({shown}) take{'' if len(hit) > 1 else 's'} a "
                f"plain SGD step with K-FAC's lr, not K-FAC: K-FAC finds its blocks when it is "
                f"built, and {'they were' if len(hit) > 1 else 'it was'} frozen "
                f"(requires_grad=False), not in its param groups, or outside the model then. "
                f"Remedy: build KFAC with the layer trainable (requires_grad=True) and in its "
                f"param groups from the start (a group with lr=0 keeps it still until you raise "
                f"its lr); describe() lists it", KFACWarning, stacklevel=2)

    def describe(self) -> str:
        """Blocks, shapes, backends and the parameters left to the first-order rule."""
        return self.engine.describe([(n, r) for n, _, r in self._outside_model()])

    # -------------------------------------------------------------- training
    def compile(self, *, force: bool = False, **compile_kwargs) -> "KFAC":
        """Compile the per-step phases with ``torch.compile`` (``fullgraph=True`` unless given):
        the gradient matrices, the batched preconditioning of every block (its ops are
        torch.library custom ops, so nothing breaks on them), the finiteness check and KL clip
        in one graph (:meth:`directions`), and the parameter update in another
        (:meth:`apply_update`). The factor and inverse updates stay eager (the inverse update
        reads decomposition health on the host by design). Compile the model yourself
        (``torch.compile(model)``); see docs/robustness.md for measured times and for the
        capture hooks, which split a compiled forward on factor steps. Returns ``self``.

        On CPU it does not engage unless ``force=True``: there the eager step (the per-step
        plan's few mm calls) is faster than the compiled op path (measured:
        benchmarks/results/compile_vs_eager_cpu_2026-12-03.md); it warns once and says so."""
        if not force and not _compile_pays(self.engine):
            return self
        compile_kwargs.setdefault("fullgraph", True)
        if not self.engine.comm.precondition_collectives:
            self.directions = torch.compile(  # type: ignore[method-assign]
                type(self).directions.__get__(self), **compile_kwargs)
        else:     # the collectives of distributed preconditioning stay eager
            _compile_precondition(self.pipeline, dict(compile_kwargs))
        self.apply_update = torch.compile(  # type: ignore[method-assign]
            type(self).apply_update.__get__(self), **compile_kwargs)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. Also marks the statistics captured so far as belonging to an
        earlier step: if a backward pass comes before the next ``step()`` (a loop skipped
        ``step()``), they are dropped instead of being merged into the next factor update."""
        self.engine.mark_stale()
        super().zero_grad(set_to_none=set_to_none)

    @property
    def skipped_steps(self) -> int:
        """Steps whose parameter and factor updates were skipped (non-finite gradients or update,
        GradScaler overflow). Reading it synchronises with the device."""
        return int(self._skipped) if isinstance(self._skipped, torch.Tensor) else 0

    def _run_closure(self, closure):
        """Evaluate ``closure`` with gradients on. A closure returning ``(loss, out)`` leaves the
        backward passes to the step (``zero_grad`` + :meth:`backward`); one returning the loss
        has done them itself (torch's convention)."""
        with torch.enable_grad():
            res = closure()
            if isinstance(res, (tuple, list)):
                if len(res) != 2:
                    raise ValueError("a closure returns the loss, or (loss, model output)")
                loss, out = res
                self.zero_grad()
                self.backward(loss, out)
                return loss.detach()
        return res

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """One K-FAC step. ``closure`` (optional) runs the forward pass on the batch and returns
        either the loss (having called ``zero_grad`` and ``backward`` itself, torch's convention)
        or ``(loss, out)`` (the step then calls ``zero_grad`` and ``backward(loss, out)``); the
        adaptive options need the latter (see :mod:`kfac_kernels.adaptive`)."""
        if self.control is not None:
            return self.control.step(self, closure)
        loss = self._run_closure(closure) if closure is not None else None
        ok = self.begin_step()
        direction, ok = self.directions(ok)
        self.apply_update(direction, ok)
        self.end_step(ok)
        return loss

    # -------------------------------------------------------------- step phases
    def begin_step(self) -> Optional[torch.Tensor]:
        """Guard, factor update, inverse update (when due). Checks (and, under a GradScaler,
        unscales) the gradients on the device; returns the step's ok flag (0-d bool on the
        device), or None when nothing is checked (``skip_nonfinite=False`` and no scaler)."""
        eng = self.engine
        self._sync_groups()
        driven = hasattr(self, "found_inf")       # scaler.step(opt) set grad_scale / found_inf
        grad_scale = getattr(self, "grad_scale", None)
        scaler_on = self.grad_scaler is not None and self.grad_scaler.is_enabled()
        if scaler_on and not driven:
            raise RuntimeError("KFAC(grad_scaler=...) must be stepped through scaler.step(opt) "
                               "(it tells the optimiser whether the gradients are still scaled "
                               "and whether they overflowed)")
        self._driven = driven
        ok = g_rescale = None
        if driven or self.skip_nonfinite:
            scale = grad_scale if grad_scale is not None else amp.scaler_scale(self.grad_scaler)
            if (driven and eng.capturing and eng.opts.curvature == "empirical"
                    and any(eng.capture.of(b).inputs or eng.capture.of(b).examples
                            for b in eng.blocks.values())):
                if scale is None:
                    raise RuntimeError(
                        "scaler.unscale_(opt) ran before scaler.step(opt), so KFAC cannot tell "
                        "which loss scale the captured output-gradients carry: pass "
                        "grad_scaler=scaler to KFAC")
                g_rescale = self.pipeline.g_rescale(scale)
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            ok = self.pipeline.guard(
                grads, inv_scale=None if grad_scale is None else amp.inverse_scale(grad_scale),
                found_inf=getattr(self, "found_inf", None))
        self.pipeline.curvature(ok, g_rescale)
        return ok

    def directions(self, ok: Optional[torch.Tensor], *, kl_clip: bool = True):
        """``({id(param): direction}, ok)`` for every parameter with a gradient: K-FAC for the
        blocks (times the KL-clip factor unless ``kl_clip=False``), grad + weight_decay * param
        for the rest; ``ok`` extended by the finiteness of the preconditioned directions."""
        group_of = self.group_of()
        grads = self.pipeline.gradients(lambda b: group_of[id(b.weight)]["weight_decay"])
        lrs = {b: group_of[id(b.weight)]["lr"] for b in grads}
        U, ok, nu = self.pipeline.directions(grads, ok, self.kl_clip if kl_clip else None, lrs)
        self._record(U, nu)
        direction: Dict[int, torch.Tensor] = {}
        local = self.engine.comm.local_part     # this process's shard of a sharded parameter
        for b, u in U.items():
            if nu is not None:
                u = u * (nu if nu.dtype == u.dtype else nu.to(u.dtype))
            for p, d in zip(b.params, b.split(u)):
                direction[id(p)] = local(p, d)
        for group in self.param_groups:       # fallback rule (and blocks not ready yet): SGD
            wd = group["weight_decay"]
            for p in group["params"]:
                if id(p) not in direction and p.grad is not None:
                    direction[id(p)] = p.grad if not wd else p.grad.add(p, alpha=wd)
        return direction, ok

    def apply_update(self, direction: Dict[int, torch.Tensor], ok: Optional[torch.Tensor]) -> None:
        """Heavy ball with each group's lr and momentum: ``buf = mom buf + d; p -= lr buf``.
        With an ok flag a rejected step changes neither parameters nor momentum (decided on the
        device: ``d`` masked to 0, the momentum factor 1 and the step 0 where ``ok`` is false);
        the flag's per-dtype factors are built once per group, so a parameter costs a few
        in-place calls."""
        masks: Dict[tuple, tuple] = {}
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            factors: Dict[tuple, tuple] = {}
            for p in group["params"]:
                d = direction.get(id(p))
                if d is None:
                    continue
                if ok is None:
                    if mom:
                        d = _heavy_ball(self.state[p], d, mom)
                    p.add_(d, alpha=-lr)
                    continue
                key = (p.device, p.dtype)
                if key not in masks:     # the flag on this device, in this dtype, and a zero
                    keep = ok.to(device=p.device)
                    masks[key] = (keep, keep.to(p.dtype), torch.zeros((), dtype=p.dtype,
                                                                      device=p.device))
                keep, keepf, zero = masks[key]
                if key not in factors:   # momentum factor (1 when rejected) and step factor
                    factors[key] = (keepf * (mom - 1.0) + 1.0 if mom else None, keepf * -lr)
                mom_f, step_f = factors[key]
                d = torch.where(keep, d, zero if d.dtype == p.dtype else zero.to(d.dtype))
                if mom:
                    d = _heavy_ball(self.state[p], d, mom_f)
                p.addcmul_(d, step_f)

    def end_step(self, ok: Optional[torch.Tensor]) -> None:
        """Count a rejected step (warned once, read later: no host sync), count whether the KL
        clip bound, and close the step."""
        self._count_clip(ok, warn=True)
        if ok is not None:
            bad = ~ok
            self._skipped = self._skipped + bad.to(torch.int64)
            if not self._driven:    # GradScaler skips are routine: it reports them itself
                self.engine.health.push(bad, [(
                    "step", "a step had non-finite gradients or a non-finite preconditioned "
                    "update; its parameter and factor updates were skipped (warned once; "
                    "opt.skipped_steps counts them)")])
        self.engine.end_step()

    # -------------------------------------------------------------- state
    def _params(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective (call on every rank): gather on rank ``to`` what its ``state_dict()`` needs
        to be complete: the decompositions held elsewhere (``grad_worker_fraction < 1``) and, on
        a fully_shard model, the whole momentum buffers."""
        super().consolidate_state_dict(to)
        self.engine.comm.consolidate_optimizer_state(self._params(), self.state, to,
                                                     self.engine.steps)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["state"] = self.engine.comm.fill_optimizer_state(sd["state"], self.engine.steps)
        sd["kfac"] = self.engine.state_dict()
        sd["kfac"]["kl_clip"] = self.kl_clip
        sd["kfac"]["optimizer"] = {"skipped_steps": self._skipped, "damping": self.damping,
                                   "control": (None if self.control is None
                                               else self.control.state_dict()),
                                   "kl_clip_count": self.clip_count.state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if "kfac" not in state_dict:
            raise ValueError("state_dict has no 'kfac' entry: it was not saved by KFAC")
        sd = dict(state_dict)
        kfac = sd.pop("kfac")
        self.engine.load_state_dict(kfac)      # validates the model first
        super().load_state_dict(sd)
        self.engine.comm.load_optimizer_state(self._params(), self.state)   # FSDP2: own shard
        extra = kfac.get("optimizer")
        if extra is not None:                  # damping included: adaptive damping changes it
            self.damping = extra["damping"]
            skipped = extra["skipped_steps"]
            dev = next(iter(self.engine.blocks.values())).weight.device
            self._skipped = skipped.to(dev) if isinstance(skipped, torch.Tensor) else skipped
            if self.control is not None and extra.get("control") is not None:
                self.control.load_state_dict(extra["control"])
            self.clip_count.load_state_dict(extra.get("kl_clip_count"), dev)


class KFACPreconditioner(_EngineViews):
    """K-FAC as a gradient preconditioner in front of any torch optimiser.

    ``step()`` rewrites each block parameter's ``.grad`` with its preconditioned direction (times
    the KL-clip factor when ``kl_clip`` is set; ``lr`` is used only for that clip) and leaves the
    other parameters' gradients alone for the base optimiser::

        pre = KFACPreconditioner(model, damping=1e-3)
        base = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out = model(x); loss = loss_fn(out, y)
        base.zero_grad(); pre.backward(loss, out); pre.step(); base.step()

    Takes the engine options of :class:`KFAC` and its torch.distributed options (all keyword
    arguments; docs/distributed.md).
    """

    def __init__(self, model: nn.Module, **kwargs):
        model, opts = options.resolve("KFACPreconditioner", (model,), kwargs)
        self.opts = opts
        self.lr = opts.lr
        self.kl_clip = opts.kl_clip
        self.grad_scaler = opts.grad_scaler
        self.clip_count = ClipCount()
        self.engine = KFACEngine(model, opts)
        self.pipeline = StepPipeline(self.engine)
        self._warn_fallback((), "the base optimiser's own rule on the raw gradient")

    def describe(self) -> str:
        return self.engine.describe()

    def compile(self, *, force: bool = False, **compile_kwargs) -> "KFACPreconditioner":
        """Compile the preconditioning phase (see :meth:`KFAC.compile`; on CPU only with
        ``force=True``). Returns ``self``."""
        if not force and not _compile_pays(self.engine):
            return self
        _compile_precondition(self.pipeline, compile_kwargs)
        return self

    @torch.no_grad()
    def step(self) -> None:
        """Precondition the block gradients in place. With a GradScaler, call
        ``scaler.unscale_(base)`` first (``grad_scaler=scaler`` unscales the captured statistics);
        a step with non-finite block gradients takes no factor update (its gradients are left
        for the base optimiser / scaler to skip)."""
        eng, pipe = self.engine, self.pipeline
        scale = amp.scaler_scale(self.grad_scaler)
        g_rescale = pipe.g_rescale(scale)
        ok = pipe.guard([p.grad for b in eng.blocks.values() for p in b.params
                         if p.grad is not None])
        if ok is not None and scale is None:
            eng.health.push(~ok, [("step", "non-finite block gradients: that step's factor "
                                           "update was skipped (warned once)")])
        pipe.curvature(ok, g_rescale)
        U, _, nu = pipe.directions(pipe.gradients(), None, self.kl_clip, self.lr)
        self._record(U, nu)
        self._count_clip(ok, warn=False)
        local = eng.comm.local_part
        for b, u in U.items():
            for p, d in zip(b.params, b.split(u)):
                d = local(p, d)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(d if nu is None else d * nu.to(d.dtype))
        eng.end_step()

    def state_dict(self) -> dict:
        sd = self.engine.state_dict()
        sd["kl_clip_count"] = self.clip_count.state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.engine.load_state_dict(sd)
        dev = next(iter(self.engine.blocks.values())).weight.device
        self.clip_count.load_state_dict(sd.get("kl_clip_count"), dev)


# the signatures help() shows come from the OPTIONS table (mypy does not know __signature__)
KFAC.__init__.__signature__ = options.signature("KFAC")  # type: ignore[attr-defined]
KFACPreconditioner.__init__.__signature__ = (  # type: ignore[attr-defined]
    options.signature("KFACPreconditioner"))
KFAC.__doc__ = options.merge_docs("KFAC", KFAC.__doc__ or "")
KFACPreconditioner.__doc__ = options.merge_docs("KFACPreconditioner",
                                                KFACPreconditioner.__doc__ or "")

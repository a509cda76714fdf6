"""The user-facing optimisers: :class:`KFAC` and :class:`KFACPreconditioner`.

Both are thin sequencers over :class:`kfac_kernels.engine.KFACEngine`: the engine owns the
curvature blocks and the factor/inverse/preconditioning phases; these classes own the update rule.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from . import amp
from .engine import KFACEngine, KFACWarning

__all__ = ["KFAC", "KFACPreconditioner", "KFACWarning"]

_ENGINE_ARGS = ("damping", "damping_mode", "ema_decay", "factor_every", "inverse_every",
                "curvature", "likelihood", "mc_samples", "inverse", "weight_sharing", "skip",
                "backend", "loss_reduction", "factor_dtype", "seed", "full_eigh_every", "only",
                "inverse_warmup", "factor_storage_dtype")
# torch.distributed options (kfac_kernels.distributed.DistributedOptions; docs/distributed.md)
_DIST_ARGS = ("distributed", "process_group", "grad_worker_fraction", "assignment",
              "bucket_cap_mb")


def _dist_options(distributed=None, process_group=None, grad_worker_fraction=1.0,
                  assignment="compute", bucket_cap_mb=25.0):
    from .distributed import DistributedOptions
    return DistributedOptions(enabled=distributed, process_group=process_group,
                              grad_worker_fraction=grad_worker_fraction, assignment=assignment,
                              bucket_cap_mb=bucket_cap_mb)


def _consolidate(engine, to: int) -> None:
    if engine.dist is not None:
        engine.dist.consolidate(to)


def _kl_factor(kl_clip, total: torch.Tensor) -> torch.Tensor:
    """nu = min(1, sqrt(C / sum_b lr_b^2 <U_b, V_b>)), on the device (no host sync)."""
    nu = torch.sqrt(kl_clip / total.clamp_min(0))
    return torch.where(torch.isfinite(nu), nu.clamp(max=1.0), torch.ones_like(nu))


def _compile_precondition(engine, compile_kwargs) -> None:
    """Compile the engine's local preconditioning (the batched ops of this process's blocks);
    a distributed strategy's broadcasts around it stay eager."""
    compile_kwargs.setdefault("fullgraph", True)
    engine.precondition_local = torch.compile(type(engine).precondition_local.__get__(engine),
                                              **compile_kwargs)


def _check_kl_clip(kl_clip):
    if kl_clip is not None and (not isinstance(kl_clip, (int, float)) or kl_clip <= 0):
        raise ValueError(f"kl_clip must be None or a number > 0, got {kl_clip!r}")


class _EngineViews:
    """What KFAC and KFACPreconditioner both expose of their engine."""
    engine: KFACEngine

    @property
    def blocks(self):
        """{module name: block}; ``block.A``/``block.G`` are the running factors."""
        return self.engine.blocks

    @property
    def damping(self) -> float:
        return self.engine.damping

    @damping.setter
    def damping(self, value: float) -> None:
        self.engine._check_damping(value)
        self.engine.damping = value


class KFAC(_EngineViews, torch.optim.Optimizer):
    """K-FAC: natural-gradient descent with a Kronecker-factored metric (Luk & Grosse).

    Layers K-FAC supports (nn.Linear, nn.Conv1d/2d/3d including grouped, nn.Embedding,
    normalisation layers' affine parameters, the recurrent cells of :mod:`kfac_kernels.nn`; see
    docs/layers.md) are preconditioned by ``G^-1 V A^-1`` (damped as ``damping_mode`` says); all other trainable parameters take a plain SGD step with the
    same lr, momentum and weight decay (``describe()`` lists them). Usage::

        opt = KFAC(model, lr=1e-2, curvature="fisher", likelihood="categorical")
        out = model(x); loss = F.cross_entropy(out, y)
        opt.zero_grad(); opt.backward(loss, out); opt.step()

    Update per block: V = grad + weight_decay * W; U = preconditioned V (scaled by the KL-clip
    factor nu when ``kl_clip`` is set); buf = momentum * buf + U; W -= lr * buf.

    Args beyond DESIGN.md §2: ``params`` (param groups over the model's parameters, like any torch
    optimiser; each block's weight and bias must share a group), ``loss_reduction`` ("mean": the
    loss is a mean over the batch, the default; "sum"), ``factor_dtype`` (float32 unless the model
    is float64; the dtype factors are accumulated, decomposed and applied in),
    ``factor_storage_dtype`` (None: the running factors are kept in ``factor_dtype``;
    torch.bfloat16: kept in bf16, half the memory, averaged and decomposed in ``factor_dtype`` —
    measurably less accurate, see docs/robustness.md), ``seed`` (of the sampling generator used by curvature="fisher"),
    ``full_eigh_every`` (inverse="eigh"/"ekfac": every k-th inverse update is a full
    eigendecomposition, the others a warm-started refresh from the previous eigenvectors, which
    skips factors whose basis still diagonalises them; default 1 = always full),
    ``inverse_warmup`` (default False; when True, during the first ``inverse_every`` steps
    every factor update is followed by an inverse update, since a step-0 basis reused while the
    early factors move fast can blow a run up when no KL clip bounds the step; it delays such a
    blow-up, it does not replace ``kl_clip``: see docs/robustness.md). ``only``
    (module names or glob patterns: precondition these modules and leave every other parameter
    to the first-order rule; a name that matches no module, or only modules K-FAC cannot
    precondition, is an error, as is a ``skip`` pattern that matches no module).

    Robustness (docs/robustness.md): ``grad_scaler`` (the ``torch.amp.GradScaler`` whose scaled
    loss is back-propagated; step through ``scaler.step(opt)``), ``skip_nonfinite`` (default True:
    a step with non-finite gradients or a non-finite update changes neither parameters nor
    factors; decided on the device, warned once, counted in ``skipped_steps``); step control from
    the quadratic model, all off by default: ``adaptive_lr``, ``adaptive_momentum``,
    ``adaptive_damping``, ``damping_adaptation_every``, ``damping_adaptation_decay``,
    ``damping_bounds`` (:mod:`kfac_kernels.adaptive`).

    torch.distributed (docs/distributed.md): ``distributed`` (None: on when torch.distributed is
    initialised with several processes; True; False), ``process_group``, ``grad_worker_fraction``
    (1: every rank holds every decomposition; 1/world: one rank each, which broadcasts the
    preconditioned gradient), ``assignment`` ("compute" | "memory" | "round_robin"),
    ``bucket_cap_mb``. The model may be wrapped in DistributedDataParallel (block names are the
    wrapped module's, without "module.").
    """

    # GradScaler hands this optimiser grad_scale / found_inf and always calls step(): the
    # unscaling and the skip of an overflowed step happen here, on the device (amp.py)
    _step_supports_amp_scaling = True

    def __init__(self, model: nn.Module, lr: float = 1e-2, momentum: float = 0.9,
                 weight_decay: float = 0.0, damping: float = 1e-3,
                 damping_mode: Optional[str] = None, ema_decay: float = 0.95,
                 factor_every: int = 1, inverse_every: int = 10, curvature: str = "empirical",
                 likelihood: Optional[str] = None, mc_samples: int = 1, inverse: str = "eigh",
                 kl_clip: Optional[float] = None, weight_sharing: str = "expand",
                 skip: Iterable[str] = (), backend: str = "auto", *, params=None,
                 loss_reduction: str = "mean", factor_dtype: Optional[torch.dtype] = None,
                 seed: Optional[int] = None, full_eigh_every: int = 1,
                 inverse_warmup: bool = False, only: Optional[Iterable[str]] = None,
                 factor_storage_dtype: Optional[torch.dtype] = None,
                 distributed: Optional[bool] = None,
                 process_group=None, grad_worker_fraction: float = 1.0,
                 assignment: str = "compute", bucket_cap_mb: float = 25.0, grad_scaler=None,
                 skip_nonfinite: bool = True, adaptive_lr: bool = False,
                 adaptive_momentum: bool = False, adaptive_damping: bool = False,
                 damping_adaptation_every: int = 5, damping_adaptation_decay: float = 0.95,
                 damping_bounds: Tuple[float, float] = (1e-8, 1e4)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"KFAC takes the model (an nn.Module) first, got {type(model).__name__}")
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        _check_kl_clip(kl_clip)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        trainable = {id(p) for g in self.param_groups for p in g["params"]}
        self.kl_clip = kl_clip
        self.grad_scaler = grad_scaler
        self.skip_nonfinite = bool(skip_nonfinite)
        self.control = None          # step control from the quadratic model (adaptive.py)
        if adaptive_lr or adaptive_momentum or adaptive_damping:
            if kl_clip is not None and adaptive_lr:
                raise ValueError("kl_clip and adaptive_lr both set the step length: use one")
            if grad_scaler is not None:
                raise ValueError("the adaptive options do not support a GradScaler (the "
                                 "quadratic model needs unscaled curvature products)")
            from .adaptive import StepControl
            self.control = StepControl(adaptive_lr=adaptive_lr,
                                       adaptive_momentum=adaptive_momentum,
                                       adaptive_damping=adaptive_damping,
                                       every=damping_adaptation_every,
                                       decay=damping_adaptation_decay, bounds=damping_bounds)
        self._skipped = 0
        self._flags = amp.DeferredFlags()
        self._driven = False
        self.engine = KFACEngine(model, damping=damping, damping_mode=damping_mode,
                                 ema_decay=ema_decay, factor_every=factor_every,
                                 inverse_every=inverse_every, curvature=curvature,
                                 likelihood=likelihood, mc_samples=mc_samples, inverse=inverse,
                                 weight_sharing=weight_sharing, skip=skip, backend=backend,
                                 loss_reduction=loss_reduction, factor_dtype=factor_dtype,
                                 seed=seed, full_eigh_every=full_eigh_every,
                                 factor_storage_dtype=factor_storage_dtype,
                                 inverse_warmup=inverse_warmup, trainable=trainable, only=only,
                                 distributed=_dist_options(distributed, process_group,
                                                           grad_worker_fraction, assignment,
                                                           bucket_cap_mb))
        self._check_groups()

    def _check_groups(self) -> None:
        where = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        for b in self.engine.blocks.values():
            gs = {where.get(id(p)) for p in b.params}
            if len(gs) > 1:
                raise ValueError(f"block {b.name!r}: its weight and bias are in different param "
                                 f"groups; K-FAC preconditions them as one block")

    def _group_of(self) -> Dict[int, dict]:
        return {id(p): g for g in self.param_groups for p in g["params"]}

    def describe(self) -> str:
        """Blocks, shapes, backends and the parameters left to the first-order rule."""
        in_blocks = self.engine.block_params()
        known = {id(p) for _, p, _ in self.engine.fallback}
        extra = []
        for g in self.param_groups:
            for p in g["params"]:
                if id(p) not in in_blocks and id(p) not in known:
                    extra.append((f"param {tuple(p.shape)}", "not in a module of the model given "
                                  "to KFAC"))
        return self.engine.describe(extra)

    # -------------------------------------------------------------- training
    def backward(self, loss: torch.Tensor, out: Optional[torch.Tensor] = None, *,
                 retain_graph: bool = False) -> None:
        """Back-propagate ``loss`` and, on factor steps, the curvature passes of the metric.

        ``out`` is the model output the loss was computed from; "fisher" and "ggn" need it
        (their passes start from it), "empirical" does not.
        """
        self.engine.curvature_backward(out)
        loss.backward(retain_graph=retain_graph)

    def close(self) -> None:
        """Remove the hooks K-FAC put on the model."""
        self.engine.close()

    def compile(self, **compile_kwargs) -> "KFAC":
        """Compile the per-step phases with ``torch.compile`` (``fullgraph=True`` unless given):
        the gradient matrices, the batched preconditioning of every block (its ops are
        torch.library custom ops, so nothing breaks on them), the finiteness check and KL clip
        in one graph, and the parameter update in another. The factor and inverse updates stay
        eager (the inverse update reads decomposition health on the host by design). Compile
        the model yourself (``torch.compile(model)``); see docs/robustness.md for measured times
        and for the capture hooks, which split a compiled forward on factor steps. Returns
        ``self``."""
        compile_kwargs.setdefault("fullgraph", True)
        if self.engine.dist is None:
            self._directions = torch.compile(type(self)._directions.__get__(self),
                                             **compile_kwargs)
        else:     # the collectives of distributed preconditioning stay eager
            _compile_precondition(self.engine, dict(compile_kwargs))
        self._update = torch.compile(type(self)._update.__get__(self), **compile_kwargs)
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
        ok = self._begin_step()
        direction, ok = self._directions(ok)
        self._update(direction, ok)
        self._end_step(ok)
        return loss

    # -------------------------------------------------------------- step phases
    def _guard(self) -> Optional[torch.Tensor]:
        """Check (and, under a GradScaler, unscale) the gradients on the device; set up the
        engine's rejection flag and G rescaling. Returns the step's ok flag (0-d bool on the
        device) or None when nothing is checked (``skip_nonfinite=False`` and no scaler)."""
        eng = self.engine
        driven = hasattr(self, "found_inf")       # scaler.step(opt) set grad_scale / found_inf
        grad_scale = getattr(self, "grad_scale", None)
        scaler_on = self.grad_scaler is not None and self.grad_scaler.is_enabled()
        if scaler_on and not driven:
            raise RuntimeError("KFAC(grad_scaler=...) must be stepped through scaler.step(opt) "
                               "(it tells the optimiser whether the gradients are still scaled "
                               "and whether they overflowed)")
        self._driven = driven
        if not driven and not self.skip_nonfinite:
            return None
        scale = grad_scale if grad_scale is not None else amp.scaler_scale(self.grad_scaler)
        if (driven and eng.capturing and eng.curvature == "empirical"
                and any(b.inputs for b in eng.blocks.values())):
            if scale is None:
                raise RuntimeError(
                    "scaler.unscale_(opt) ran before scaler.step(opt), so KFAC cannot tell which "
                    "loss scale the captured output-gradients carry: pass grad_scaler=scaler to "
                    "KFAC")
            eng._g_rescale = amp.inverse_scale(scale) ** 2
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        found = amp.check_and_unscale(
            grads, None if grad_scale is None else amp.inverse_scale(grad_scale))
        found_inf = getattr(self, "found_inf", None)
        if isinstance(found_inf, torch.Tensor):
            found = found_inf.float() if found is None else found + found_inf.to(found.device)
        if found is None:
            return None
        found = amp.agree(found, eng)
        ok = found == 0
        eng._reject = ~ok
        return ok

    def _begin_step(self) -> Optional[torch.Tensor]:
        """Gradient guard, factor update, inverse update (when due)."""
        eng = self.engine
        try:
            ok = self._guard()
            eng.finish_factor_update()
        finally:
            eng._reject = eng._g_rescale = None
        if eng.inverse_due():
            eng.update_inverses()
        return ok

    def _directions(self, ok: Optional[torch.Tensor], *, kl_clip: bool = True):
        """{id(param): direction} for every parameter with a gradient (K-FAC for blocks, times the
        KL-clip factor; grad + weight_decay * param for the rest), and the ok flag extended by the
        finiteness of the preconditioned directions."""
        eng = self.engine
        group_of = self._group_of()
        grads = {}
        for b in eng.blocks.values():
            if not eng.has_inverse(b):
                continue
            V = b.grad_matrix()
            if V is None:
                continue
            wd = group_of[id(b.weight)]["weight_decay"]
            if wd:
                V = V + wd * b.param_matrix()
            grads[b] = V
        U, dots = eng.precondition(grads)
        if ok is not None and dots:
            total = torch.stack([d.double() for d in dots.values()]).sum()
            ok = ok & torch.isfinite(total).to(ok.device)
        nu = None
        if kl_clip and self.kl_clip is not None and dots:
            total = sum(group_of[id(b.weight)]["lr"] ** 2 * d for b, d in dots.items())
            nu = _kl_factor(self.kl_clip, total)
        direction: Dict[int, torch.Tensor] = {}
        for b, u in U.items():
            for p, d in zip(b.params, b.split(u)):
                direction[id(p)] = d if nu is None else d * nu.to(d.dtype)
        for group in self.param_groups:       # fallback rule (and blocks not ready yet): SGD
            wd = group["weight_decay"]
            for p in group["params"]:
                if id(p) not in direction and p.grad is not None:
                    direction[id(p)] = p.grad if not wd else p.grad.add(p, alpha=wd)
        return direction, ok

    def _update(self, direction: Dict[int, torch.Tensor], ok: Optional[torch.Tensor]) -> None:
        """Apply the directions with each group's lr and momentum."""
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                d = direction.get(id(p))
                if d is not None:
                    self._apply(p, d, lr, mom, ok)

    def _apply(self, p, d, lr, mom, ok) -> None:
        """Heavy-ball step ``buf = mom buf + d; p -= lr buf``; with an ok flag, a rejected step
        leaves both untouched (on the device)."""
        if ok is None:
            if mom:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(mom).add_(d)
                d = buf
            p.add_(d, alpha=-lr)
            return
        keep = ok.to(device=p.device)
        d = torch.where(keep, d, torch.zeros((), dtype=d.dtype, device=d.device))
        if mom:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.detach().clone()
            else:
                buf.mul_(keep.to(buf.dtype) * (mom - 1.0) + 1.0).add_(d)
            d = buf
        p.addcmul_(d, keep.to(p.dtype) * -lr)

    def _end_step(self, ok: Optional[torch.Tensor]) -> None:
        if ok is not None:
            bad = ~ok
            self._skipped = self._skipped + bad.to(torch.int64)
            if not self._driven:    # GradScaler skips are routine: it reports them itself
                self._flags.push(bad, "step", "a step had non-finite gradients or a non-finite "
                                 "preconditioned update; its parameter and factor updates were "
                                 "skipped (warned once; opt.skipped_steps counts them)")
        self.engine.end_step()

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["kfac"] = self.engine.state_dict()
        sd["kfac"]["kl_clip"] = self.kl_clip
        sd["kfac"]["optimizer"] = {"skipped_steps": self._skipped, "damping": self.damping,
                                   "control": (None if self.control is None
                                               else self.control.state_dict())}
        return sd

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective (call on every rank): gather the decompositions on rank ``to`` so that its
        ``state_dict()`` is complete. Needed only with ``grad_worker_fraction < 1``."""
        _consolidate(self.engine, to)

    def load_state_dict(self, state_dict: dict) -> None:
        if "kfac" not in state_dict:
            raise ValueError("state_dict has no 'kfac' entry: it was not saved by KFAC")
        sd = dict(state_dict)
        kfac = sd.pop("kfac")
        self.engine.load_state_dict(kfac)      # validates the model first
        super().load_state_dict(sd)
        extra = kfac.get("optimizer")
        if extra is not None:                  # damping included: adaptive damping changes it
            self.damping = extra["damping"]
            skipped = extra["skipped_steps"]
            dev = next(iter(self.engine.blocks.values())).weight.device
            self._skipped = skipped.to(dev) if isinstance(skipped, torch.Tensor) else skipped
            if self.control is not None and extra.get("control") is not None:
                self.control.load_state_dict(extra["control"])


class KFACPreconditioner(_EngineViews):
    """K-FAC as a gradient preconditioner in front of any torch optimiser.

    ``step()`` rewrites each block parameter's ``.grad`` with its preconditioned direction (times
    the KL-clip factor when ``kl_clip`` is set; ``lr`` is used only for that clip) and leaves the
    other parameters' gradients alone for the base optimiser::

        pre = KFACPreconditioner(model, damping=1e-3)
        base = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out = model(x); loss = loss_fn(out, y)
        base.zero_grad(); pre.backward(loss, out); pre.step(); base.step()

    Takes the engine options of :class:`KFAC` and its torch.distributed options
    (``distributed``, ``process_group``, ``grad_worker_fraction``, ``assignment``,
    ``bucket_cap_mb``; docs/distributed.md).
    """

    def __init__(self, model: nn.Module, *, lr: float = 1.0, kl_clip: Optional[float] = None,
                 grad_scaler=None, **engine_kwargs):
        unknown = set(engine_kwargs) - set(_ENGINE_ARGS) - set(_DIST_ARGS)
        if unknown:
            raise TypeError(f"KFACPreconditioner got unexpected arguments {sorted(unknown)}; it "
                            f"takes lr, kl_clip, grad_scaler and "
                            f"{', '.join(_ENGINE_ARGS + _DIST_ARGS)}")
        _check_kl_clip(kl_clip)
        self.lr = lr
        self.kl_clip = kl_clip
        self.grad_scaler = grad_scaler
        self._flags = amp.DeferredFlags()
        dist_kw = {k: engine_kwargs.pop(k) for k in _DIST_ARGS if k in engine_kwargs}
        self.engine = KFACEngine(model, distributed=_dist_options(**dist_kw), **engine_kwargs)

    def describe(self) -> str:
        return self.engine.describe()

    def backward(self, loss: torch.Tensor, out: Optional[torch.Tensor] = None, *,
                 retain_graph: bool = False) -> None:
        self.engine.curvature_backward(out)
        loss.backward(retain_graph=retain_graph)

    def close(self) -> None:
        self.engine.close()

    def compile(self, **compile_kwargs) -> "KFACPreconditioner":
        """Compile the preconditioning phase (see :meth:`KFAC.compile`). Returns ``self``."""
        _compile_precondition(self.engine, compile_kwargs)
        return self

    @torch.no_grad()
    def step(self) -> None:
        """Precondition the block gradients in place. With a GradScaler, call
        ``scaler.unscale_(base)`` first (``grad_scaler=scaler`` unscales the captured statistics);
        a step with non-finite block gradients takes no factor update (its gradients are left
        for the base optimiser / scaler to skip)."""
        eng = self.engine
        scale = amp.scaler_scale(self.grad_scaler)
        try:
            if scale is not None and eng.capturing and eng.curvature == "empirical":
                eng._g_rescale = amp.inverse_scale(scale) ** 2
            found = amp.check_and_unscale(
                [p.grad for b in eng.blocks.values() for p in b.params if p.grad is not None])
            if found is not None:
                eng._reject = amp.agree(found, eng) > 0
                if scale is None:
                    self._flags.push(eng._reject, "step", "non-finite block gradients: that "
                                     "step's factor update was skipped (warned once)")
            eng.finish_factor_update()
        finally:
            eng._reject = eng._g_rescale = None
        if eng.inverse_due():
            eng.update_inverses()
        grads = {}
        for b in eng.blocks.values():
            if eng.has_inverse(b):
                V = b.grad_matrix()
                if V is not None:
                    grads[b] = V
        U, dots = eng.precondition(grads)
        nu = None
        if self.kl_clip is not None and dots:
            nu = _kl_factor(self.kl_clip, self.lr ** 2 * sum(dots.values()))
        for b, u in U.items():
            for p, d in zip(b.params, b.split(u)):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(d if nu is None else d * nu.to(d.dtype))
        eng.end_step()

    def state_dict(self) -> dict:
        return self.engine.state_dict()

    def consolidate_state_dict(self, to: int = 0) -> None:
        """See :meth:`KFAC.consolidate_state_dict`."""
        _consolidate(self.engine, to)

    def load_state_dict(self, sd: dict) -> None:
        self.engine.load_state_dict(sd)

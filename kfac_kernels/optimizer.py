"""The user-facing optimisers: :class:`KFAC` and :class:`KFACPreconditioner`.

Both are thin sequencers over :class:`kfac_kernels.engine.KFACEngine`: the engine owns the
curvature blocks and the factor/inverse/preconditioning phases; these classes own the update rule.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from .engine import KFACEngine, KFACWarning

__all__ = ["KFAC", "KFACPreconditioner", "KFACWarning"]

_ENGINE_ARGS = ("damping", "damping_mode", "ema_decay", "factor_every", "inverse_every",
                "curvature", "likelihood", "mc_samples", "inverse", "weight_sharing", "skip",
                "backend", "loss_reduction", "factor_dtype", "seed", "full_eigh_every", "only")
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


def _check_kl_clip(kl_clip):
    if kl_clip is not None and (not isinstance(kl_clip, (int, float)) or kl_clip <= 0):
        raise ValueError(f"kl_clip must be None or a number > 0, got {kl_clip!r}")


class KFAC(torch.optim.Optimizer):
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
    is float64), ``seed`` (of the sampling generator used by curvature="fisher"),
    ``full_eigh_every`` (inverse="eigh"/"ekfac": every k-th inverse update is a full
    eigendecomposition, the others a warm-started refresh from the previous eigenvectors, which
    skips factors whose basis still diagonalises them; default 1 = always full). ``only``
    (module names or glob patterns: precondition these modules and leave every other parameter
    to the first-order rule; a name that matches no module, or only modules K-FAC cannot
    precondition, is an error, as is a ``skip`` pattern that matches no module).

    torch.distributed (docs/distributed.md): ``distributed`` (None: on when torch.distributed is
    initialised with several processes; True; False), ``process_group``, ``grad_worker_fraction``
    (1: every rank holds every decomposition; 1/world: one rank each, which broadcasts the
    preconditioned gradient), ``assignment`` ("compute" | "memory" | "round_robin"),
    ``bucket_cap_mb``. The model may be wrapped in DistributedDataParallel (block names are the
    wrapped module's, without "module.").
    """

    def __init__(self, model: nn.Module, lr: float = 1e-2, momentum: float = 0.9,
                 weight_decay: float = 0.0, damping: float = 1e-3,
                 damping_mode: Optional[str] = None, ema_decay: float = 0.95,
                 factor_every: int = 1, inverse_every: int = 10, curvature: str = "empirical",
                 likelihood: Optional[str] = None, mc_samples: int = 1, inverse: str = "eigh",
                 kl_clip: Optional[float] = None, weight_sharing: str = "expand",
                 skip: Iterable[str] = (), backend: str = "auto", *, params=None,
                 loss_reduction: str = "mean", factor_dtype: Optional[torch.dtype] = None,
                 seed: Optional[int] = None, full_eigh_every: int = 1,
                 only: Optional[Iterable[str]] = None,
                 distributed: Optional[bool] = None,
                 process_group=None, grad_worker_fraction: float = 1.0,
                 assignment: str = "compute", bucket_cap_mb: float = 25.0):
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
        self.engine = KFACEngine(model, damping=damping, damping_mode=damping_mode,
                                 ema_decay=ema_decay, factor_every=factor_every,
                                 inverse_every=inverse_every, curvature=curvature,
                                 likelihood=likelihood, mc_samples=mc_samples, inverse=inverse,
                                 weight_sharing=weight_sharing, skip=skip, backend=backend,
                                 loss_reduction=loss_reduction, factor_dtype=factor_dtype,
                                 seed=seed, full_eigh_every=full_eigh_every,
                                 trainable=trainable, only=only,
                                 distributed=_dist_options(distributed, process_group,
                                                           grad_worker_fraction, assignment,
                                                           bucket_cap_mb))
        self._check_groups()

    # -------------------------------------------------------------- convenience views
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

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        eng = self.engine
        eng.finish_factor_update()
        if eng.inverse_due():
            eng.update_inverses()
        group_of = self._group_of()

        # preconditioned directions for every block that has a decomposition and a gradient
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
        nu = None
        if self.kl_clip is not None and dots:
            total = sum(group_of[id(b.weight)]["lr"] ** 2 * d for b, d in dots.items())
            nu = _kl_factor(self.kl_clip, total)

        direction: Dict[int, torch.Tensor] = {}
        for b, u in U.items():
            for p, d in zip(b.params, b.split(u)):
                direction[id(p)] = d if nu is None else d * nu.to(d.dtype)
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                d = direction.get(id(p))
                if d is None:          # fallback rule (and blocks not ready yet): SGD
                    if p.grad is None:
                        continue
                    d = p.grad if not wd else p.grad.add(p, alpha=wd)
                if mom:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        eng.end_step()
        return loss

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["kfac"] = self.engine.state_dict()
        sd["kfac"]["kl_clip"] = self.kl_clip
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


class KFACPreconditioner:
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
                 **engine_kwargs):
        unknown = set(engine_kwargs) - set(_ENGINE_ARGS) - set(_DIST_ARGS)
        if unknown:
            raise TypeError(f"KFACPreconditioner got unexpected arguments {sorted(unknown)}; it "
                            f"takes lr, kl_clip and {', '.join(_ENGINE_ARGS + _DIST_ARGS)}")
        _check_kl_clip(kl_clip)
        self.lr = lr
        self.kl_clip = kl_clip
        dist_kw = {k: engine_kwargs.pop(k) for k in _DIST_ARGS if k in engine_kwargs}
        self.engine = KFACEngine(model, distributed=_dist_options(**dist_kw), **engine_kwargs)

    @property
    def blocks(self):
        return self.engine.blocks

    @property
    def damping(self) -> float:
        return self.engine.damping

    @damping.setter
    def damping(self, value: float) -> None:
        self.engine._check_damping(value)
        self.engine.damping = value

    def describe(self) -> str:
        return self.engine.describe()

    def backward(self, loss: torch.Tensor, out: Optional[torch.Tensor] = None, *,
                 retain_graph: bool = False) -> None:
        self.engine.curvature_backward(out)
        loss.backward(retain_graph=retain_graph)

    def close(self) -> None:
        self.engine.close()

    @torch.no_grad()
    def step(self) -> None:
        eng = self.engine
        eng.finish_factor_update()
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

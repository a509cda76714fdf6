"""What Shampoo and SOAP share: parameters batched by shape, and state kept per parameter.

Every op of :mod:`kfac_kernels.ops` takes stacks [B, m, n], so the optimizers run one call per
*parameter batch* (the parameters of a param_group with the same matrix shape, dtype, device and
step count), not one per parameter. The state lives in stacked buffers, one per group and name,
and each parameter's ``optimizer.state[p][name]`` is a view into its row of the buffer: in-place
updates of the buffer are the per-parameter state, ``state_dict()`` needs no gathering, and a
loaded state (plain per-parameter tensors) is stacked once on the next step.

A parameter is seen as a matrix ``[shape[0], prod(shape[1:])]`` (a Linear weight as it is, a
convolution's kernel flattened over its input dims); 0-d and 1-d parameters, and matrix sides
longer than ``max_precond_dim`` (or of length 1), get the diagonal treatment of each optimizer.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["ParamBatch", "StackedOptimizer", "matrix_shape", "check_positive", "check_unit",
           "check_schedule"]


def matrix_shape(p: torch.Tensor) -> Optional[Tuple[int, int]]:
    """``(m, n)`` of the matrix view of ``p``, or None for 0-d and 1-d parameters."""
    if p.dim() < 2:
        return None
    return p.shape[0], math.prod(p.shape[1:])


def check_positive(name, v, *, allow_zero=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if v < 0 or (v == 0 and not allow_zero) or not math.isfinite(v):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {v}")


def check_unit(name, v, *, closed=False):
    """``v`` in [0, 1) (``closed``: [0, 1])."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not (0.0 <= v < 1.0 or (closed and v == 1.0)):
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {v}")


def check_schedule(precondition_frequency, max_precond_dim, zero_dim_means: str) -> None:
    """The options both optimisers share: refresh every k >= 1 steps, factor sides up to
    ``max_precond_dim`` (>= 0; ``zero_dim_means`` says what 0 does)."""
    if not isinstance(precondition_frequency, int) or precondition_frequency < 1:
        raise ValueError(f"precondition_frequency must be an integer >= 1, got "
                         f"{precondition_frequency!r}")
    if not isinstance(max_precond_dim, int) or max_precond_dim < 0:
        raise ValueError(f"max_precond_dim must be an integer >= 0 (0: {zero_dim_means}), "
                         f"got {max_precond_dim!r}")


class ParamBatch:
    """Parameters of one param_group sharing a matrix shape (or a vector length), dtype, device
    and step count, with their state as stacked buffers ``[B, ...]``.

    ``left`` / ``right`` say whether each side of the matrix gets a full factor (its length is at
    most ``max_precond_dim`` and above 1); ``vector`` groups hold 0-d/1-d parameters.
    """

    def __init__(self, params: List[torch.Tensor], states: List[dict], shape, left: bool,
                 right: bool, work_dtype: torch.dtype):
        self.params = params
        self.states = states
        self.vector = shape is None
        self.m, self.n = (params[0].numel(), 1) if shape is None else shape
        self.left, self.right = left, right
        self.dtype = work_dtype
        self.device = params[0].device
        self.stacks: Dict[str, torch.Tensor] = {}

    def __len__(self):
        return len(self.params)

    @property
    def step(self) -> int:
        return int(self.states[0].get("step", 0))

    def advance(self) -> int:
        t = self.step + 1
        for st in self.states:
            st["step"] = t
        return t

    def grads(self) -> torch.Tensor:
        """The gradients as one stack: [B, m, n] for matrices, [B, d] for vectors."""
        shape = (self.m,) if self.vector else (self.m, self.n)
        gs = [p.grad.reshape(shape) for p in self.params]
        return gs[0].unsqueeze(0) if len(gs) == 1 else torch.stack(gs)

    def buffer(self, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The stacked buffer ``name``: the existing one; else stacked from the parameters' state
        (after a load, or when the group was re-formed); else ``make()`` for all of them. Each
        parameter's state entry becomes a view of its row."""
        buf = self.stacks.get(name)
        if buf is not None:
            return buf
        have = [name in st for st in self.states]
        if all(have):
            parts = [st[name] for st in self.states]
            buf = torch.stack([t.to(self.device) for t in parts])
        else:
            buf = make()
            for i, st in enumerate(self.states):
                if have[i]:
                    buf[i].copy_(st[name])
        self._adopt(name, buf)
        return buf

    def has(self, name: str) -> bool:
        return name in self.stacks or all(name in st for st in self.states)

    def put(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Store ``value`` [B, ...] as buffer ``name`` (copied into the existing buffer, so the
        parameters' views stay valid)."""
        buf = self.stacks.get(name)
        if buf is not None and buf.shape == value.shape and buf.dtype == value.dtype:
            return buf.copy_(value)
        self._adopt(name, value.contiguous() if value._base is None else value.clone())
        return self.stacks[name]

    def _adopt(self, name, buf):
        self.stacks[name] = buf
        for i, st in enumerate(self.states):
            st[name] = buf[i]

    def apply(self, update: torch.Tensor, lr: float, decoupled_decay: float = 0.0) -> None:
        """``p <- p (1 - lr decay) - lr update`` for every parameter (``update`` [B, ...])."""
        params = self.params
        if decoupled_decay:
            torch._foreach_mul_(params, 1.0 - lr * decoupled_decay)
        ups = [u.reshape(p.shape).to(p.dtype) for u, p in zip(update.unbind(0), params)]
        torch._foreach_add_(params, ups, alpha=-lr)


class StackedOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` whose step runs per :class:`ParamBatch`.

    Subclasses implement ``_group_step(group, pb)`` and say which state names are factors
    (kept in their own dtype through ``load_state_dict``: torch's loader casts every floating
    state tensor to its parameter's dtype, which would round float64 factors of float32
    parameters). ``batch_shapes=False`` puts each parameter in a group of its own (one op call
    per parameter: the "looped" baseline of benchmarks/optim_step_time.py).
    """

    def __init__(self, params, defaults, *, factor_dtype=None, batch_shapes=True):
        if factor_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"factor_dtype must be None (float32, or float64 for float64 "
                             f"parameters), torch.float32 or torch.float64; got {factor_dtype!r}")
        self._factor_dtype = factor_dtype
        self._batch = bool(batch_shapes)
        self._layout: Dict[int, tuple] = {}
        #: matrices whose root / eigenbasis refresh came back non-finite (the previous one was
        #: kept); the ops already repair failures on finite input, so this counts non-finite
        #: factors (a NaN gradient accumulated) or a repair that failed too
        self.failed_refreshes = 0
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if not p.is_floating_point() or p.is_complex():
                    raise TypeError(f"{type(self).__name__} needs real floating-point "
                                    f"parameters, got one of dtype {p.dtype}")

    def _b(self, op: str) -> str:
        """The backend to ask ``op`` for: ``self.backend`` where that backend implements it, else
        "auto" (so backend="triton" still decomposes with whatever implements symeig)."""
        from ..ops import _registry
        return _registry.op_backend(getattr(self, "backend", "auto"), op)

    # ------------------------------------------------------------------ layout
    def _work_dtype(self, p):
        if self._factor_dtype is not None:
            return self._factor_dtype
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _param_batches(self, gi: int, group: dict) -> List[ParamBatch]:
        live = [p for p in group["params"] if p.grad is not None]
        for p in live:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        limit = group.get("max_precond_dim", 0)     # Muon has no factors: 0
        key = (tuple(id(p) for p in live), limit)
        cached = self._layout.get(gi)
        if cached is not None and cached[0] == key:
            return cached[1]
        buckets: Dict[tuple, list] = {}
        for p in live:
            st = self.state[p]
            shape = matrix_shape(p)
            if shape is None:
                sides = (False, False)
            else:
                sides = tuple(1 < s <= limit for s in shape)
            tag = (shape if shape is not None else ("vector", p.numel()), sides, p.dtype,
                   p.device, int(st.get("step", 0)), None if self._batch else id(p))
            buckets.setdefault(tag, []).append(p)
        batches = []
        for tag, ps in buckets.items():
            shape, sides = tag[0], tag[1]
            batches.append(ParamBatch(ps, [self.state[p] for p in ps],
                                      None if shape[0] == "vector" else shape, sides[0],
                                      sides[1], self._work_dtype(ps[0])))
        self._layout[gi] = (key, batches)
        return batches

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` (re-evaluating the loss, with grad) is optional."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            for pb in self._param_batches(gi, group):
                self._group_step(group, pb)
        return loss

    def _group_step(self, group: dict, pb: ParamBatch) -> None:  # pragma: no cover
        raise NotImplementedError

    def _kept_if_failed(self, new: torch.Tensor, old: Optional[torch.Tensor]) -> torch.Tensor:
        """``new`` [B, n, n], with each matrix that is not finite replaced by its ``old`` one
        (zero where there is none yet: that parameter's preconditioned update is zero until the
        next refresh), counted in ``failed_refreshes``. One host read per refresh."""
        ok = torch.isfinite(new.sum((-2, -1), dtype=torch.float64))
        if bool(ok.all()):
            return new
        self.failed_refreshes += int((~ok).sum())
        prev = old if old is not None else torch.zeros_like(new)
        return torch.where(ok[:, None, None], new, prev.to(new.dtype))

    def stats(self) -> Dict[str, int]:
        """Counters for loggers: ``failed_refreshes`` (see the attribute)."""
        return {"failed_refreshes": self.failed_refreshes}

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict):
        """As ``torch.optim.Optimizer.load_state_dict``, but every state tensor keeps the dtype
        it was saved with (factors in float64 stay float64 for float32 parameters)."""
        saved_groups = state_dict["param_groups"]
        ids = [i for g in saved_groups for i in g["params"]]
        keep = {i: {k: v for k, v in st.items() if isinstance(v, torch.Tensor)}
                for i, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for k, v in keep.get(i, {}).items():
                self.state[p][k] = v.to(device=p.device, copy=True)
        self._layout.clear()

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if hasattr(self, "_layout"):
            self._layout.clear()

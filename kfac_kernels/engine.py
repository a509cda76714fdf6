"""The K-FAC engine: the sequencer of the curvature phases over a model's blocks.

The engine decides what is due in a step and calls the parts that do it (docs/architecture.md
draws the flow); it holds the counters, the state_dict and ``describe()``. Each part owns its
state:

* :mod:`kfac_kernels.discovery`: modules -> blocks, and the parameters left to the first-order
  rule;
* :mod:`kfac_kernels.capture`: the hooks, the output-gradient buffers, stale steps and the extra
  backward passes of "fisher" / "ggn";
* :mod:`kfac_kernels.factors`: batched syrk jobs, this step's A/G statistics and the guarded
  running average (no host sync);
* :mod:`kfac_kernels.inverses`: one class per ``inverse=`` kind (decompositions, fallback chain,
  stored entries, preconditioning op); the inverse update reads decomposition health on the
  host (one sync per inverse update);
* :mod:`kfac_kernels.preconditioning`: shape groups, stacked entries, one batched call per group;
* :mod:`kfac_kernels.health`: deferred device flags and warn-once;
* :mod:`kfac_kernels.comm`: the communication strategy (:class:`~kfac_kernels.comm.LocalComm`
  in one process, :class:`kfac_kernels.comm.ddp.DistributedKFAC` over torch.distributed,
  :class:`kfac_kernels.comm.fsdp.FSDPKFAC` for FSDP2), picked by
  :func:`kfac_kernels.comm.strategy_for`. The engine never asks whether it is distributed.

The step (:mod:`kfac_kernels.pipeline`, driven by :mod:`kfac_kernels.optimizer`) calls the
engine's factor update, inverse update and end of step, and preconditions with its
``preconditioning`` itself.
"""
from __future__ import annotations

import contextlib
import math
import time
import weakref
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import ops
from .blocks import Block
from .capture import Capture
from .comm import LocalComm, strategy_for, unwrap_model
from .discovery import discover, size_text as _size
from .factors import FactorStatistics
from .health import Health, KFACWarning
from .inverses import KINDS
from .inverses.base import InverseKind
from .options import Options
from .preconditioning import Preconditioning

__all__ = ["KFACEngine", "KFACWarning"]


class KFACEngine:
    """Curvature blocks of a model and the phases of K-FAC over them (see the module docstring).

    ``opts``: the validated :class:`kfac_kernels.options.Options` of the optimiser;
    ``trainable``: ids of the optimiser's parameters (None: all that require grad)."""

    def __init__(self, model: nn.Module, opts: Options, *, trainable: Optional[set] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"K-FAC needs the model (an nn.Module) to find its layers, got "
                            f"{type(model).__name__}")
        model = unwrap_model(model)   # DDP: block names without the "module." prefix
        # the collaborators, wired here (each gets the ones it needs passed in)
        self.opts: Options = opts
        self.health: Health = Health()
        self.kind: InverseKind = KINDS[opts.inverse](opts, self.health, self.op_backend)
        self.factors: FactorStatistics = FactorStatistics(opts, self.health, self.op_backend)
        self.blocks, self.fallback = discover(model, opts, trainable,
                                              self.op_backend("conv_input_factor"))
        # every parameter of the model by name (a parameter added to the optimiser later is
        # named, with the reason it has no block)
        self.param_names: Dict[int, str] = {}
        for pname, p in model.named_parameters(remove_duplicate=False):
            self.param_names.setdefault(id(p), pname)
        self.closed = False
        _claim_modules(self)
        self.steps = 0                     # completed optimiser steps
        self.factor_updates = 0            # factor updates performed
        self.inverse_updates = 0
        self.needs_inverse = False         # set when the decompositions must be recomputed
        # the communication strategy: built (and the ranks' agreement checked) before any hook
        self.comm: LocalComm = strategy_for(
            list(self.blocks.values()), opts, self.kind, model=model,
            params=[p for _, p, _ in self.fallback],
            names={id(p): n for n, p, _ in self.fallback})
        self.preconditioning: Preconditioning = Preconditioning(self.kind)
        self.capture: Capture = Capture(self.blocks, opts, factors=self.factors, kind=self.kind,
                               comm=self.comm, health=self.health,
                               inverse_due=_WeakCall(self, "inverse_due"))
        self.capture.start_step(self.steps)

    # ------------------------------------------------------------------ small views
    def op_backend(self, op: str) -> str:
        """The backend to ask for when running ``op`` (``ops._registry.op_backend``)."""
        return ops._registry.op_backend(self.opts.backend, op)

    @property
    def damping(self):
        return self.opts.damping

    @damping.setter
    def damping(self, value) -> None:
        self.opts.set_damping(value)

    @property
    def dist(self):
        """The torch.distributed strategy, or None in a single process."""
        return None if type(self.comm) is LocalComm else self.comm

    @property
    def generator(self) -> Optional[torch.Generator]:
        """The sampler of curvature="fisher" (created on the first curvature pass)."""
        return self.capture.generator

    def block_params(self) -> Dict[int, Block]:
        return {id(p): b for b in self.blocks.values() for p in b.params}

    def has_inverse(self, b: Block) -> bool:
        """Whether block ``b`` can be preconditioned (with torch.distributed, its decomposition
        may live on another rank: see kfac_kernels.comm.ddp)."""
        return self.comm.has_inverse(b)

    # ------------------------------------------------------------------ capture
    @property
    def capturing(self) -> bool:
        """Whether forward/backward passes of the current step are captured for the factors."""
        return self.capture.capturing

    def paused(self) -> contextlib.AbstractContextManager:
        """Capture nothing inside (extra forward/backward passes of step control)."""
        return self.capture.paused()

    def mark_stale(self) -> None:
        """Called by ``zero_grad`` (see :meth:`kfac_kernels.capture.Capture.mark_stale`)."""
        self.capture.mark_stale()

    def curvature_backward(self, out: Optional[torch.Tensor]) -> None:
        """The extra backward passes of "fisher" / "ggn" (call before the loss's own backward)."""
        self.capture.curvature_backward(out, self.steps)

    def close(self) -> None:
        """Remove every hook this engine registered (steps after it keep the last factors)."""
        self.capture.close()
        self.closed = True
        for b in self.blocks.values():
            ref = _HOOKED.get(b.module)
            if ref is not None and ref() is self:
                del _HOOKED[b.module]

    # ------------------------------------------------------------------ factor update
    def finish_factor_update(self, reject: Optional[torch.Tensor] = None,
                             g_rescale: Optional[torch.Tensor] = None) -> bool:
        """Turn this step's captured statistics into the running factors; returns whether an
        update happened. ``reject``: a device flag rejecting the whole step (non-finite
        gradients, GradScaler overflow); ``g_rescale``: a device factor on the empirical G
        (1/S^2 under a GradScaler). No host synchronisation."""
        self.health.poll()
        cap, opts = self.capture, self.opts
        if not cap.capturing:
            cap.reset()
            return False
        accumulated = cap.finish_micro_batches(g_rescale)   # several micro-batches combined
        if opts.curvature == "empirical" and cap.has_grads():
            cap.fold(1.0, empirical=True, g_rescale=g_rescale)
            if g_rescale is not None:   # output-gradients of a scaled loss: G_hat / S^2
                cap.rescale_g(g_rescale)
        captured = cap.captured_blocks()
        if not captured:
            cap.reset()
            return False
        if not accumulated:       # (checked per micro-batch otherwise)
            self.factors.check_batch_sizes(captured, cap.take_out_batch(), cap.of)
        cap.check_modes()
        if cap.pending_passes == 0 or all(cap.of(b).G_hat is None for b in captured):
            cap.reset()
            if opts.curvature == "empirical":
                raise RuntimeError(
                    "layer inputs were captured but no output gradients: run loss.backward() (or "
                    "opt.backward(loss, out)) between the forward pass and step()")
            raise RuntimeError(
                f"curvature={opts.curvature!r} needs its own backward passes: call "
                f"opt.backward(loss, out) instead of loss.backward() on steps where factors "
                f"are updated (every factor_every={opts.factor_every} steps)")
        # averaged over ranks by a distributed strategy (part of it launched during backward)
        stats = self.comm.factor_statistics(captured, cap)
        cap.reset()
        flags = self.factors.merge(stats, reject)
        if flags is not None:
            self.factor_updates += 1
            if any(not self.has_inverse(b) for b in stats):
                self.needs_inverse = True   # a block's first factors: decompose them now
            self.health.push(flags, [(("nonfinite", b.name),
                                      f"block {b.name!r}: non-finite activations or gradients; "
                                      f"its factor update was skipped (warned once per block)")
                                     for b in stats])
        self.kind.after_factor_update(list(stats), reject, self.comm)
        if self.kind.plan_reads_factors():
            self.preconditioning.invalidate()
        return flags is not None

    # ------------------------------------------------------------------ inverse update
    def inverse_due(self) -> bool:
        """Whether this step's ``step()`` recomputes the decompositions: every ``inverse_every``
        steps, and during the first ``inverse_every`` steps after every factor update when
        ``inverse_warmup`` (the early factors move fastest: a basis from step 0 reused for
        ``inverse_every`` steps can blow a run up without a KL clip)."""
        if self.needs_inverse:
            return True
        if self.factor_updates == 0:
            return False
        every = self.opts.inverse_every
        if self.steps % every == 0:
            return True
        return self.opts.inverse_warmup and self.steps < every and self.capture.capturing

    def update_inverses(self) -> None:
        """Decompose every factor, batched by size (the strategy decides who decomposes what and
        shares the results); the inverse kind's fallback chain handles failures."""
        self.health.poll()
        ready = [b for b in self.blocks.values() if b.A is not None]
        if not ready:
            return
        t0 = time.perf_counter()
        only = self.comm.decompose_here(ready)       # None: every factor of ``ready``
        self.kind.decompose(ready, only, self.inverse_updates)
        self.comm.share_inverses(ready)
        self.kind.after_decomposition(ready, self.comm)
        self.needs_inverse = False
        self.inverse_updates += 1
        self.preconditioning.regroup(self.blocks.values())
        self.last_inverse_seconds = time.perf_counter() - t0   # host time (opt.stats())

    # ------------------------------------------------------------------ end of step
    def end_step(self) -> None:
        """Count the step; the inverse kind's and the capture's per-step state move on."""
        self.steps += 1
        self.kind.end_step()
        self.capture.start_step(self.steps)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        blocks = {}
        for name, b in self.blocks.items():
            # the key stays "kind" (the block's family) so state_dicts saved before the rename
            # load: tests/test_block_state.py loads a fixture saved by the old code
            entry = {"shape": tuple(b.shape), "kind": b.family}
            entry.update(b.state.saved())       # nothing before the first factor update
            blocks[name] = entry
        gen = self.capture.generator
        sd = {"version": 1, "steps": self.steps, "factor_updates": self.factor_updates,
              "inverse_updates": self.inverse_updates, "inverse": self.opts.inverse,
              "needs_inverse": self.needs_inverse, "blocks": blocks,
              "generator": None if gen is None else (str(gen.device), gen.get_state())}
        # a strategy adds the decompositions held by other ranks and the sampling seed
        self.comm.fill_state_dict(sd, self.inverse_updates)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if not isinstance(sd, dict) or "blocks" not in sd:
            raise ValueError("not a kfac_kernels state_dict: its 'kfac' entry is missing or has "
                             "no 'blocks'")
        self._check_same_model(sd)
        same_inverse = sd.get("inverse") == self.opts.inverse
        for name, entry in sd["blocks"].items():
            b = self.blocks[name]
            # factors keep their own dtype (never cast to the parameter dtype)
            b.state.load(entry, b.weight.device, with_inverse=same_inverse,
                         count_dtype=b.factor_dtype)
        self.steps = int(sd["steps"])
        self.factor_updates = int(sd["factor_updates"])
        self.inverse_updates = int(sd.get("inverse_updates", 0))
        self.needs_inverse = bool(sd.get("needs_inverse", False)) or (
            not same_inverse and self.factor_updates > 0)
        gen = sd.get("generator")
        if gen is not None:
            self.capture.generator = torch.Generator(device=gen[0])
            self.capture.generator.set_state(gen[1])
        self.capture.reset()
        self.capture.start_step(self.steps)
        self.comm.load_state_dict(sd)     # a strategy keeps this rank's share
        self.preconditioning.regroup(self.blocks.values())

    def _check_same_model(self, sd: dict) -> None:
        mine, theirs = set(self.blocks), set(sd["blocks"])
        if mine != theirs:
            raise ValueError(
                "state_dict is from a different model: blocks only in the state_dict: "
                f"{sorted(theirs - mine) or 'none'}; blocks only in this model: "
                f"{sorted(mine - theirs) or 'none'}")
        for name, entry in sd["blocks"].items():
            b = self.blocks[name]
            if entry.get("kind", b.family) != b.family:   # "kind": the family (saved name)
                raise ValueError(f"state_dict is from a different model: block {name!r} is a "
                                 f"{entry['kind']} block there and a {b.family} block here")
            if tuple(entry["shape"]) != tuple(b.shape):
                raise ValueError(f"state_dict is from a different model: block {name!r} has shape "
                                 f"{tuple(entry['shape'])} there and {tuple(b.shape)} here")
            for w in ("A", "G"):
                f = entry.get(w)
                if f is not None and tuple(f.shape) != b.factor_shape(w):
                    def kept(diag):
                        return "as its diagonal" if diag else "dense"
                    raise ValueError(
                        f"state_dict does not fit: block {name!r} kept its factor {w} "
                        f"{kept(f.dim() == 1)} there and keeps it {kept(b.is_diagonal(w))} here; "
                        f"build the optimiser with the max_factor_dim / large_factor it was "
                        f"saved with (max_factor_dim={self.opts.max_factor_dim}, large_factor="
                        f"{self.opts.large_factor!r} here)")

    # ------------------------------------------------------------------ description
    def describe(self, extra_fallback: Sequence[Tuple[str, str]] = ()) -> str:
        o = self.opts
        dev = next(iter(self.blocks.values())).weight.device
        rows = [("block", "module", "grad shape", "A", "G", "factors", "memory")]
        totals = [0, 0, 0]
        for b in self.blocks.values():
            r = b.describe_row()
            mem = self.factor_memory(b)
            totals = [t + m for t, m in zip(totals, mem)]
            rows.append((r["name"] or "<model>", r["module"], r["shape"], r["A"], r["G"],
                         str(b.factor_dtype).replace("torch.", ""), _size(sum(mem))))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines = [f"K-FAC: {len(self.blocks)} blocks, curvature={o.curvature}"
                 f"{'/' + o.likelihood if o.likelihood else ''}, inverse={o.inverse}, "
                 f"damping={o.damping} ({o.damping_mode}), weight_sharing="
                 f"{o.weight_sharing}, factor_every={o.factor_every}, inverse_every="
                 f"{o.inverse_every}"]
        lines += [fmt.format(*rows[0]), fmt.format(*["-" * w for w in widths])]
        lines += [fmt.format(*r) for r in rows[1:]]
        lines.append(f"factor memory: {_size(sum(totals))} in total (running factors "
                     f"{_size(totals[0])}, decompositions {_size(totals[1])}, a factor step's "
                     f"estimates {_size(totals[2])}); sides above max_factor_dim="
                     f"{o.max_factor_dim}: large_factor={o.large_factor!r}")
        lines.append("backends on " + str(dev) + ": " + ", ".join(
            f"{op}={self._backend_name(op, dev)}" for op in
            ("syrk_update", "conv_input_factor", self.kind.decomposition_op,
             self.kind.precondition_op)))
        extra = self.comm.describe()
        if extra:
            lines.append(extra)
        fb = [(n, r) for n, _, r in self.fallback] + list(extra_fallback)
        if fb:
            lines.append(f"fallback parameters (plain first-order rule): {len(fb)}")
            lines += [f"  {n}: {r}" for n, r in fb]
        else:
            lines.append("fallback parameters: none")
        return "\n".join(lines)

    def factor_memory(self, b: Block) -> Tuple[int, int, int]:
        """Bytes of block ``b``'s curvature state, from the shapes (before any step too):
        ``(running factors, decompositions, a factor step's estimates)``. The running factors are
        kept in ``factor_storage_dtype`` when set, the rest in the block's factor dtype; the
        decompositions are what the inverse kind stores (its ``entries`` and EKFAC's scalings);
        the estimates are freed between factor steps when ``factor_every > 1``."""
        def nbytes(numel, dtype):
            return numel * torch.empty((), dtype=dtype).element_size()
        numel = sum(math.prod(b.factor_shape(w)) for w in ("A", "G"))
        lead = b.num_stack if b.stacked else 1
        inv = sum(lead * math.prod(shape) for w in ("A", "G")
                  for _, shape, _ in self.kind.entries(b, w))
        # per-block matrices of the gradient's shape the kind keeps besides its decompositions
        # (EKFAC's S, eigen_adam's moments M2 and M1)
        inv += lead * math.prod(b.shape[-2:]) * sum(
            k in self.kind.extra_entries() for k in ("S", "M2", "M1"))
        storage = self.opts.factor_storage_dtype or b.factor_dtype
        return (nbytes(numel, storage), nbytes(inv, b.factor_dtype),
                nbytes(numel, b.factor_dtype))

    def _backend_name(self, op: str, dev) -> str:
        try:
            return ops._registry.resolve(op, self.opts.backend, dev)
        except ops.BackendUnavailable as exc:
            return f"unavailable ({exc})"


# module -> weak reference to the engine whose capture hooks it carries
_HOOKED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _claim_modules(engine: "KFACEngine") -> None:
    """Record ``engine`` as the one whose hooks its blocks' modules carry, warning when another
    live, unclosed engine already put its hooks there (two optimisers on one model)."""
    other = []
    for name, b in engine.blocks.items():
        ref = _HOOKED.get(b.module)
        prev = ref() if ref is not None else None
        if prev is not None and prev is not engine and not prev.closed:
            other.append(name or "<model>")
        _HOOKED[b.module] = weakref.ref(engine)
    if other:
        import warnings
        shown = ", ".join(map(repr, other[:6])) + (", ..." if len(other) > 6 else "")
        warnings.warn(
            f"kfac_kernels: modules {shown} already carry the hooks of another live K-FAC "
            f"optimiser (KFAC or KFACPreconditioner) on this model: both record every forward "
            f"and backward pass (twice the capture memory and time) and the other one keeps "
            f"collecting statistics. Call close() on the old optimiser (or drop every "
            f"reference to it) before building a new one on the same model",
            KFACWarning, stacklevel=4)


class _WeakCall:
    """``getattr(obj, name)()`` through a weak reference (the capture's hooks must not keep
    the engine alive)."""

    def __init__(self, obj, name: str):
        import weakref
        self.ref, self.name = weakref.ref(obj), name

    def __call__(self):
        obj = self.ref()
        return False if obj is None else getattr(obj, self.name)()

"""The K-FAC engine: capture, factor updates, inverse updates and preconditioning.

This is the machinery shared by :class:`kfac_kernels.KFAC` and
:class:`kfac_kernels.KFACPreconditioner`. It keeps the three phases apart, as kfac-jax does:

1. **Capture** (forward/backward hooks, only on steps where factors are due): inputs of every
   block's module and the gradients w.r.t. its outputs, from the user's ``loss.backward()``
   ("empirical") or from the extra backward passes of :meth:`curvature_backward` ("fisher",
   "ggn"). Gradients are folded into the step's G estimate after each pass, so memory stays
   bounded however many passes the metric needs.
2. **Factor update** (cheap, every ``factor_every`` steps): A_hat, G_hat through the batched
   ``ops.syrk_update`` / ``ops.conv_input_factor``, then the running average with the
   first-estimate rule, guarded on the device against non-finite statistics (no host sync).
3. **Inverse update** (expensive, every ``inverse_every`` steps): all factors of one size are
   decomposed in one batched call (``ops.symeig`` or ``ops.damped_inverse``), with the fallback
   chain of DESIGN.md §1; this phase reads decomposition status on the host (one sync per
   inverse update).
4. **Preconditioning** (every step): blocks of equal shape are stacked and preconditioned in one
   batched call that also returns the <U, V> sums KL clipping needs.
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import warnings
import weakref
from collections import OrderedDict, defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import ops
from .blocks import Block, SyrkJob, WEIGHT_SHARING, block_type_for
from .curvature import (CURVATURES, LIKELIHOODS, check_likelihood_output, ggn_num_columns,
                        ggn_vectors, sample_vectors)

log = logging.getLogger("kfac_kernels")

INVERSES = ("eigh", "cholesky", "ekfac")
DAMPING_MODES = ("eigen", "pi")
LOSS_REDUCTIONS = ("mean", "sum")
_GGN_WARN_COLUMNS = 256


class KFACWarning(UserWarning):
    """Warnings about the curvature estimate (skipped updates, failed decompositions, ...)."""


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")


def _select(b: Block, only: Optional[set]) -> Dict[str, torch.Tensor]:
    """A block's factors to decompose: all, or those listed in ``only`` as (block, which). A
    diagonal A (embeddings) needs no decomposition: its eigenvalues are its entries."""
    mats = {"G": b.G} if b.diag_A else {"A": b.A, "G": b.G}
    # factors stored in a narrower dtype (factor_storage_dtype) are decomposed in factor_dtype
    return {w: f.to(b.factor_dtype) for w, f in mats.items() if only is None or (b, w) in only}


class _Group:
    """Blocks of one gradient shape/dtype/device, preconditioned in one batched call.

    A stacked block (grouped convolution, normalisation layer) contributes ``num_stack``
    consecutive matrices to the stacks, a plain block one; ``slots`` records where each sits."""

    def __init__(self, key, blocks: List[Block]):
        self.key = key
        self.blocks = blocks
        self.stacks: Dict[str, torch.Tensor] = {}
        self.slots: Dict[Block, slice] = {}

    def restack(self) -> None:
        """Stack the members' decompositions and make each member's entries views of the stack."""
        names = self.blocks[0].inverse.keys()
        self.stacks = {k: torch.cat([b.inverse[k] if b.stacked else b.inverse[k].unsqueeze(0)
                                     for b in self.blocks]) for k in names}
        off = 0
        for b in self.blocks:
            sl = slice(off, off + b.num_stack)
            off += b.num_stack
            self.slots[b] = sl
            b.inverse = {k: (v[sl] if b.stacked else v[sl.start]) for k, v in self.stacks.items()}

    def rows(self, members: List[Block]) -> List[int]:
        return [i for b in members for i in range(self.slots[b].start, self.slots[b].stop)]


class _Slice:
    """One matrix of a stacked block, seen by the inverse phase as a block of its own (so that
    batching by size and the fallback chain work per matrix)."""

    diag_A = False

    def __init__(self, block: Block, i: int):
        self.block, self.i = block, i
        self.name = f"{block.name}[{i}]"
        self.A, self.G = block.A[i], block.G[i]
        self.factor_dtype = block.factor_dtype
        self.inverse = {k: v[i] for k, v in block.inverse.items() if k != "S"}


class KFACEngine:
    """Curvature blocks of a model and the phases of K-FAC over them (see the module docstring)."""

    def __init__(self, model: nn.Module, *, damping: float = 1e-3, damping_mode: Optional[str] = None,
                 ema_decay: float = 0.95, factor_every: int = 1, inverse_every: int = 10,
                 curvature: str = "empirical", likelihood: Optional[str] = None,
                 mc_samples: int = 1, inverse: str = "eigh", weight_sharing: str = "expand",
                 skip: Iterable[str] = (), backend: str = "auto", loss_reduction: str = "mean",
                 factor_dtype: Optional[torch.dtype] = None, seed: Optional[int] = None,
                 full_eigh_every: int = 1, inverse_warmup: bool = False,
                 factor_storage_dtype: Optional[torch.dtype] = None,
                 trainable: Optional[set] = None,
                 only: Optional[Iterable[str]] = None, distributed=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"K-FAC needs the model (an nn.Module) to find its layers, got "
                            f"{type(model).__name__}")
        from . import distributed as _dist
        model = _dist.unwrap_model(model)   # DDP: block names without the "module." prefix
        self.dist = None                   # the torch.distributed strategy, when one is active
        _check_choice("curvature", curvature, CURVATURES)
        if likelihood is not None:
            _check_choice("likelihood", likelihood, LIKELIHOODS)
        if curvature != "empirical" and likelihood is None:
            raise ValueError(f"curvature={curvature!r} needs a likelihood: one of "
                             f"{', '.join(map(repr, LIKELIHOODS))}")
        _check_choice("inverse", inverse, INVERSES)
        if damping_mode is None:
            damping_mode = "pi" if inverse == "cholesky" else "eigen"
        _check_choice("damping_mode", damping_mode, DAMPING_MODES)
        if inverse == "cholesky" and damping_mode != "pi":
            raise ValueError("inverse='cholesky' supports damping_mode='pi' only (eigenvalue "
                             "damping needs the eigenbasis: use inverse='eigh')")
        if inverse == "ekfac" and damping_mode != "eigen":
            raise ValueError("inverse='ekfac' damps its corrected eigenvalues: use "
                             "damping_mode='eigen'")
        _check_choice("weight_sharing", weight_sharing, WEIGHT_SHARING)
        _check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        _check_choice("backend", backend, ("auto",) + ops._registry.BACKENDS)
        if not (isinstance(mc_samples, int) and mc_samples >= 1):
            raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")
        for name, v in (("factor_every", factor_every), ("inverse_every", inverse_every),
                        ("full_eigh_every", full_eigh_every)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if factor_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"factor_dtype must be None, torch.float32 or torch.float64, got "
                             f"{factor_dtype}")
        if factor_storage_dtype not in (None, torch.bfloat16):
            raise ValueError(f"factor_storage_dtype must be None (store the running factors in "
                             f"factor_dtype) or torch.bfloat16, got {factor_storage_dtype}")
        self.factor_storage_dtype = factor_storage_dtype
        self.damping = damping            # validated on use: schedulers may change it
        self._check_damping(damping)
        self.damping_mode = damping_mode
        self.ema_decay = float(ema_decay)
        self.factor_every = factor_every
        self.inverse_every = inverse_every
        self.full_eigh_every = full_eigh_every
        self.inverse_warmup = bool(inverse_warmup)
        self.curvature = curvature
        self.likelihood = likelihood
        self.mc_samples = mc_samples
        self.inverse = inverse
        self.weight_sharing = weight_sharing
        if backend not in ("auto", "torch"):
            ok, why = ops.backend_status(backend)
            if not ok:
                raise ops.BackendUnavailable(f"backend={backend!r} cannot run here: {why}")
        self.backend = backend
        self.loss_reduction = loss_reduction
        self.seed = seed
        self.generator: Optional[torch.Generator] = None
        self._out_batch: Optional[int] = None    # batch size of the last curvature pass output

        self.steps = 0                     # completed optimiser steps
        self.factor_updates = 0            # factor updates performed
        self.inverse_updates = 0
        self._needs_inverse = False        # set when the decompositions must be recomputed
        self._pending_passes = 0           # curvature passes folded into G_hat this step
        self._grads: Dict[Block, List[torch.Tensor]] = defaultdict(list)
        self._g_active = False             # do output-gradient hooks record right now?
        self._deferred: List[Tuple[object, torch.Tensor, List[str]]] = []
        self._warned: set = set()
        self._groups: List[_Group] = []
        self._grad_calls: Dict[Block, List[int]] = defaultdict(list)   # call index of each grad
        # EKFAC: statistics of passes whose eigenbasis is replaced this step, kept until the new
        # basis exists (see _fold_ekfac); {block: [(inputs, grads, calls, alpha)]}
        self._ekfac_stash: Dict[Block, list] = defaultdict(list)
        self._ekfac_n: Dict[Block, int] = {}   # local examples behind each block's estimate
        # robustness (see docs/robustness.md): a device flag that rejects this step's factor
        # update (non-finite gradients, GradScaler overflow), a device factor for the empirical
        # G_hat (1/S^2 under a GradScaler), and whether captured statistics have seen a backward
        # pass since the last step (stale captures of a skipped step are discarded by zero_grad)
        self._reject: Optional[torch.Tensor] = None
        self._g_rescale: Optional[torch.Tensor] = None
        self._seen_backward = False
        self._stale = False

        self.blocks: "OrderedDict[str, Block]" = OrderedDict()
        self.fallback: List[Tuple[str, torch.Tensor, str]] = []
        if isinstance(skip, str) or isinstance(only, str):
            raise TypeError("skip= and only= take a list of module names or glob patterns, not a "
                            "single string")
        self._discover(model, tuple(skip), factor_dtype, trainable,
                       None if only is None else tuple(only))
        if not self.blocks:
            raise ValueError(
                "the model has no layer K-FAC supports (nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, "
                "normalisation layers, kfac_kernels.nn cells); "
                "fallback parameters: " + (", ".join(f"{n} ({r})" for n, _, r in self.fallback)
                                           or "none"))
        self._hooks = [b.module.register_forward_hook(self._forward_hook(b))
                       for b in self.blocks.values()]
        # the hooks hold the engine weakly: an optimiser dropped without close() frees its
        # factors, and its hooks are removed when it is collected
        weakref.finalize(self, _remove_hooks, self._hooks)
        self._set_capture()
        self.dist = _dist.setup(self, distributed)   # None in a single process: no collectives
        if self.dist is not None:
            try:
                self._check_distributed_support()
            except NotImplementedError:
                self.close()          # no hooks left behind on the model
                raise

    def _check_distributed_support(self) -> None:
        """The distributed strategy reduces and shares every block kind's factors and the
        eigh/cholesky entries; EKFAC's scalings are reduced when every rank holds every
        eigenbasis (grad_worker_fraction 1), since each rank projects its own examples' gradients
        into it. Every rank raises alike."""
        if self.inverse == "ekfac" and self.dist.k < self.dist.world:
            raise NotImplementedError(
                f"inverse='ekfac' under torch.distributed needs grad_worker_fraction=1 (every "
                f"rank projects its examples into every eigenbasis), got "
                f"{self.dist.opts.grad_worker_fraction}")

    # ------------------------------------------------------------------ discovery
    @staticmethod
    def _matches(mname: str, pattern: str) -> bool:
        """A pattern names a module or any module inside it ("encoder" covers "encoder.0.fc")."""
        parts = mname.split(".") if mname else [""]
        return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern)
                   for i in range(1, len(parts) + 1))

    def _discover(self, model, skip, factor_dtype, trainable, only=None):
        owner: Dict[int, List[str]] = defaultdict(list)
        names = [mname for mname, _ in model.named_modules()]
        for mname, mod in model.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                owner[id(p)].append(mname)
        for opt_name, pats in (("skip", skip), ("only", only or ())):
            for pat in pats:
                if not isinstance(pat, str):
                    raise TypeError(f"{opt_name}= takes module names or glob patterns (str), got "
                                    f"{pat!r}")
                if not any(self._matches(n, pat) for n in names):
                    shown = [n for n in names if n][:12]
                    raise ValueError(
                        f"{opt_name}= names {pat!r}, which matches no module of the model (module "
                        f"names as named_modules() gives them, e.g. "
                        f"{', '.join(map(repr, shown)) or 'none'}{', ...' if len(names) > 13 else ''})")
        why_not: Dict[str, List[str]] = defaultdict(list)    # only= pattern -> refusals
        claimed = set()
        for mname, mod in model.named_modules():
            direct = [(pn, p) for pn, p in mod.named_parameters(recurse=False) if p.requires_grad
                      and (trainable is None or id(p) in trainable)]
            if not direct:
                continue
            reason = ""
            cls, why = block_type_for(mod)
            wanted = [pat for pat in (only or ()) if self._matches(mname, pat)]
            if any(self._matches(mname, pat) for pat in skip):
                reason = "listed in skip="
            elif only is not None and not wanted:
                reason = "not listed in only="
            elif cls is None:
                reason = why
            elif not mod.weight.requires_grad or (trainable is not None and id(mod.weight) not in trainable):
                reason = "weight is frozen or not in the optimiser"
            elif any(len(set(owner[id(p)])) > 1 for _, p in direct):
                reason = "parameter shared with another module (tied weights)"
            if reason:
                for pat in wanted:
                    why_not[pat].append(f"{mname or '<model>'} ({type(mod).__name__}): {reason}")
                for pn, p in direct:
                    if id(p) not in claimed:
                        claimed.add(id(p))
                        self.fallback.append((f"{mname}.{pn}" if mname else pn, p, reason))
                continue
            for pat in wanted:
                why_not[pat].append("")
            block = cls(mname, mod, weight_sharing=self.weight_sharing,
                        factor_dtype=factor_dtype, backend=self.op_backend("conv_input_factor"))
            self.blocks[mname] = block
            for p in block.params:
                claimed.add(id(p))
            for pn, p in direct:   # e.g. a frozen-weight module's trainable bias
                if id(p) not in claimed:
                    claimed.add(id(p))
                    self.fallback.append((f"{mname}.{pn}", p, "not part of the block"))
        for pat in only or ():
            refusals = why_not.get(pat, [])
            if "" not in refusals:
                raise ValueError(
                    f"only= asks K-FAC to precondition {pat!r}, but no module it names can get a "
                    f"block: " + ("; ".join(refusals) if refusals else
                                  "the modules it names hold no trainable parameters"))

    def op_backend(self, op: str) -> str:
        """The backend for one op: the one asked for where it implements the op, else "auto"
        (an explicit backend="triton" still decomposes with whatever implements symeig)."""
        if self.backend in ("auto", "torch") or self.backend in ops._registry.implementations(op):
            return self.backend
        return "auto"

    def block_params(self) -> Dict[int, Block]:
        return {id(p): b for b in self.blocks.values() for p in b.params}

    def close(self) -> None:
        """Remove every hook this engine registered (steps after it keep the last factors)."""
        _remove_hooks(self._hooks)
        self._clear_capture()

    @contextlib.contextmanager
    def paused(self):
        """Capture nothing inside (extra forward/backward passes of step control)."""
        saved = self._capturing, self._g_active
        self._capturing = self._g_active = False
        try:
            yield
        finally:
            self._capturing, self._g_active = saved

    def mark_stale(self) -> None:
        """Called by ``zero_grad``: statistics that have already seen a backward pass belong to
        an earlier step. If another backward pass comes before ``step()``, that step was never
        taken (skipped by the user's loop), and they are dropped then (:meth:`_drop_stale`)
        rather than merged into this step's factors."""
        self._stale = self._seen_backward

    def _drop_stale(self) -> None:
        """Drop the captures of a step that was never taken; layer inputs captured after its
        backward pass (this step's forward, run before ``zero_grad``) are kept."""
        for b in self.blocks.values():
            mark = getattr(b, "_inputs_at_backward", 0)
            b.inputs = b.inputs[mark:]
            b._call_offset = getattr(b, "_call_offset", 0) + mark   # hooks know absolute calls
            b.A_hat = b.G_hat = None
            b.S_hat = None
            b._inputs_at_backward = 0
        self._grads = defaultdict(list)
        self._grad_calls = defaultdict(list)
        self._ekfac_stash = defaultdict(list)
        self._pending_passes = 0
        self._seen_backward = self._stale = False
        self._warn_once(("stale",), "statistics captured for a step whose step() never ran were "
                        "dropped (a backward pass followed zero_grad() without a step() "
                        "in between; warned once)")

    # ------------------------------------------------------------------ capture
    @property
    def capturing(self) -> bool:
        """Whether forward/backward passes of the current step are captured for the factors."""
        return self._capturing

    def _set_capture(self) -> None:
        self._capturing = self.steps % self.factor_every == 0
        self._g_active = self._capturing and self.curvature == "empirical"

    def _forward_hook(self, block: Block):
        ref = weakref.ref(self)

        def hook(module, args, output):
            self = ref()
            if self is None or not self._capturing or not torch.is_grad_enabled() or not args:
                return
            if module is not block.module:   # a deepcopy of the model carries the hook along
                return
            x = args[0]
            if not isinstance(x, torch.Tensor):
                return
            block.check_input(x)
            block.inputs.append(block.prepare_input(x.detach(), output))
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._grad_hook(block, len(block.inputs) - 1))
        return hook

    def _grad_hook(self, block: Block, call: int = 0):
        ref = weakref.ref(self)

        def hook(grad):
            self = ref()
            if self is not None and self._g_active:
                if self._stale:
                    self._drop_stale()
                if self.dist is not None:
                    self.dist.backward_started()   # launch the A reduction (once per step)
                self._grads[block].append(grad.detach())
                # call index among the inputs kept (stale ones dropped: see _drop_stale)
                self._grad_calls[block].append(call - getattr(block, "_call_offset", 0))
                self._mark_backward(block)
        return hook

    def _mark_backward(self, block: Block) -> None:
        self._seen_backward = True
        block._inputs_at_backward = len(block.inputs)

    def _g_scale(self, n: int, weight: float, empirical: bool) -> float:
        """Scale turning captured output-gradients into the g_n of the metric (see DESIGN §1):
        a batch-mean loss gives grad = g_n / N, so "empirical" multiplies by N; a summed loss is
        N times the mean loss, so its curvature is N times larger."""
        c = float(n) if (empirical and self.loss_reduction == "mean") else 1.0
        red = float(n) if self.loss_reduction == "sum" else 1.0
        return weight * c * c * red

    def _fold_grads(self, weight: float, empirical: bool) -> None:
        """Fold the output-gradients of one backward pass into each block's G_hat."""
        jobs = []
        for block, grads in self._grads.items():
            if not grads:
                continue
            n = block.batch_size(block.inputs[0]) if block.inputs else block.batch_size(grads[0])
            calls = self._grad_calls[block]
            scale = self._g_scale(n, weight, empirical)
            for job in block.pass_jobs(grads, calls, scale):
                jobs.append((block, job))
            if self.inverse == "ekfac" and block.inputs:
                self._ekfac_n[block] = n
                alpha = scale / n
                if self._g_rescale is not None:   # a scaled loss's gradients (1/S^2, device)
                    alpha = self._g_rescale * alpha
                self._fold_ekfac(block, grads, calls, alpha)
        self._grads = defaultdict(list)
        self._grad_calls = defaultdict(list)
        self._run_jobs(jobs, target="G_hat", accumulate=True)
        if jobs:
            self._pending_passes += 1

    def curvature_backward(self, out: Optional[torch.Tensor]) -> None:
        """The extra backward passes of "fisher" / "ggn" (call before the loss's own backward)."""
        if not self._capturing or self.curvature == "empirical":
            return
        if out is None:
            raise ValueError(f"curvature={self.curvature!r} needs the model outputs: call "
                             f"opt.backward(loss, out) with the output the loss was computed from")
        check_likelihood_output(self.likelihood, out)
        if self._stale:
            self._drop_stale()
        self._out_batch = out.shape[0]
        batch = {b.batch_size(b.inputs[0]) for b in self.blocks.values() if b.inputs}
        if batch and out.shape[0] not in batch:
            raise ValueError(f"the output's batch size {out.shape[0]} does not match the batch "
                             f"size of the captured layer inputs {sorted(batch)} (batch dimension "
                             f"first, and one forward pass per step)")
        weights = [b.weight for b in self.blocks.values() if b.inputs]
        if not weights:
            return
        if self.dist is not None:   # launch the A reduction; per-rank, per-step sampling seed
            self.dist.curvature_started(out)
        if self.generator is None or self.generator.device != out.device:
            self.generator = torch.Generator(device=out.device)
            seed = self.seed if self.seed is not None else int(
                torch.randint(0, 2 ** 62, (1,)).item())   # host RNG only: no device sync
            self.generator.manual_seed(seed)
        if self.curvature == "fisher":
            vectors, weight = sample_vectors(self.likelihood, out, self.mc_samples,
                                             self.generator), 1.0 / self.mc_samples
        else:
            cols = ggn_num_columns(self.likelihood, out)
            if cols > _GGN_WARN_COLUMNS:
                self._warn_once(("ggn", cols), f"curvature='ggn' back-propagates one vector per "
                                f"output coordinate: {cols} backward passes per factor update; "
                                f"curvature='fisher' estimates the same metric with mc_samples "
                                f"passes")
            vectors, weight = ggn_vectors(self.likelihood, out), 1.0
        self._g_active = True
        try:
            for v in vectors:
                torch.autograd.grad(out, weights, grad_outputs=v, retain_graph=True,
                                    allow_unused=True)
                self._fold_grads(weight, empirical=False)
        finally:
            self._g_active = False
        if self.dist is not None:   # G is complete: reduce it while loss.backward() runs
            self.dist.curvature_finished()

    def _clear_capture(self) -> None:
        if self.dist is not None:
            self.dist.clear()
        for b in self.blocks.values():
            b.clear_capture()
            b._inputs_at_backward = b._call_offset = 0
        self._grads = defaultdict(list)
        self._grad_calls = defaultdict(list)
        self._pending_passes = 0
        self._seen_backward = self._stale = False

    # ------------------------------------------------------------------ batched syrk
    def _run_jobs(self, jobs: List[Tuple[Block, SyrkJob]], target: str, accumulate: bool) -> None:
        """Execute syrk jobs, one batched ``ops.syrk_update`` per group of equal shapes.

        ``target`` is the block attribute that receives the result. A block's first job
        initialises its target (beta = 0) unless ``accumulate`` and it already holds one.
        Identical initialising jobs (the same input tensor feeding several layers, e.g. q/k/v
        projections) are computed once.
        """
        first: Dict[Block, bool] = {}
        ordered = []
        for block, job in jobs:
            init = block not in first and not (accumulate and getattr(block, target) is not None)
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
                       block.factor_dtype)
                groups.setdefault(key, []).append((block, job))
            for key, members in groups.items():
                self._run_group(members, target, init=phase)

    def _run_group(self, members, target: str, init: bool) -> None:
        x0 = members[0][1].x
        d = x0.shape[-1] + int(members[0][1].homogeneous)
        dtype = members[0][0].factor_dtype
        alpha, hom = members[0][1].alpha, members[0][1].homogeneous
        if init:
            # deduplicate identical inputs
            uniq: Dict[tuple, int] = {}
            xs: List[torch.Tensor] = []
            slot = []
            for _, job in members:
                k = (job.x.data_ptr(), tuple(job.x.stride()), tuple(job.x.shape))
                if target == "G_hat":
                    k = (len(xs),)
                if k not in uniq:
                    uniq[k] = len(xs)
                    xs.append(job.x)
                slot.append(uniq[k])
            if x0.dim() == 3:   # stacked jobs (one matrix per group/channel): concatenate
                per = x0.shape[0]
                out = torch.empty(len(xs) * per, d, d, dtype=dtype, device=x0.device)
                ops.syrk_update(out, xs[0] if len(xs) == 1 else torch.cat(xs), alpha=alpha,
                                beta=0.0, homogeneous=hom, backend=self.op_backend("syrk_update"))
                for (block, _), s in zip(members, slot):
                    setattr(block, target, out[s * per:(s + 1) * per])
            elif len(xs) == 1:
                out = torch.empty(d, d, dtype=dtype, device=x0.device)
                ops.syrk_update(out, xs[0], alpha=alpha, beta=0.0, homogeneous=hom,
                                backend=self.op_backend("syrk_update"))
                for block, _ in members:
                    setattr(block, target, out)
            else:
                out = torch.empty(len(xs), d, d, dtype=dtype, device=x0.device)
                ops.syrk_update(out, torch.stack(xs), alpha=alpha, beta=0.0, homogeneous=hom,
                                backend=self.op_backend("syrk_update"))
                for (block, _), s in zip(members, slot):
                    setattr(block, target, out[s])
            return
        for block, job in members:   # accumulation into distinct targets: one call each
            t = getattr(block, target)
            if not t.is_contiguous():
                t = t.contiguous()
            ops.syrk_update(t, job.x, alpha=alpha, beta=1.0, homogeneous=hom, backend=self.op_backend("syrk_update"))
            setattr(block, target, t)

    # ------------------------------------------------------------------ factor update
    def finish_factor_update(self) -> bool:
        """Turn this step's captured statistics into the running factors. Returns whether an
        update happened. No host synchronisation."""
        self._poll_deferred()
        if not self._capturing:
            self._clear_capture()
            return False
        if self.curvature == "empirical" and any(self._grads.values()):
            self._fold_grads(1.0, empirical=True)
            if self._g_rescale is not None:   # output-gradients of a scaled loss: G_hat / S^2
                for b in self.blocks.values():
                    if b.G_hat is not None:
                        b.G_hat = b.G_hat * self._g_rescale.to(b.G_hat.dtype)
        captured = [b for b in self.blocks.values() if b.inputs]
        if not captured:
            self._clear_capture()
            return False
        self._check_batch_sizes(captured)
        if self._pending_passes == 0 or all(b.G_hat is None for b in captured):
            self._clear_capture()
            if self.curvature == "empirical":
                raise RuntimeError(
                    "layer inputs were captured but no output gradients: run loss.backward() (or "
                    "opt.backward(loss, out)) between the forward pass and step()")
            raise RuntimeError(
                f"curvature={self.curvature!r} needs its own backward passes: call "
                f"opt.backward(loss, out) instead of loss.backward() on steps where factors "
                f"are updated (every factor_every={self.factor_every} steps)")
        if self.dist is None:
            stats = self.compute_statistics(captured)
        else:   # averaged over ranks (kfac_kernels.distributed), part of it launched earlier
            stats = self.dist.factor_statistics(captured)
        self._clear_capture()
        updated = self.merge_statistics(stats)
        if self.inverse == "ekfac":
            self._merge_scalings([b for b in stats])
        return updated

    def compute_statistics(self, captured: List[Block]) -> "OrderedDict[Block, Tuple]":
        """This step's estimates {block: (A_hat, G_hat)} from the captured inputs and the folded
        output-gradients (batched syrk / conv_input_factor)."""
        a_hats = self.compute_a_statistics(captured)
        stats: "OrderedDict[Block, Tuple]" = OrderedDict()
        for b in captured:
            if b.G_hat is None:   # no gradient reached this module this step: nothing to learn
                continue
            stats[b] = (a_hats[b], b.G_hat)
        return stats

    def compute_a_statistics(self, captured: List[Block]) -> "OrderedDict[Block, torch.Tensor]":
        """This step's A_hat of each captured block (batched), in the block's factor dtype."""
        a_jobs, a_ready = [], {}
        for b in captured:
            jobs, mat = b.a_jobs(b.inputs)
            a_jobs += [(b, j) for j in jobs]
            if mat is not None:
                a_ready[b] = mat
        for b in captured:
            b.A_hat = None
        self._run_jobs(a_jobs, target="A_hat", accumulate=False)
        a_hats: "OrderedDict[Block, torch.Tensor]" = OrderedDict()
        for b in captured:
            a_hat = a_ready.get(b, b.A_hat)
            if a_ready.get(b) is not None and b.A_hat is not None:
                a_hat = a_ready[b] + b.A_hat
            b.A_hat = None
            a_hats[b] = a_hat.to(b.factor_dtype)
        return a_hats

    def merge_statistics(self, stats: "OrderedDict[Block, Tuple]") -> bool:
        """Fold the step's estimates into the running factors (guarded, no host sync)."""
        # every verdict before any merge: merging cleans its (possibly shared) estimates in place
        oks = [self._finite(a_hat, g_hat) for a_hat, g_hat in stats.values()]
        flags, names = [], []
        for (b, (a_hat, g_hat)), ok in zip(stats.items(), oks):
            flags.append(self._merge(b, a_hat, g_hat, ok))
            names.append(b.name)
        if flags:
            self.factor_updates += 1
            if any(not self.has_inverse(b) for b in stats):
                self._needs_inverse = True   # a block's first factors: decompose them now
            self._defer_check(torch.stack(flags), names)
        return bool(flags)

    @staticmethod
    def _finite(A_hat: torch.Tensor, G_hat: torch.Tensor) -> torch.Tensor:
        """One reduction per factor: a sum is finite iff every entry is (or it overflowed, which
        also deserves rejecting)."""
        return torch.isfinite(A_hat.sum() + G_hat.sum())

    def _merge(self, b: Block, A_hat: torch.Tensor, G_hat: torch.Tensor,
               ok: torch.Tensor) -> torch.Tensor:
        """Running average with the first-estimate rule, skipped on non-finite statistics.

        rho_k = min(1 - 1/k, ema_decay) with k counting the block's accepted updates, so the
        first estimate is taken whole. Everything stays on the device. Returns whether the
        statistics were not finite (warned about); a step rejected as a whole through
        ``_reject`` (reported by the optimiser) is counted in ``skipped`` only."""
        if b.A is None:
            dev = A_hat.device
            b.A = torch.zeros_like(A_hat, dtype=self.factor_storage_dtype or A_hat.dtype)
            b.G = torch.zeros_like(G_hat, dtype=self.factor_storage_dtype or G_hat.dtype)
            b.count = torch.zeros((), dtype=b.factor_dtype, device=dev)
            b.skipped = torch.zeros((), dtype=torch.int64, device=dev)
        bad_stats = ~ok
        if self._reject is not None:      # the whole step was rejected (and reported) as such
            reject = self._reject.to(ok.device)
            ok = ok & ~reject
            bad_stats = bad_stats & ~reject
        count = b.count + ok.to(b.count.dtype)
        rho = (1.0 - 1.0 / count.clamp_min(1.0)).clamp(0.0, self.ema_decay)
        keep = torch.where(ok, rho, torch.ones_like(rho))          # 1: keep the old factor
        for name, hat in (("A", A_hat), ("G", G_hat)):
            old = getattr(b, name)
            # hat is this step's scratch: clean it so that 0 * hat is 0 when the step is rejected
            torch.nan_to_num_(hat, nan=0.0, posinf=0.0, neginf=0.0)
            if old.dtype == hat.dtype:
                old.mul_(keep).addcmul_(hat, 1.0 - keep)
            else:       # narrower storage: average in the statistics' dtype, round once
                old.copy_(torch.addcmul(old.to(hat.dtype) * keep, hat, 1.0 - keep))
        b.count = count
        b.skipped = b.skipped + (~ok).to(torch.int64)
        return bad_stats

    def _check_batch_sizes(self, captured: List[Block]) -> None:
        """Warn (once per block) about a layer whose inputs do not have the examples in dim 0:
        the model output's batch size (or, for "empirical", the most common one among the layers)
        differs from it, e.g. a position embedding called on arange(T) or a Linear fed
        x.view(-1, d). Its statistics would not be per-example. Shapes only: no host sync."""
        sizes = {b: {b.batch_size(x) for x in b.inputs} for b in captured}
        n = getattr(self, "_out_batch", None)
        if n is None:
            counts: Dict[int, int] = defaultdict(int)
            for ss in sizes.values():
                for v in ss:
                    counts[v] += 1
            n = max(counts, key=lambda v: (counts[v], v))
        self._out_batch = None
        for b, ss in sizes.items():
            if ss != {n}:
                self._warn_once(("batch", b.name),
                                f"module {b.name!r} saw inputs with batch size(s) {sorted(ss)} while "
                                f"the model's batch size is {n}: K-FAC reads dim 0 of a layer's "
                                f"input as the example index, so this block's statistics are not "
                                f"per-example (a position embedding called on arange(T)? a layer fed "
                                f"x.view(-1, d)?). Keep the batch dimension first (e.g. "
                                f"pos.expand(N, T)) or leave the module out with skip=")

    # ------------------------------------------------------------------ EKFAC scalings
    def _fold_ekfac(self, b: Block, grads, calls, alpha: float) -> None:
        """Fold one backward pass into the block's EKFAC estimate S_hat in the CURRENT eigenbasis,
        or, when that basis is replaced in this step's inverse update (or does not exist yet),
        keep the pass until the new basis exists (``update_inverses`` computes S from it)."""
        if self.inverse_due() or "QG" not in b.inverse or "S" not in b.inverse:
            self._ekfac_stash[b].append((list(b.inputs), list(grads), list(calls), alpha))
            return
        part = b.ekfac_sums(b.inputs, grads, calls, b.inverse["QG"], b.inverse.get("QA"))
        part = part.to(b.factor_dtype) * alpha
        b.S_hat = part if getattr(b, "S_hat", None) is None else b.S_hat + part

    def reduce_scalings(self, s_hats: "OrderedDict[Block, torch.Tensor]"):
        """Combine EKFAC estimates across processes: identity in one process; with
        torch.distributed, weighted by each rank's example count like G (every rank passes the
        same blocks, in the same order)."""
        if self.dist is None or not s_hats:
            return s_hats
        return self.dist.reduce_scalings(s_hats, {b: self._ekfac_n.get(b, 0) for b in s_hats})

    def _merge_scalings(self, blocks: List[Block]) -> None:
        """S <- rho S + (1 - rho) S_hat, rho = min(1 - 1/k, ema_decay), k counting accepted
        estimates since the eigenbasis last changed; on the device, guarded like the factors."""
        s_hats = OrderedDict((b, b.S_hat) for b in blocks if getattr(b, "S_hat", None) is not None)
        for b in blocks:
            b.S_hat = None
        for b, s_hat in self.reduce_scalings(s_hats).items():
            S = b.inverse["S"]
            ok = torch.isfinite(s_hat).all()
            if self._reject is not None:      # the whole step was rejected (see KFAC.step)
                ok = ok & ~self._reject.to(ok.device)
            count = b.ekfac_count + ok.to(b.ekfac_count.dtype)
            rho = (1.0 - 1.0 / count.clamp_min(1.0)).clamp(0.0, self.ema_decay)
            S.copy_(torch.where(ok, S * rho + s_hat * (1.0 - rho), S))   # in place: S is a stack view
            b.ekfac_count = count

    def _scalings_after_decomposition(self, blocks: List[Block]) -> None:
        """EKFAC after a new eigenbasis: S restarts in it, from this step's statistics (kept by
        ``_fold_ekfac``) when there are any, else from the K-FAC eigenvalues lamG lamA^T."""
        ests: "OrderedDict[Block, torch.Tensor]" = OrderedDict()
        for b in blocks:
            inv = b.inverse
            for inputs, grads, calls, alpha in self._ekfac_stash.pop(b, []):
                part = b.ekfac_sums(inputs, grads, calls, inv["QG"], inv.get("QA"))
                part = part.to(b.factor_dtype) * alpha
                ests[b] = part if b not in ests else ests[b] + part
        ests = self.reduce_scalings(ests)      # over ranks (identity in one process)
        for b in blocks:
            inv = b.inverse
            lamA = inv["lamA"].clamp_min(0)
            init = inv["lamG"].clamp_min(0).unsqueeze(-1) * lamA.unsqueeze(-2)
            est = ests.get(b)
            dev = init.device
            if est is None:
                inv["S"], b.ekfac_count = init, torch.zeros((), dtype=b.factor_dtype, device=dev)
            else:
                ok = torch.isfinite(est).all()
                inv["S"] = torch.where(ok, est, init)
                b.ekfac_count = ok.to(b.factor_dtype)
        self._ekfac_stash = defaultdict(list)

    def _defer_check(self, flags: torch.Tensor, names: List[str]) -> None:
        """Read the skip flags on the host later, without waiting for the device now (not in a
        compiled region: ``b.skipped`` still counts there, the warning is not emitted)."""
        if torch.compiler.is_compiling():
            return
        if flags.device.type == "cpu":
            self._deferred.append((None, flags.clone(), names))
        else:
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._deferred.append((ev, host, names))
        self._poll_deferred()

    def _poll_deferred(self) -> None:
        if torch.compiler.is_compiling():
            return
        keep = []
        for ev, host, names in self._deferred:
            if ev is not None and not ev.query():
                keep.append((ev, host, names))
                continue
            for name, bad in zip(names, host.numpy().tolist()):
                if bad:
                    self._warn_once(("nonfinite", name),
                                    f"block {name!r}: non-finite activations or gradients; its "
                                    f"factor update was skipped (warned once per block)")
        self._deferred = keep

    def _warn_once(self, key, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"kfac_kernels: {msg}", KFACWarning, stacklevel=3)

    # ------------------------------------------------------------------ inverse update
    def inverse_due(self) -> bool:
        """Whether this step's ``step()`` recomputes the decompositions: every ``inverse_every``
        steps, and during the first ``inverse_every`` steps after every factor update when
        ``inverse_warmup`` (the early factors move fastest: a basis from step 0 reused for
        ``inverse_every`` steps can blow a run up without a KL clip)."""
        if self._needs_inverse:
            return True
        if self.factor_updates == 0:
            return False
        if self.steps % self.inverse_every == 0:
            return True
        return self.inverse_warmup and self.steps < self.inverse_every and self._capturing

    def _check_damping(self, damping) -> None:
        if torch.compiler.is_compiling():   # checked eagerly by the setter; symbolic when traced
            return
        if not isinstance(damping, (int, float)) or isinstance(damping, bool) or damping < 0 \
                or not math.isfinite(damping):
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")

    def has_inverse(self, b: Block) -> bool:
        """Whether block ``b`` can be preconditioned (with torch.distributed, its decomposition
        may live on another rank: see kfac_kernels.distributed)."""
        return len(b.inverse) > 0 if self.dist is None else self.dist.has_inverse(b)

    def update_inverses(self) -> None:
        """Decompose every factor, batched by size; the fallback chain handles failures."""
        self._poll_deferred()
        ready = [b for b in self.blocks.values() if b.A is not None]
        if not ready:
            return
        if self.dist is not None:     # this rank's share, then the results are shared
            self.dist.update_inverses(ready)
        else:
            self.decompose(ready)
        if self.inverse == "ekfac":       # distributed: every rank holds every basis here
            self._scalings_after_decomposition(ready)
        self._needs_inverse = False
        self.inverse_updates += 1
        self._regroup()

    def decompose(self, blocks: List[Block], only: Optional[set] = None) -> None:
        """Decompose the factors of ``blocks`` (``only``: just these (block, "A"|"G") pairs, the
        others' entries in ``block.inverse`` are left as they are).

        A stacked block (groups, channels) is decomposed through one ``_Slice`` per member, so
        its matrices join the size buckets (one batched call with every other factor of that
        size) and the fallback chain works per matrix. A diagonal A is not decomposed; under
        inverse="cholesky" a block with a diagonal A has its G decomposed by eigh instead (the
        pi-damped update is then computed exactly in G's eigenbasis, docs/layers.md)."""
        units, slices = [], {}
        for b in blocks:
            if b.stacked:
                slices[b] = [_Slice(b, i) for i in range(b.num_stack)]
                units += slices[b]
            else:
                units.append(b)
        if only is not None:
            only = set(only) | {(p, w) for b, parts in slices.items() for p in parts
                                for w in ("A", "G") if (b, w) in only}
        if self.inverse in ("eigh", "ekfac"):
            self._eigh_all(units, only)
        else:
            self._cholesky_all([u for u in units if not u.diag_A], only)
            self._eigh_all([u for u in units if u.diag_A], only)
        for b, parts in slices.items():
            new = {k: torch.stack([p.inverse[k] for p in parts]) for k in parts[0].inverse}
            b.inverse = new if only is None else {**b.inverse, **new}
        for b in blocks:
            if b.diag_A and (only is None or (b, "A") in only):
                b.inverse["lamA"] = b.A.to(b.factor_dtype, copy=True)

    def _buckets(self, blocks: List[Block], mats: Callable[[Block], Dict[str, torch.Tensor]]):
        buckets: Dict[tuple, List[Tuple[Block, str, torch.Tensor]]] = OrderedDict()
        for b in blocks:
            for which, f in mats(b).items():
                buckets.setdefault((f.shape[-1], f.dtype, f.device), []).append((b, which, f))
        return buckets

    def _eigh_all(self, blocks: List[Block], only: Optional[set] = None) -> None:
        new: Dict[Block, dict] = defaultdict(dict)
        for key, items in self._buckets(blocks, lambda b: _select(b, only)).items():
            stack = torch.stack([f for _, _, f in items])
            prev = [b.inverse.get("Q" + which) for b, which, _ in items]
            kw = {}
            if (self.full_eigh_every > 1 and self.inverse_updates % self.full_eigh_every != 0
                    and all(q is not None and q.dtype == stack.dtype for q in prev)):
                # between full decompositions: one warm-started subspace-iteration refresh
                kw = dict(method="refresh", prev_eigenvectors=torch.stack(prev))
            lam, Q, info = ops.symeig(stack, return_info=True, backend=self.op_backend("symeig"),
                                      **kw)
            bad = ((info != 0) | ~_finite_each(stack)).nonzero().flatten().tolist()  # 1 sync/bucket
            for i, (b, which, f) in enumerate(items):
                if i in bad:
                    l_i, q_i = self._eigh_fallback(b, which, f)
                else:
                    l_i, q_i = lam[i], Q[i]
                new[b]["lam" + which] = l_i
                new[b]["Q" + which] = q_i
        for b, entries in new.items():
            b.inverse = entries if only is None else {**b.inverse, **entries}

    def _restart_if_nonfinite(self, b: Block, which: str, f: torch.Tensor) -> bool:
        """A running factor that is not finite (a corrupted checkpoint, an overflow) has no
        decomposition, and the running average would keep it non-finite for ever: it restarts,
        so that the block's next accepted estimate is taken whole (first-estimate rule). Read on
        the host: the inverse update synchronises anyway. Returns whether it restarted."""
        if bool(torch.isfinite(f).all()):
            return False
        src = getattr(b, which)
        if src is f or (src.dtype != f.dtype and src.shape == f.shape):  # f: a widened copy
            setattr(b, which, torch.zeros_like(src))
            b.count = torch.zeros_like(b.count)
        self._warn_once(("restart", b.name, which),
                        f"block {b.name!r}: the running factor {which} is not finite; it "
                        f"restarts from the next factor estimate")
        return True

    def _eigh_fallback(self, b: Block, which: str, f: torch.Tensor):
        """Retry in float64, then with added damping, then keep the previous decomposition."""
        reasons = []
        finite_in = not self._restart_if_nonfinite(b, which, f)
        lam, Q, info = ops.symeig(f.double().unsqueeze(0), return_info=True, backend="torch")
        if int(info[0]) == 0 and finite_in:
            self._warn_once(("eigh", b.name, which, "fp64"),
                            f"block {b.name!r}: eigendecomposition of {which} failed in "
                            f"{f.dtype}; recovered in float64")
            return lam[0].to(f.dtype), Q[0].to(f.dtype)
        reasons.append("float64 retry failed")
        finite = torch.nan_to_num(f.double(), nan=0.0, posinf=0.0, neginf=0.0)
        shift = max(float(self.damping), 1e-6 * float(finite.diagonal().abs().mean()), 1e-12)
        eye = torch.eye(f.shape[-1], dtype=torch.float64, device=f.device)
        lam, Q, info = ops.symeig((finite + shift * eye).unsqueeze(0), return_info=True,
                                  backend="torch")
        if int(info[0]) == 0 and bool(torch.isfinite(f).all()):
            self._warn_once(("eigh", b.name, which, "damped"),
                            f"block {b.name!r}: eigendecomposition of {which} failed; used "
                            f"{which} + {shift:.3g} I ({'; '.join(reasons)})")
            return lam[0].to(f.dtype), Q[0].to(f.dtype)
        reasons.append("damped retry failed")
        if "Q" + which in b.inverse:
            self._warn_once(("eigh", b.name, which, "previous"),
                            f"block {b.name!r}: eigendecomposition of {which} failed; keeping "
                            f"the previous one ({'; '.join(reasons)})")
            return b.inverse["lam" + which].clone(), b.inverse["Q" + which].clone()
        self._warn_once(("eigh", b.name, which, "identity"),
                        f"block {b.name!r}: eigendecomposition of {which} failed and there is no "
                        f"previous one; using a scaled identity ({'; '.join(reasons)})")
        n = f.shape[-1]
        scale = finite.diagonal().abs().mean().clamp_min(1e-12).to(f.dtype)
        return scale * torch.ones(n, dtype=f.dtype, device=f.device), torch.eye(
            n, dtype=f.dtype, device=f.device)

    def pi(self, b: Block) -> torch.Tensor:
        """π = sqrt((tr A / dim A) / (tr G / dim G)) on the device (1 where undefined); one per
        member of a stacked block, and a diagonal A's trace is its sum."""
        diagA = b.A if b.diag_A else b.A.diagonal(dim1=-2, dim2=-1)
        ta = diagA.to(b.factor_dtype).sum(-1) / b.A.shape[-1]
        tg = b.G.diagonal(dim1=-2, dim2=-1).to(b.factor_dtype).sum(-1) / b.G.shape[-1]
        pi = torch.sqrt(ta / tg)
        return torch.where(torch.isfinite(pi) & (pi > 0), pi, torch.ones_like(pi))

    def _cholesky_all(self, blocks: List[Block], only: Optional[set] = None) -> None:
        root = math.sqrt(self.damping)
        dampings = {}
        for b in blocks:
            pi = self.pi(b)
            dampings[(b, "A")] = pi * root
            dampings[(b, "G")] = root / pi
        new: Dict[Block, dict] = defaultdict(dict)
        for key, items in self._buckets(blocks, lambda b: _select(b, only)).items():
            stack = torch.stack([f for _, _, f in items])
            damp = torch.stack([dampings[(b, w)].to(stack.dtype) for b, w, _ in items])
            inv, info = ops.damped_inverse(stack, damp, return_info=True, backend=self.op_backend("damped_inverse"))
            # a "successful" factorisation of a matrix with an inf can still give a finite inverse
            bad = ((info != 0) | ~_finite_each(stack) | ~_finite_each(inv)).nonzero().flatten().tolist()
            for i, (b, which, f) in enumerate(items):
                new[b][which + "_inv"] = (self._cholesky_fallback(b, which, f, damp[i])
                                          if i in bad else inv[i])
        for b, entries in new.items():
            b.inverse = entries if only is None else {**b.inverse, **entries}

    def _cholesky_fallback(self, b: Block, which: str, f: torch.Tensor, damp: torch.Tensor):
        finite_in = not self._restart_if_nonfinite(b, which, f)
        inv, info = ops.damped_inverse(f.double().unsqueeze(0), damp.double().reshape(1),
                                       return_info=True, backend="torch")
        if int(info[0]) == 0 and finite_in and bool(torch.isfinite(inv[0].to(f.dtype)).all()):
            self._warn_once(("chol", b.name, which, "fp64"),
                            f"block {b.name!r}: Cholesky of {which} failed in {f.dtype}; "
                            f"recovered in float64")
            return inv[0].to(f.dtype)
        finite = torch.nan_to_num(f.double(), nan=0.0, posinf=0.0, neginf=0.0)
        extra = max(float(damp), 1e-6 * float(finite.diagonal().abs().mean()), 1e-12)
        for _ in range(3):
            extra *= 10.0
            inv, info = ops.damped_inverse(finite.unsqueeze(0), float(damp) + extra,
                                           return_info=True, backend="torch")
            if int(info[0]) == 0 and finite_in and bool(torch.isfinite(inv[0].to(f.dtype)).all()):
                self._warn_once(("chol", b.name, which, "damped"),
                                f"block {b.name!r}: Cholesky of {which} failed; used extra "
                                f"damping {extra:.3g}")
                return inv[0].to(f.dtype)
        key = which + "_inv"
        if key in b.inverse:
            self._warn_once(("chol", b.name, which, "previous"),
                            f"block {b.name!r}: Cholesky of {which} failed; keeping the previous "
                            f"inverse")
            return b.inverse[key].clone()
        self._warn_once(("chol", b.name, which, "identity"),
                        f"block {b.name!r}: Cholesky of {which} failed and there is no previous "
                        f"inverse; using a scaled identity")
        n = f.shape[-1]
        scale = 1.0 / (finite.diagonal().abs().mean() + float(damp)).clamp_min(1e-12)
        return (scale * torch.eye(n, dtype=torch.float64, device=f.device)).to(f.dtype)

    def _regroup(self) -> None:
        groups: Dict[tuple, List[Block]] = OrderedDict()
        for b in self.blocks.values():
            if b.inverse:
                key = (b.shape[-2:], b.factor_dtype, b.weight.device, tuple(sorted(b.inverse)))
                groups.setdefault(key, []).append(b)
        self._groups = [_Group(k, v) for k, v in groups.items()]
        for g in self._groups:
            g.restack()

    # ------------------------------------------------------------------ preconditioning
    def precondition(self, grads: Dict[Block, torch.Tensor]):
        """Preconditioned directions for the given blocks' gradient matrices.

        Returns ``({block: U}, {block: <U, V> (0-d device tensor)})``; blocks of one shape go
        through one batched op call. With torch.distributed and ``grad_worker_fraction < 1``
        each rank preconditions its share and the directions are broadcast.
        """
        self._check_damping(self.damping)
        if self.dist is not None:
            return self.dist.precondition(grads, self.precondition_local)
        return self.precondition_local(grads)

    def precondition_local(self, grads: Dict[Block, torch.Tensor]):
        """:meth:`precondition` with the decompositions this process holds."""
        out_u: Dict[Block, torch.Tensor] = {}
        out_dot: Dict[Block, torch.Tensor] = {}
        for g in self._groups:
            members = [b for b in g.blocks if b in grads]
            if not members:
                continue
            if len(members) == len(g.blocks):
                st = g.stacks
            else:
                idx = torch.tensor(g.rows(members), device=next(iter(g.stacks.values())).device)
                st = {k: v.index_select(0, idx) for k, v in g.stacks.items()}
            if len(members) == 1:
                b0 = members[0]
                V = grads[b0] if b0.stacked else grads[b0].unsqueeze(0)
            else:
                V = torch.cat([grads[b] if b.stacked else grads[b].unsqueeze(0) for b in members])
            if "lamA" in st and "QA" not in st:     # diagonal A (embeddings)
                U, dot = self._precondition_diag(members, st, V)
            elif self.inverse == "cholesky":
                U, dot = ops.kron_precondition_inverse(V, st["G_inv"], st["A_inv"],
                                                       return_dot=True, backend=self.op_backend("kron_precondition_inverse"))
            elif self.inverse == "ekfac" and "S" in st:
                U, dot = ops.ekfac_precondition(V, st["QG"], st["QA"], st["S"], self.damping,
                                                return_dot=True, backend=self.op_backend("ekfac_precondition"))
            elif self.damping_mode == "pi":
                root = math.sqrt(self.damping)
                pis = torch.cat([self.pi(b).reshape(-1) for b in members]).to(st["lamA"].dtype)
                lamA = st["lamA"].clamp_min(0) + (pis * root).unsqueeze(-1)
                lamG = st["lamG"].clamp_min(0) + (root / pis).unsqueeze(-1)
                U, dot = ops.kron_precondition_eigen(V, st["QG"], lamG, st["QA"], lamA, 0.0,
                                                     return_dot=True, backend=self.op_backend("kron_precondition_eigen"))
            else:
                U, dot = ops.kron_precondition_eigen(V, st["QG"], st["lamG"], st["QA"],
                                                     st["lamA"], float(self.damping),
                                                     return_dot=True, backend=self.op_backend("kron_precondition_eigen"))
            off = 0
            for b in members:
                if b.stacked:
                    out_u[b] = U[off:off + b.num_stack]
                    out_dot[b] = dot[off:off + b.num_stack].sum()
                else:
                    out_u[b] = U[off]
                    out_dot[b] = dot[off]
                off += b.num_stack
        return out_u, out_dot

    def _precondition_diag(self, members: List[Block], st: Dict[str, torch.Tensor], V):
        """Blocks whose A is diagonal: ``ops.kron_precondition_diag`` with scalings lamG a^T
        (eigenvalue damping), the pi-damped product (damping_mode "pi", also under
        inverse="cholesky": the same update, with G's inverse through its eigenbasis) or EKFAC's S."""
        backend = self.op_backend("kron_precondition_diag")
        if "S" in st:
            return ops.kron_precondition_diag(V, st["QG"], st["S"], float(self.damping),
                                              return_dot=True, backend=backend)
        lamG, lamA = st["lamG"].clamp_min(0), st["lamA"].clamp_min(0)
        damping = float(self.damping)
        if self.damping_mode == "pi":
            root = math.sqrt(self.damping)
            pis = torch.cat([self.pi(b).reshape(-1) for b in members]).to(lamA.dtype)
            lamA = lamA + (pis * root).unsqueeze(-1)
            lamG = lamG + (root / pis).unsqueeze(-1)
            damping = 0.0
        return ops.kron_precondition_diag(V, st["QG"], lamG.unsqueeze(-1) * lamA.unsqueeze(-2),
                                          damping, return_dot=True, backend=backend)

    def end_step(self) -> None:
        self.steps += 1
        self._ekfac_stash = defaultdict(list)
        self._set_capture()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        blocks = {}
        for name, b in self.blocks.items():
            entry = {"shape": tuple(b.shape), "kind": b.kind}
            if b.A is not None:
                entry.update(A=b.A.clone(), G=b.G.clone(), count=b.count.clone(),
                             skipped=b.skipped.clone(),
                             inverse={k: v.clone() for k, v in b.inverse.items()})
                if getattr(b, "ekfac_count", None) is not None:
                    entry["ekfac_count"] = b.ekfac_count.clone()
            blocks[name] = entry
        sd = {"version": 1, "steps": self.steps, "factor_updates": self.factor_updates,
              "inverse_updates": self.inverse_updates, "inverse": self.inverse,
              "needs_inverse": self._needs_inverse, "blocks": blocks,
              "generator": (None if self.generator is None else
                            (str(self.generator.device), self.generator.get_state()))}
        if self.dist is not None:   # decompositions held by other ranks, the sampling seed
            self.dist.fill_state_dict(sd)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if not isinstance(sd, dict) or "blocks" not in sd:
            raise ValueError("not a kfac_kernels state_dict: its 'kfac' entry is missing or has "
                             "no 'blocks'")
        mine, theirs = set(self.blocks), set(sd["blocks"])
        if mine != theirs:
            raise ValueError(
                "state_dict is from a different model: blocks only in the state_dict: "
                f"{sorted(theirs - mine) or 'none'}; blocks only in this model: "
                f"{sorted(mine - theirs) or 'none'}")
        for name, entry in sd["blocks"].items():
            b = self.blocks[name]
            if entry.get("kind", b.kind) != b.kind:
                raise ValueError(f"state_dict is from a different model: block {name!r} is a "
                                 f"{entry['kind']} block there and a {b.kind} block here")
            if tuple(entry["shape"]) != tuple(b.shape):
                raise ValueError(f"state_dict is from a different model: block {name!r} has shape "
                                 f"{tuple(entry['shape'])} there and {tuple(b.shape)} here")
        same_inverse = sd.get("inverse") == self.inverse
        for name, entry in sd["blocks"].items():
            b = self.blocks[name]
            dev = b.weight.device
            if "A" not in entry:
                b.A = b.G = b.count = b.skipped = None
                b.inverse = {}
                continue
            # factors keep their own dtype (never cast to the parameter dtype)
            b.A, b.G = entry["A"].to(dev), entry["G"].to(dev)
            b.count, b.skipped = entry["count"].to(dev), entry["skipped"].to(dev)
            b.inverse = ({k: v.to(dev) for k, v in entry["inverse"].items()}
                         if same_inverse else {})
            b.ekfac_count = (entry["ekfac_count"].to(dev)
                             if same_inverse and "ekfac_count" in entry else None)
            if b.ekfac_count is None and "S" in b.inverse:
                b.ekfac_count = torch.ones((), dtype=b.factor_dtype, device=dev)
        self.steps = int(sd["steps"])
        self.factor_updates = int(sd["factor_updates"])
        self.inverse_updates = int(sd.get("inverse_updates", 0))
        self._needs_inverse = bool(sd.get("needs_inverse", False)) or (
            not same_inverse and self.factor_updates > 0)
        gen = sd.get("generator")
        if gen is not None:
            self.generator = torch.Generator(device=gen[0])
            self.generator.set_state(gen[1])
        self._clear_capture()
        self._set_capture()
        if self.dist is not None:   # keep this rank's share of the decompositions
            self.dist.load_state_dict(sd)
        self._regroup()

    # ------------------------------------------------------------------ description
    def describe(self, extra_fallback: Sequence[Tuple[str, str]] = ()) -> str:
        dev = next(iter(self.blocks.values())).weight.device
        rows = [("block", "module", "grad shape", "A", "G", "factors")]
        for b in self.blocks.values():
            r = b.describe_row()
            rows.append((r["name"] or "<model>", r["module"], r["shape"], r["A"], r["G"],
                         str(b.factor_dtype).replace("torch.", "")))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines = [f"K-FAC: {len(self.blocks)} blocks, curvature={self.curvature}"
                 f"{'/' + self.likelihood if self.likelihood else ''}, inverse={self.inverse}, "
                 f"damping={self.damping} ({self.damping_mode}), weight_sharing="
                 f"{self.weight_sharing}, factor_every={self.factor_every}, inverse_every="
                 f"{self.inverse_every}"]
        lines += [fmt.format(*rows[0]), fmt.format(*["-" * w for w in widths])]
        lines += [fmt.format(*r) for r in rows[1:]]
        lines.append("backends on " + str(dev) + ": " + ", ".join(
            f"{op}={self._backend_name(op, dev)}" for op in
            ("syrk_update", "conv_input_factor",
             "symeig" if self.inverse != "cholesky" else "damped_inverse",
             {"eigh": "kron_precondition_eigen", "ekfac": "ekfac_precondition",
              "cholesky": "kron_precondition_inverse"}[self.inverse])))
        if self.dist is not None:
            lines.append(self.dist.describe())
        fb = [(n, r) for n, _, r in self.fallback] + list(extra_fallback)
        if fb:
            lines.append(f"fallback parameters (plain first-order rule): {len(fb)}")
            lines += [f"  {n}: {r}" for n, r in fb]
        else:
            lines.append("fallback parameters: none")
        return "\n".join(lines)

    def _backend_name(self, op: str, dev) -> str:
        try:
            return ops._registry.resolve(op, self.backend, dev)
        except ops.BackendUnavailable as exc:
            return f"unavailable ({exc})"


def _remove_hooks(handles: list) -> None:
    """Remove hook handles in place (also the finaliser of a collected engine)."""
    for h in handles:
        h.remove()
    handles.clear()


def _finite_each(stack: torch.Tensor) -> torch.Tensor:
    """[B] bool: whether each matrix of a [B, n, n] stack is finite (on the device)."""
    return torch.isfinite(stack).flatten(1).all(1)

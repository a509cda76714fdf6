"""Capture: the hooks that record what the factors need, and the extra curvature passes.

On steps where factors are due, a forward hook on every block's module keeps the layer's input
(in the block's record, ``capture.of(block).inputs``: :mod:`kfac_kernels.capture_state`) and
puts a hook on its output that records the output-gradient. Gradients come from the user's
``loss.backward()`` ("empirical") or from the extra backward passes of
:meth:`Capture.curvature_backward` ("fisher": sampled targets, "ggn": one pass per column of the
output Hessian's square root). After each pass the gradients are folded into each block's
``G_hat`` (batched, :mod:`kfac_kernels.factors`), so memory stays bounded however many passes a
metric needs.

Stale steps: ``zero_grad`` marks what was captured so far; a backward pass that follows before
``step()`` means that step was never taken, and its captures are dropped (not merged into the
next factor update). :meth:`Capture.reset` is the one reset of every capture buffer.

Passes that are not the step's (docs/robustness.md, "What a hook records"):

* a forward or backward pass inside a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``,
  ``jacfwd``, ``jvp``, ``functional_call`` under them) is never recorded: its tensors are the
  transform's wrappers, not a batch of the step;
* an output-gradient is recorded only from a backward pass that accumulates into the layer's
  weight ``.grad`` (``loss.backward()``, ``opt.backward``) or from the metric's own curvature
  passes; a ``torch.autograd.grad`` call (a Hessian-vector product, an input gradient, a
  Jacobian probe) leaves the factors alone. Layer inputs captured by a forward pass whose outputs
  only such calls reached are dropped, silently, at the layer's next captured call or at
  ``step()``: the next real step sees exactly what it would have seen without the probe.

A micro-batch (gradient accumulation) is a forward pass whose outputs a recording backward pass
reached, after an earlier recording backward pass of the same step.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Union, cast

import torch

from .blocks import Block
from .capture_state import BlockCapture
from .curvature import (check_likelihood_output, ggn_num_columns, ggn_vectors, positions,
                        sample_vectors)

if TYPE_CHECKING:    # for the annotations only (no import cycle at run time)
    from .comm import LocalComm
    from .factors import FactorStatistics
    from .health import Health
    from .inverses.base import InverseKind
    from .options import Options


__all__ = ["Capture"]

_GGN_WARN_COLUMNS = 256


class Capture:
    """Hooks, gradient buffers and curvature passes of one engine.

    Collaborators (passed in): ``factors`` (runs the G jobs), ``kind`` (the inverse kind, which
    may want every pass: EKFAC), ``comm`` (told when backward passes start and end), ``health``
    and ``inverse_due()`` (whether this step replaces the eigenbasis)."""

    def __init__(self, blocks: Dict[str, Block], opts: Options, *, factors: FactorStatistics,
                 kind: InverseKind, comm: LocalComm, health: Health,
                 inverse_due: Callable[[], bool]):
        self.blocks = blocks
        self.opts = opts
        self.factors, self.kind, self.comm, self.health = factors, kind, comm, health
        self.inverse_due = inverse_due
        # the per-step record of each block: written here only (read through :meth:`of`)
        self._state: Dict[Block, BlockCapture] = {b: BlockCapture() for b in blocks.values()}
        self.generator: Optional[torch.Generator] = None   # the sampler of curvature="fisher"
        self.capturing = False            # are forward passes of this step captured?
        self.g_active = False             # do output-gradient hooks record right now?
        self.grads: Dict[Block, List[torch.Tensor]] = defaultdict(list)
        self.grad_calls: Dict[Block, List[int]] = defaultdict(list)   # call index of each grad
        # each captured call's output and its version (None: no hook on it), so that the
        # curvature passes differentiate with respect to the layer outputs (nothing else)
        self.outputs: Dict[Block, List[Optional[tuple]]] = defaultdict(list)
        self.modes: set = set()           # module.training of the calls captured this step
        self.pending_passes = 0           # backward passes folded into G_hat this step
        self.micro_batches = 0            # micro-batches of this step combined so far
        self.compiled = False             # captured inside torch.compile(model)
        self.boundary = False             # a forward pass came after this step's backward
        self.positions: Optional[int] = None   # loss terms per example (token_mean)
        self.out_batch: Optional[int] = None   # batch size of the last curvature pass output
        self.seen_backward = False        # captured statistics have seen a backward pass
        self.stale = False                # ... before the last zero_grad
        self.in_pass = False              # inside this step's own curvature passes
        # calls (absolute index) that only a torch.autograd.grad pass reached so far, and each
        # captured call's cell [alive, training] (a dropped call's hook records nothing)
        self.foreign: Dict[Block, set] = defaultdict(set)
        self.cells: Dict[Block, Dict[int, list]] = defaultdict(dict)
        # the AccumulateGrad node of each weight: does a backward pass write its .grad?
        self._accumulators: Dict[int, tuple] = {}
        self._call_weight: Dict[Block, torch.Tensor] = {}   # set by the pre-hook (FSDP2)
        self.hooks = [b.module.register_forward_hook(self._forward_hook(b))
                      for b in blocks.values()]
        # the weights the forward calls used, when the strategy asks (FSDP2 unshards them)
        self.used: Dict[Block, List[torch.Tensor]] = {}
        if comm.records_used_weights:
            self.hooks += [b.module.register_forward_pre_hook(self._pre_hook(b))
                           for b in blocks.values()]
        # the hooks hold the capture weakly: an optimiser dropped without close() frees its
        # factors, and its hooks are removed when it is collected
        weakref.finalize(self, _remove_hooks, self.hooks)

    # ------------------------------------------------------------------ the records
    def of(self, block: Block) -> BlockCapture:
        """The block's capture record of this step (read it; :class:`Capture` writes it)."""
        return self._state[block]

    def captured_blocks(self) -> List[Block]:
        """The blocks with statistics captured this step, in the engine's order."""
        return [b for b in self.blocks.values() if self._state[b].captured()]

    def examples(self, block: Block) -> int:
        """Examples behind the block's statistics of this step on this process: the combined
        micro-batches', or the batch size of the captured inputs."""
        rec = self._state[block]
        if rec.A_ready is not None:
            return rec.examples
        return block.batch_size(rec.inputs[0])

    def input_counts(self) -> tuple:
        """(inputs held, micro-batches combined) of every block: changes when a capture does."""
        return tuple((len(r.inputs), r.A_ready is not None) for r in self._state.values())

    def a_statistics(self, blocks: List[Block]):
        """This step's A estimate of each of ``blocks`` (:meth:`FactorStatistics.a_statistics`)."""
        return self.factors.a_statistics(blocks, self.of)

    def statistics(self, blocks: List[Block]):
        """This step's (A, G) estimates of ``blocks`` (:meth:`FactorStatistics.statistics`)."""
        return self.factors.statistics(blocks, self.of)

    def rescale_g(self, factor: torch.Tensor) -> None:
        """Multiply every G estimate of this step by a device factor (a GradScaler's 1/S^2)."""
        for rec in self._state.values():
            if rec.G_hat is not None:
                rec.G_hat = rec.G_hat * factor.to(rec.G_hat.dtype)

    # ------------------------------------------------------------------ switches
    def start_step(self, step: int) -> None:
        """Capture this step when factors are due."""
        self.capturing = step % self.opts.factor_every == 0
        self.g_active = self.capturing and self.opts.curvature == "empirical"

    @contextlib.contextmanager
    def paused(self):
        """Capture nothing inside (extra forward/backward passes of step control)."""
        saved = self.capturing, self.g_active
        self.capturing = self.g_active = False
        try:
            yield
        finally:
            self.capturing, self.g_active = saved

    def close(self) -> None:
        _remove_hooks(self.hooks)
        self.reset()

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, block: Block):
        ref = weakref.ref(self)

        def hook(module, args, output):
            self = ref()
            if self is None or not self.capturing or not torch.is_grad_enabled() or not args:
                return
            if module is not block.module:   # a deepcopy of the model carries the hook along
                return
            x = args[0]
            if not isinstance(x, torch.Tensor):
                return
            compiling = torch.compiler.is_compiling()
            if not compiling and _transformed(x, output):
                return                       # a torch.func transform's pass: not the step's
            block.check_input(x)
            if block.A is None:
                block.follow_weight_dtype()   # before the first factors: the weight's dtype now
            if self.foreign.get(block):
                self.drop_foreign(block)     # an earlier torch.autograd.grad probe's calls
            if self.seen_backward and not self.stale:
                # a forward pass after this step's backward: a new micro-batch (gradient
                # accumulation) if a backward pass follows before zero_grad(), else the next
                # step's forward run before its zero_grad() (decided by what comes next)
                self.boundary = True
            rec = self._state[block]
            rec.inputs.append(block.prepare_input(x.detach(), output))
            if isinstance(output, torch.Tensor) and output.requires_grad:
                # the call's absolute index (inputs of closed micro-batches were dropped)
                call = len(rec.inputs) - 1 + rec.call_offset
                cell = self.cells[block][call] = [True, module.training]
                # the weight this call used (FSDP2: the unsharded one its pre-hook recorded;
                # module.weight is already resharded when this hook runs)
                w = (self._call_weight.pop(block, None) if self.comm.records_used_weights
                     else getattr(module, "weight", None))
                acc = None if compiling else self._accumulator(w)
                hook = self._grad_hook(block, call, cell, acc)
                if compiling:
                    self.compiled = True
                    # inside torch.compile(model) the hook would be traced with this step's
                    # flags frozen into it (g_active is off during the forward pass of
                    # "fisher"/"ggn"): keep it an opaque call that reads them when it runs
                    hook = torch.compiler.disable(hook)
                output.register_hook(hook)
                self.outputs[block].append((output, output._version))
            else:
                self.modes.add(module.training)     # no backward pass can reach this call
                self.outputs[block].append(None)
        return hook

    def _pre_hook(self, block: Block):
        """Record the weight this call of the module uses (FSDP2 has just set its unsharded
        parameter): the curvature passes differentiate with respect to it."""
        ref = weakref.ref(self)

        def hook(module, args):
            self = ref()
            if self is None or not self.capturing or not torch.is_grad_enabled():
                return
            if module is not block.module:
                return
            if not torch.compiler.is_compiling() and _transformed(*args):
                return
            w = cast(torch.Tensor, module.weight)
            self._call_weight[block] = w
            used = self.used.setdefault(block, [])
            if not any(u is w for u in used):
                used.append(w)
        return hook

    def _accumulator(self, w) -> Optional[object]:
        """The AccumulateGrad node of weight ``w`` (kept alive here, so that every graph built on
        ``w`` uses this one), or None where ``w`` is no leaf that requires a gradient."""
        if not isinstance(w, torch.Tensor) or not w.requires_grad or not w.is_leaf:
            return None
        got = self._accumulators.get(id(w))
        if got is not None and got[0]() is w:
            return got[1]
        with torch.enable_grad():
            # a view of a leaf that requires grad always has a grad_fn
            node = cast(Any, w.view_as(w).grad_fn).next_functions[0][0]
        self._accumulators[id(w)] = (weakref.ref(w), node)
        return node

    def _grad_hook(self, block: Block, call: int = 0, cell: Optional[list] = None,
                   acc=None):
        ref = weakref.ref(self)

        def hook(grad):
            self = ref()
            if self is None or (cell is not None and not cell[0]):
                return                       # the capture is gone, or the call was dropped
            if not (self.in_pass or _accumulates(acc)):
                # a torch.autograd.grad call (or a backward pass that does not write this
                # layer's .grad): not the step's; its forward pass is dropped unless a
                # recording pass reaches the same call later
                if self.capturing:
                    self.foreign[block].add(call)
                return
            if self.foreign.get(block):
                self.foreign[block].discard(call)
            if self.g_active:
                if self.stale:
                    self.drop_stale()
                if self.boundary:
                    self.close_micro_batch()
                if not self.micro_batches:    # (accumulating: reduced once, at step())
                    self.comm.backward_started(self)
                rec = self._state[block]
                self.grads[block].append(grad.detach() if grad.requires_grad else grad)
                # call index among the inputs kept (stale ones dropped: see drop_stale)
                self.grad_calls[block].append(call - rec.call_offset)
                self.seen_backward = True
                rec.at_backward = len(rec.inputs)
        return hook

    # ------------------------------------------------------------------ stale steps
    def mark_stale(self) -> None:
        """Called by ``zero_grad``: statistics that have already seen a backward pass belong to
        an earlier step; if another backward pass comes before ``step()``, they are dropped."""
        self.stale = self.seen_backward
        self.boundary = False

    def drop_foreign(self, block: Block) -> bool:
        """Drop the block's trailing calls that only ``torch.autograd.grad`` passes reached (a
        probe between steps, or after the step's backward); calls that a recording pass reached
        after them are kept, and then so are they (as before: entered with no gradient).
        True when something was dropped."""
        calls = self.foreign.pop(block, None)
        if not calls:
            return False
        rec = self._state[block]
        off, n = rec.call_offset, len(rec.inputs)
        first = min(calls) - off
        if first < 0 or any(c not in calls for c in range(first + off, n + off)):
            return False
        if first < rec.at_backward:
            return False
        for c in range(first + off, n + off):
            cell = self.cells[block].pop(c, None)
            if cell is not None:
                cell[0] = False
        rec.inputs = rec.inputs[:first]
        self.outputs[block] = self.outputs[block][:first]
        return True

    def drop_all_foreign(self) -> None:
        for b in list(self.foreign):
            self.drop_foreign(b)

    def drop_stale(self) -> None:
        """Drop the captures of a step that was never taken; layer inputs captured after its
        backward pass (this step's forward, run before ``zero_grad``) are kept."""
        for b in self.blocks.values():
            rec = self._state[b]
            mark = rec.at_backward
            rec.drop_step(mark)                    # hooks know absolute calls
            self.outputs[b] = self.outputs[b][mark:]
        self.micro_batches = 0
        self.boundary = False
        self.grads = defaultdict(list)
        self.grad_calls = defaultdict(list)
        self.kind.drop_capture()
        self.factors.arena.release()
        self.pending_passes = 0
        self.seen_backward = self.stale = False
        self.health.warn_once(("stale",), "statistics captured for a step whose step() never ran "
                              "were dropped (a backward pass followed zero_grad() without a "
                              "step() in between; warned once)")

    def reset(self) -> None:
        """Forget everything captured this step (after the factor update, or a dropped step)."""
        self.comm.clear()
        self.factors.arena.release()
        for b in self.blocks.values():
            self._state[b].clear()
        self.grads = defaultdict(list)
        self.grad_calls = defaultdict(list)
        self.used = {}
        self.outputs = defaultdict(list)
        self.modes = set()
        self.pending_passes = 0
        self.micro_batches = 0
        self.boundary = False
        self.positions = None
        self.seen_backward = self.stale = False
        self.foreign = defaultdict(set)
        self.cells = defaultdict(dict)

    # ------------------------------------------------------------------ gradient accumulation
    @torch.no_grad()
    def close_micro_batch(self) -> None:
        """A backward pass (or curvature pass) after a forward pass that followed this step's
        backward: the micro-batch before is complete. Combine its statistics into each block's
        weighted sums (A by its example count, G and EKFAC's scalings by
        :meth:`FactorStatistics.micro_batch_weight`) and free its inputs, so that the step's
        factors are those of the concatenated batch, uneven sizes included; the new micro-batch's
        inputs (captured after the mark) stay. :meth:`finish_micro_batches` turns the sums into
        the step's estimates."""
        self.boundary = False
        empirical = self.opts.curvature == "empirical"
        self.comm.clear()    # reductions launched for the first micro-batch alone: not needed
        if empirical and self.has_grads():
            self.fold(1.0, empirical=True)     # a loss scale (GradScaler) is applied at the end
        st = self._state
        live = [b for b in self.blocks.values() if st[b].inputs]
        marks = {b: st[b].at_backward for b in live}
        got = [b for b in live if st[b].G_hat is not None and marks[b]]
        if got:
            rest = {b: st[b].inputs[marks[b]:] for b in got}
            for b in got:                     # this micro-batch's inputs only
                st[b].inputs = st[b].inputs[:marks[b]]
            self.factors.check_batch_sizes(got, self.take_out_batch(), self.of)
            a_hats = self.a_statistics(got)
            for b in got:
                rec = st[b]
                n = b.batch_size(rec.inputs[0])
                u = self.factors.micro_batch_weight(n, empirical)
                a, g = a_hats[b] * float(n), cast(torch.Tensor, rec.G_hat) * u   # in `got`
                rec.A_acc = a if rec.A_acc is None else rec.A_acc + a
                rec.G_acc = g if rec.G_acc is None else rec.G_acc + g
                rec.examples += n
                self.kind.close_micro_batch(b, u)
                rec.inputs = rec.inputs + rest[b]
            self.micro_batches += 1
        for b in live:
            mark = marks[b]
            st[b].keep_from(mark)
            self.outputs[b] = self.outputs[b][mark:]
        self.grads = defaultdict(list)
        self.grad_calls = defaultdict(list)
        self.out_batch = None
        self.seen_backward = False

    def drop_unbackwarded(self) -> None:
        """At ``step()``: layer inputs captured after the step's last backward pass had no backward
        pass of their own (an evaluation batch with gradients on): leave them out, warning once."""
        self.drop_all_foreign()
        if not self.boundary:
            return
        self.boundary = False
        dropped = False
        for b in self.blocks.values():
            rec = self._state[b]
            mark = rec.at_backward
            if rec.inputs and mark < len(rec.inputs):
                rec.inputs = rec.inputs[:mark]
                self.outputs[b] = self.outputs[b][:mark]
                dropped = True
        if not dropped:
            return
        self.health.warn_once(
            ("no-backward",), "a forward pass with gradients enabled reached step() without a "
            "backward pass (an evaluation batch?): its layer inputs were left out of the factors; "
            "run such passes under torch.no_grad() or inside `with opt.paused():` (warned once)")

    def finish_micro_batches(self, g_rescale: Optional[torch.Tensor] = None) -> bool:
        """At ``step()`` after gradient accumulation (False, nothing done, without it): close the
        last micro-batch and leave in every block's record the step's estimates, A in
        ``A_ready`` and G in ``G_hat``. ``g_rescale``: the device factor of a GradScaler's loss
        scale ("empirical")."""
        self.drop_unbackwarded()
        if not self.micro_batches:
            return False
        self.boundary = True         # the last micro-batch is complete too
        for rec in self._state.values():
            if rec.inputs:
                rec.at_backward = len(rec.inputs)
        self.close_micro_batch()
        empirical = self.opts.curvature == "empirical"
        for b in self.blocks.values():
            rec = self._state[b]
            if not rec.examples:
                continue
            # examples > 0: close_micro_batch accumulated both
            A_acc, G_acc = cast(torch.Tensor, rec.A_acc), cast(torch.Tensor, rec.G_acc)
            f: Union[float, torch.Tensor] = self.factors.micro_batch_final(rec.examples,
                                                                           empirical)
            if empirical and g_rescale is not None:
                f = g_rescale.to(G_acc.dtype) * f
            rec.A_ready = A_acc / float(rec.examples)
            rec.G_hat = G_acc * f
            rec.A_acc = rec.G_acc = None
            self.kind.finish_micro_batches(b, f, rec.examples)
        return True

    def check_modes(self) -> None:
        """Warn (once) when one step captured forward passes in training and in evaluation mode:
        an evaluation pass run with gradients enabled enters the factors like a training one."""
        # the modes of the calls still captured (a dropped probe's call does not count)
        modes = self.modes | {c[1] for cells in self.cells.values() for c in cells.values()}
        if len(modes) > 1:
            self.health.warn_once(
                ("modes",), "this step captured forward passes in training mode and in eval mode: "
                "a forward pass run with gradients enabled enters the factors, evaluation passes "
                "included; run them under torch.no_grad() or inside `with opt.paused():` (warned "
                "once)")

    def pass_targets(self, weights: List[torch.Tensor]) -> List[torch.Tensor]:
        """What a curvature pass differentiates: the captured layer outputs (their hooks record
        the output-gradients, and autograd computes no weight gradient), unless an output was
        modified in place after the layer (an in-place activation: its gradient would then be
        the activation's), in which case the weights, as a plain backward pass would."""
        outs = [o for lst in self.outputs.values() for o in lst if o is not None]
        # a compiled model's layer outputs are outputs of one compiled graph, beside the model's
        # output rather than before it: the weights are the way into its backward
        if not outs or self.compiled or any(t._version != v for t, v in outs):
            return weights
        return [t for t, _ in outs]

    # ------------------------------------------------------------------ folding passes
    def has_grads(self) -> bool:
        return any(self.grads.values())

    def fold(self, weight: float, empirical: bool,
             g_rescale: Optional[torch.Tensor] = None) -> None:
        """Fold the output-gradients of one backward pass into each block's G_hat (and hand them
        to an inverse kind that wants every pass). ``g_rescale``: a device factor on the
        gradients of a scaled loss (1/S^2 under a GradScaler)."""
        jobs = []
        wants = self.kind.wants_passes
        for block, grads in self.grads.items():
            if not grads:
                continue
            rec = self._state[block]
            n = block.batch_size(rec.inputs[0]) if rec.inputs else block.batch_size(grads[0])
            if n == 0:
                self.reset()
                raise _empty_batch(repr(block.name))
            calls = self.grad_calls[block]
            scale = self.factors.g_scale(n, weight, empirical, self._positions())
            for job in block.pass_jobs(rec.inputs, grads, calls, scale, rec.per_call):
                jobs.append((block, job))
            if wants and rec.inputs:
                alpha: Union[float, torch.Tensor] = scale / n
                if g_rescale is not None:
                    alpha = g_rescale * alpha
                self.kind.on_pass(block, rec.inputs, grads, calls, alpha, n,
                                  basis_replaced=self.inverse_due())
        self.grads = defaultdict(list)
        self.grad_calls = defaultdict(list)
        into = {b: self._state[b].G_hat for b, _ in jobs}
        for b, g in self.factors.run_jobs(jobs, target="G_hat", into=into).items():
            self._state[b].G_hat = g
        if jobs:
            self.pending_passes += 1

    def _positions(self) -> int:
        if self.opts.loss_reduction != "token_mean":
            return 1
        if self.positions is None:
            raise ValueError(
                "loss_reduction='token_mean' needs the model output to count each example's "
                "positions: call opt.backward(loss, out) (also with curvature='empirical')")
        return self.positions

    def take_out_batch(self) -> Optional[int]:
        n, self.out_batch = self.out_batch, None
        return n

    # ------------------------------------------------------------------ curvature passes
    def curvature_backward(self, out: Optional[torch.Tensor], step: int) -> None:
        """The extra backward passes of "fisher" / "ggn" (before the loss's own backward)."""
        opts = self.opts
        if self.capturing and self.boundary and not self.stale:
            self.close_micro_batch()         # the micro-batch before is complete
        if self.capturing and opts.loss_reduction == "token_mean" and isinstance(out, torch.Tensor):
            self.positions = positions(opts.likelihood if opts.curvature != "empirical" else None,
                                       out)
        if not self.capturing or opts.curvature == "empirical":
            return
        self.drop_all_foreign()
        if out is None:
            raise ValueError(f"curvature={opts.curvature!r} needs the model outputs: call "
                             f"opt.backward(loss, out) with the output the loss was computed from")
        if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == 0:
            self.reset()
            raise _empty_batch("the model output")
        likelihood = cast(str, opts.likelihood)    # resolve() refused fisher / ggn without one
        check_likelihood_output(likelihood, out)
        if self.stale:
            self.drop_stale()
        self.out_batch = out.shape[0]
        st = self._state
        batch = {b.batch_size(st[b].inputs[0]) for b in self.blocks.values() if st[b].inputs}
        if batch and out.shape[0] not in batch:
            seen = sorted({b.batch_size(x) for b in self.blocks.values() for x in st[b].inputs})
            raise ValueError(
                f"the output's batch size {out.shape[0]} does not match the batch sizes of the "
                f"layer inputs captured this step {seen}: every forward pass run with gradients "
                f"enabled since the last step() is captured, so an extra pass (an evaluation "
                f"batch, a second micro-batch) mixes in; run extra passes under torch.no_grad() "
                f"or inside `with opt.paused():`, and keep the batch dimension first")
        if self.used:      # the parameters the forward pass used (FSDP2: the unsharded ones)
            weights: List[torch.Tensor] = []
            for b in self.blocks.values():
                if st[b].inputs:
                    for w in self.used.get(b) or [b.weight]:
                        if not any(w is u for u in weights):
                            weights.append(w)
        else:
            weights = [b.weight for b in self.blocks.values() if st[b].inputs]
        if not weights:
            return
        if not self.micro_batches:
            self.comm.curvature_started(self)
        # a strategy may seed every rank's draws per step (later micro-batches draw on)
        if opts.curvature == "fisher" and not self.micro_batches:
            gen = self.comm.sampler(self.generator, out.device, step)
            if gen is not None:
                self.generator = gen
        gen = self._sampler(out)
        if opts.curvature == "fisher":
            vectors, weight = sample_vectors(likelihood, out, opts.mc_samples,
                                             gen), 1.0 / opts.mc_samples
        else:
            cols = ggn_num_columns(likelihood, out)
            if cols > _GGN_WARN_COLUMNS:
                self.health.warn_once(
                    ("ggn", cols), f"curvature='ggn' back-propagates one vector per output "
                    f"coordinate: {cols} backward passes per factor update; curvature='fisher' "
                    f"estimates the same metric with mc_samples passes")
            vectors, weight = ggn_vectors(likelihood, out), 1.0
        targets = self.pass_targets(weights)
        self.g_active = self.in_pass = True
        try:
            for v in vectors:
                torch.autograd.grad(out, targets, grad_outputs=v, retain_graph=True,
                                    allow_unused=True)
                self.fold(weight, empirical=False)
        finally:
            self.g_active = self.in_pass = False
        if not self.micro_batches:       # G complete (unless more micro-batches come): reduce
            self.comm.curvature_finished(self)

    def _sampler(self, out: torch.Tensor) -> torch.Generator:
        """The sampling generator on the output's device, seeded once (``seed``, else from the
        host RNG: no device sync)."""
        if self.generator is None or self.generator.device != out.device:
            self.generator = torch.Generator(device=out.device)
            seed = self.opts.seed if self.opts.seed is not None else int(
                torch.randint(0, 2 ** 62, (1,)).item())
            self.generator.manual_seed(seed)
        return self.generator


_functorch = getattr(torch._C, "_functorch", None)
_will_execute = getattr(torch._C, "_will_engine_execute_node", None)


def _empty_batch(where: str) -> ValueError:
    return ValueError(
        f"an empty batch (0 examples) reached {where} in a K-FAC step: the factors are "
        f"averages over the batch's examples and there are none; skip empty batches (e.g. "
        f"DataLoader(drop_last=True) or `if len(x) == 0: continue`), or run such a pass inside "
        f"`with opt.paused():`")


def _transformed(*tensors) -> bool:
    """Is a torch.func transform running (vmap, grad, jacrev, jacfwd, jvp), or is any of the
    tensors one of its wrappers? Such passes are not the step's."""
    if _functorch is None:
        return False
    if _functorch.maybe_current_level() is not None:
        return True
    return any(isinstance(t, torch.Tensor) and _functorch.is_functorch_wrapped_tensor(t)
               for t in tensors)


def _accumulates(acc) -> bool:
    """Does the running backward pass write into the .grad of the weight whose AccumulateGrad
    node is ``acc``? ``loss.backward()`` does; ``torch.autograd.grad`` does not (torch reports a
    running autograd.grad by refusing the question for a leaf's node), nor does
    ``backward(inputs=...)`` without this weight. Unknown (no node, no API): True."""
    if acc is None or _will_execute is None:
        return True
    try:
        return bool(_will_execute(acc))
    except RuntimeError:
        return False


def _remove_hooks(handles: list) -> None:
    """Remove hook handles in place (also the finaliser of a collected capture)."""
    for h in handles:
        h.remove()
    handles.clear()

"""The communication interface: :class:`LocalComm`, and the small types every strategy shares.

The engine calls a strategy at fixed points of a step and never asks whether it is
distributed; everything a strategy needs is passed in. :class:`LocalComm` (one process, no
communication) is the default and documents the interface; :mod:`kfac_kernels.comm.ddp`
implements it over torch.distributed (DDP-style data parallelism) and
:mod:`kfac_kernels.comm.fsdp` for models sharded with FSDP2's ``fully_shard``;
:func:`kfac_kernels.comm.factory.strategy_for` picks one. A new strategy subclasses
:class:`LocalComm` and overrides what it must.

Call points, in step order:

* capture: :meth:`backward_started` (first output-gradient of a factor step),
  :meth:`curvature_started` / :meth:`curvature_finished` (around "fisher"/"ggn" passes),
  :meth:`clear` (the step's capture was dropped);
* factor update: :meth:`factor_statistics` (this step's estimates, averaged over processes),
  :meth:`reduce_scalings` (EKFAC), :meth:`agree` (one skip decision for all processes);
* inverse update: :meth:`decompose_here` (which factors this process decomposes), then, after
  the engine decomposed them, :meth:`share_inverses` (the results to the processes that need
  them); :meth:`has_inverse`;
* every step: :meth:`full_tensors` (the block gradients as whole tensors),
  :meth:`precondition_here` (which gradients this process preconditions), then, after the step
  preconditioned them, :meth:`share_directions` (every process gets every direction),
  :meth:`local_part` (this process's part of a parameter's direction).

The caller does the work between a ``*_here`` call and its ``share_*`` call: a strategy is handed
arguments and returns values, it never calls back into the engine or the step.
* state: :meth:`fill_state_dict`, :meth:`load_state_dict`, :meth:`consolidate`; the optimiser's
  own state: :meth:`consolidate_optimizer_state`, :meth:`fill_optimizer_state`,
  :meth:`load_optimizer_state`; :meth:`describe`.

Shared with the strategies: :class:`MismatchError`, :class:`CommStats` (what a strategy sent) and
:class:`DistributedOptions` (the options a strategy is built from). This module imports nothing
from the other files of the package.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Collection, Dict, List, Mapping, Optional,
                    Protocol, Sequence, Set, Tuple)

import torch

if TYPE_CHECKING:   # annotations only: this module imports nothing of the package at run time
    from ..blocks import Block
    from ..capture import Capture

class StrategyOptions(Protocol):
    """What the strategies read of the optimiser's :class:`kfac_kernels.options.Options` (whose
    attributes come from the ``OPTIONS`` table)."""
    distributed: Optional[bool]
    process_group: Any
    grad_worker_fraction: float
    assignment: str
    bucket_cap_mb: float
    loss_reduction: str
    curvature: str
    seed: Optional[int]

    def agreement_lines(self) -> List[str]: ...


#: this step's statistics per block (an ordered dict: the blocks' order is every rank's order)
Stats = Dict["Block", Tuple[torch.Tensor, torch.Tensor]]
#: the factors one process decomposes: a set of (block, "A"|"G") pairs, None for all of them
FactorSet = Optional[Set[Tuple["Block", str]]]
#: ``({block: U}, {block: <U, V>})``: preconditioned directions and their inner products
Directions = Tuple[Dict["Block", torch.Tensor], Dict["Block", torch.Tensor]]

__all__ = ["LocalComm", "MismatchError", "CommStats", "DistributedOptions", "StrategyOptions"]


class MismatchError(ValueError):
    """Ranks disagree about something that must be identical (model, options, layers used)."""


class CommStats:
    """Payload bytes and collective calls issued by this rank, per phase ("factor", "inverse",
    "precondition", "gradient", "checkpoint", "setup")."""

    def __init__(self) -> None:
        self.bytes: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)

    def add(self, phase: str, t: torch.Tensor) -> None:
        self.bytes[phase] += t.numel() * t.element_size()
        self.calls[phase] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


@dataclass(frozen=True)
class DistributedOptions:
    """How K-FAC uses torch.distributed: the optimisers' options ``distributed`` (here
    ``enabled``), ``process_group``, ``grad_worker_fraction``, ``assignment`` and
    ``bucket_cap_mb``, declared and documented in :mod:`kfac_kernels.options` (which also checks
    them). ``k = grad_worker_fraction * world`` must divide the world size."""
    enabled: Optional[bool] = None
    process_group: Any = None
    grad_worker_fraction: float = 1.0
    assignment: str = "compute"
    bucket_cap_mb: float = 25.0

    def __post_init__(self) -> None:
        from .. import options as o
        for name, value in (("distributed", self.enabled),
                            ("grad_worker_fraction", self.grad_worker_fraction),
                            ("assignment", self.assignment), ("bucket_cap_mb", self.bucket_cap_mb)):
            check = o.OPTION[name].check
            if check is not None:
                check(name, value)

    @classmethod
    def from_options(cls, opts: StrategyOptions) -> "DistributedOptions":
        return cls(enabled=opts.distributed, process_group=opts.process_group,
                   grad_worker_fraction=opts.grad_worker_fraction, assignment=opts.assignment,
                   bucket_cap_mb=opts.bucket_cap_mb)


class LocalComm:
    """One process: every hook is the identity or does the local work directly."""

    world = 1
    rank = 0
    #: whether :meth:`share_directions` runs collectives (``opt.compile()`` then compiles only
    #: the local preconditioning)
    precondition_collectives = False
    #: whether the capture records, at each forward call of a block's module, the weight tensor
    #: that call used (FSDP2 swaps in an unsharded parameter): the curvature passes of
    #: "fisher"/"ggn" then differentiate with respect to those instead of ``block.weight``
    records_used_weights = False

    # ---------------------------------------------------------------- capture
    def backward_started(self, capture: "Capture") -> None:
        """The first output-gradient of a factor step arrived: the forward pass is over
        (``capture``: the engine's :class:`kfac_kernels.capture.Capture`, read-only here; its
        ``a_statistics(blocks)`` computes this process's A estimates)."""

    def curvature_started(self, capture: "Capture") -> None:
        """The curvature passes of "fisher"/"ggn" begin."""

    def sampler(self, generator: Optional[torch.Generator], device: torch.device,
                step: int) -> Optional[torch.Generator]:
        """curvature="fisher": the generator to draw this step's samples from (seeded as the
        strategy needs), or None for the engine's own (seeded once)."""
        return None

    def curvature_finished(self, capture: "Capture") -> None:
        """The curvature passes are over: G is complete."""

    def clear(self) -> None:
        """The engine dropped this step's capture."""

    # ---------------------------------------------------------------- factor update
    def agree(self, found: torch.Tensor) -> torch.Tensor:
        """Device flag ``found`` (> 0: skip the step) as every process must see it."""
        return found

    def factor_statistics(self, captured: List[Block], capture: "Capture") -> Stats:
        """``{block: (A_hat, G_hat)}`` of this step (``capture.statistics(blocks)`` computes
        this process's own)."""
        return capture.statistics(captured)

    def reduce_scalings(self, s_hats: Dict[Block, torch.Tensor],
                        counts: Mapping[Block, int]) -> Dict[Block, torch.Tensor]:
        """EKFAC's per-block estimates combined over processes (``counts``: examples behind
        each)."""
        return s_hats

    # ---------------------------------------------------------------- inverse update
    def decompose_here(self, ready: List[Block]) -> FactorSet:
        """Which factors of the blocks ``ready`` this process decomposes: a set of
        (block, "A"|"G") pairs, or None for all of them (here)."""
        return None

    def share_inverses(self, ready: List[Block]) -> None:
        """After this process decomposed its part (:meth:`decompose_here`) of ``ready``: send
        the decompositions to the processes that precondition with them."""

    def has_inverse(self, b: Block) -> bool:
        """Whether block ``b`` can be preconditioned in this process."""
        return len(b.inverse) > 0

    # ---------------------------------------------------------------- every step
    def full_tensors(self, blocks: Sequence[Block], values_for: Collection[Block]
                     ) -> Dict[Block, Tuple[List[Optional[torch.Tensor]],
                                            Optional[List[torch.Tensor]]]]:
        """``{block: (grads, values)}``: whole (unsharded) gradients and, for the blocks in
        ``values_for``, parameter values, in ``block.params`` order, of the blocks among
        ``blocks`` whose parameters this process holds only part of. Blocks left out (all of them
        here) read their own parameters."""
        return {}

    def precondition_here(self, grads: Dict[Block, torch.Tensor]) -> Dict[Block, torch.Tensor]:
        """The part of ``grads`` (``{block: V}``) that this process preconditions with the
        decompositions it holds: all of it here."""
        return grads

    def share_directions(self, grads: Dict[Block, torch.Tensor], U: Dict[Block, torch.Tensor],
                         dots: Dict[Block, torch.Tensor]) -> Directions:
        """``(U, dots)`` for every block of ``grads``, from this process's own ``(U, dots)`` of
        the blocks :meth:`precondition_here` gave it: the same here."""
        return U, dots

    def local_part(self, p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """The part of ``full`` (shaped like parameter ``p``) that this process applies to its
        part of ``p``: all of it here."""
        return full

    # ---------------------------------------------------------------- state
    def fill_state_dict(self, sd: dict, inverse_updates: int) -> None:
        """Complete the engine's state_dict (decompositions held elsewhere, seeds)."""

    def load_state_dict(self, sd: dict) -> None:
        """After the engine loaded ``sd``."""

    def consolidate(self, to: int, inverse_updates: int) -> None:
        """Collective: gather what rank ``to`` needs for a complete state_dict."""

    def consolidate_optimizer_state(self, params: Sequence[torch.Tensor],
                                    state: Mapping[torch.Tensor, Dict[str, Any]], to: int,
                                    steps: int) -> None:
        """Collective: gather the optimiser state (``state``: ``{param: {key: tensor}}`` of
        ``params``, in param-group order) that rank ``to`` needs for a complete state_dict."""

    def fill_optimizer_state(self, sd_state: dict, steps: int) -> dict:
        """The ``state`` entry of the optimiser's state_dict, complete (whole tensors)."""
        return sd_state

    def load_optimizer_state(self, params: Sequence[torch.Tensor],
                             state: Mapping[torch.Tensor, Dict[str, Any]]) -> None:
        """After the optimiser loaded its state: keep this process's part of it."""

    def describe(self) -> Optional[str]:
        return None

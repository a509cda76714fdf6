"""Curvature blocks: one per layer, holding the Kronecker factors of the layer's curvature.

A block knows (i) how to turn the inputs and output-gradients captured from its module into
factor statistics, (ii) its saved state, a :class:`~kfac_kernels.blocks.state.BlockState`
record (the running factors A and G, their counters, the decompositions) that other parts read
through the block's properties and change only through the record's methods, and (iii) how to
read the gradient of its parameters as one [out, in(+1)] matrix and write an update back.
Everything that sequences these steps (when factors update, when inverses are recomputed,
batching across blocks) lives in :mod:`kfac_kernels.engine`; the arithmetic goes through
:mod:`kfac_kernels.ops`.

Conventions (docs/math.md, "One block per layer" and "Layers used at T positions"): the layer computes s = W abar with abar = [a; 1] when it has a bias
(homogeneous coordinate LAST), W = [weight.flatten(1) | bias]. With N examples and T positions per
example (sequence positions, conv patches, repeated calls):

* expand: A = 1/(N T) sum_{n,t} abar abar^T,   G = 1/N sum_{n,t} g g^T
* reduce: abar_n = mean_t abar_{n,t}, g_n = sum_t g_{n,t}, A = 1/N sum abar_n abar_n^T,
  G = 1/N sum g_n g_n^T
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Dict, List, Optional, Sequence, Tuple, cast

import torch

from ..ops._registry import op_backend
from .state import BlockState

WEIGHT_SHARING = ("expand", "reduce")


class BlockInputError(ValueError):
    """A module was called with inputs its block cannot interpret consistently."""


@dataclass
class SyrkJob:
    """``target += alpha * xbar^T xbar`` for a block's factor estimate (batched by the engine);
    with ``diag`` only its diagonal, ``target += alpha * sum_rows xbar * xbar`` (a vector: the
    factor side is kept diagonal, see :meth:`Block.make_diagonal`)."""
    x: torch.Tensor
    alpha: float
    homogeneous: bool
    diag: bool = False


class Block:
    """Base class of the Kronecker-factored blocks (A ⊗ G over [weight | bias]).

    Layouts beyond one [out, in(+1)] matrix (see docs/layers.md):

    * ``stacked``: the block holds ``num_stack`` independent Kronecker blocks of one shape (the
      groups of a grouped convolution, the channels of a normalisation layer); A, G, the gradient
      matrix and every inverse entry carry a leading stack dim, so the batched ops do all of them
      in one call.
    * ``diag_A``: A is diagonal and stored as a vector (an embedding's token frequencies); its
      eigenbasis is the identity, and preconditioning goes through ``ops.kron_precondition_diag``.
    * ``diag_G``: likewise for G. A side the block would otherwise keep dense is made diagonal by
      :meth:`make_diagonal` when it is larger than ``max_factor_dim`` (a vocabulary-sized output
      or input; docs/math.md, "Diagonal factor sides"): the block then keeps the diagonal of
      that Kronecker factor, never the n x n matrix.
    """

    #: the layer family ("linear", "conv", "embedding", ...); not the inverse kind (``inverse=``)
    family = "block"
    stacked = False
    diag_A = False
    diag_G = False
    #: the sides :meth:`make_diagonal` can keep as diagonals (those whose statistics are syrk jobs)
    diagonal_sides: Tuple[str, ...] = ()

    def __init__(self, name: str, module: torch.nn.Module, *, weight_sharing: str = "expand",
                 factor_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
        if weight_sharing not in WEIGHT_SHARING:
            raise ValueError(f"weight_sharing must be one of {WEIGHT_SHARING}, got "
                             f"{weight_sharing!r}")
        self.name = name
        self.module = module
        self.backend = backend
        self.weight_sharing = weight_sharing
        self.weight = cast(torch.Tensor, module.weight)
        bias = getattr(module, "bias", None)
        self.bias: Optional[torch.Tensor] = bias if (bias is not None and bias.requires_grad) else None
        self.params: List[torch.Tensor] = [self.weight] + ([self.bias] if self.bias is not None else [])
        self.has_bias = self.bias is not None
        self.out_dim = self.weight.shape[0]
        # including the homogeneous coord (from the shape: a sharded weight is not indexed)
        self.in_dim = math.prod(self.weight.shape[1:]) + int(self.has_bias)
        self._follow_weight = factor_dtype is None   # factor_dtype not given: the weight's
        self.factor_dtype = factor_dtype or _dtype_for(self.weight)

        # the saved state: running factors, counters, decompositions (device tensors: no host
        # sync to maintain). Read through the properties below; changed only through the
        # record's methods (blocks/state.py)
        self.state = BlockState()
        # what a step captures for this block (inputs, estimates, micro-batch sums) is not kept
        # here: kfac_kernels.capture.Capture owns it (capture.of(block), capture_state.py)

    # ------------------------------------------------------------------ saved state (read-only)
    @property
    def A(self) -> Optional[torch.Tensor]:
        """The running factor A (None before the first factor update)."""
        return self.state.A

    @property
    def G(self) -> Optional[torch.Tensor]:
        """The running factor G (None before the first factor update)."""
        return self.state.G

    @property
    def count(self) -> Optional[torch.Tensor]:
        """Factor estimates accepted (0-d, on the device)."""
        return self.state.count

    @property
    def skipped(self) -> Optional[torch.Tensor]:
        """Factor estimates rejected: non-finite statistics or a rejected step (0-d int64)."""
        return self.state.skipped

    @property
    def inverse(self) -> Dict[str, torch.Tensor]:
        """The inverse kind's entries: {"QA","lamA","QG","lamG"} or {"A_inv","G_inv"}, plus
        EKFAC's "S" or Eigen-Adam's "M2", "t"."""
        return self.state.inverse

    @property
    def ekfac_count(self) -> Optional[torch.Tensor]:
        """EKFAC: accepted scalings estimates since the eigenbasis changed."""
        return self.state.ekfac_count

    def follow_weight_dtype(self) -> None:
        """Before the first factor update, with ``factor_dtype`` not given: take the weight's
        dtype as it is now (a ``model.double()`` after ``KFAC(model)`` gets float64 factors).
        Once factors exist their dtype stays (convert the model before the first step)."""
        if self._follow_weight and self.A is None:
            self.factor_dtype = _dtype_for(self.weight)

    # ------------------------------------------------------------------ shapes
    @property
    def shape(self) -> Tuple[int, ...]:
        """(out, in(+1)): the shape of the gradient matrix this block preconditions
        ((num_stack, out, in) for a stacked block)."""
        if self.stacked:
            return (self.num_stack, self.out_dim, self.in_dim)
        return (self.out_dim, self.in_dim)

    @property
    def num_stack(self) -> int:
        """How many Kronecker blocks this block holds (1 unless ``stacked``)."""
        return 1

    def is_diagonal(self, which: str) -> bool:
        """Whether factor ``which`` ("A" or "G") is kept as its diagonal (a vector)."""
        return self.diag_A if which == "A" else self.diag_G

    def factor_dim(self, which: str) -> int:
        """The side n of factor ``which`` (per member of a stacked block)."""
        return self.in_dim if which == "A" else self.out_dim

    def factor_shape(self, which: str) -> Tuple[int, ...]:
        """The shape of the running factor ``which``: [n], [n, n] or [num_stack, n, n]."""
        n = self.factor_dim(which)
        if self.is_diagonal(which):
            return (n,)
        return (self.num_stack, n, n) if self.stacked else (n, n)

    def make_diagonal(self, which: str) -> None:
        """Keep factor ``which`` as its diagonal from now on (before any statistics exist)."""
        if which not in self.diagonal_sides:
            raise ValueError(f"block {self.name!r} ({type(self).__name__}) cannot keep its "
                             f"factor {which} diagonal")
        if self.A is not None:
            raise RuntimeError(f"block {self.name!r} already holds factors")
        setattr(self, "diag_" + which, True)

    def sided(self, jobs: List[SyrkJob], which: str) -> List[SyrkJob]:
        """``jobs`` (of factor ``which``) as diagonal jobs when that side is diagonal."""
        if not self.is_diagonal(which):
            return jobs
        return [SyrkJob(j.x, j.alpha, j.homogeneous, diag=True) for j in jobs]

    @property
    def kind(self) -> str:
        """Old name of :attr:`family`, kept so code written before it was renamed still works
        ("kind" now means only the inverse kind)."""
        return self.family

    def describe_row(self) -> dict:
        def side(which):
            n = self.factor_dim(which)
            return f"{n} (diagonal)" if self.is_diagonal(which) else f"{n}x{n}"
        return dict(name=self.name, family=self.family, module=type(self.module).__name__,
                    shape=f"{self.out_dim}x{self.in_dim}", A=side("A"), G=side("G"),
                    bias=self.has_bias)

    def backend_for(self, op: str) -> str:
        """The backend this block's ops run on (``ops._registry.op_backend`` of the engine's
        ``backend=`` choice, the same rule the engine's shared ops follow)."""
        return op_backend(self.backend, op)

    # ------------------------------------------------------------------ capture interface
    def batch_size(self, x: torch.Tensor) -> int:
        return x.shape[0]

    def prepare_input(self, x: torch.Tensor, output) -> torch.Tensor:
        """What the capture keeps of one call's input ``x`` (detached); ``output`` is the call's
        output (a transposed convolution needs its size)."""
        return x

    def check_input(self, x: torch.Tensor) -> None:
        """Raise BlockInputError for inputs the block cannot interpret."""

    def a_jobs(self, inputs: List[torch.Tensor]) -> Tuple[List[SyrkJob], Optional[torch.Tensor]]:
        """Factor estimate A_hat of this step as syrk jobs and/or a ready matrix (summed)."""
        raise NotImplementedError

    def g_jobs(self, grads: List[torch.Tensor], scale: float) -> List[SyrkJob]:
        """Contribution of one backward pass to G_hat: ``scale * sum_rows g g^T / N`` (expand) or
        the reduce form; ``scale`` carries the curvature type's rescaling and pass weight."""
        raise NotImplementedError

    def pass_jobs(self, inputs: List[torch.Tensor], grads: List[torch.Tensor], calls: List[int],
                  scale: float, cache: Optional[dict] = None) -> List[SyrkJob]:
        """:meth:`g_jobs` for blocks that need to know which call produced each output-gradient:
        ``calls[j]`` indexes ``inputs`` (the micro-batch's captured inputs) for ``grads[j]``
        (backward passes deliver gradients in their own order). ``cache``: a dict, keyed by
        call, the block may keep per-call tensors in for the micro-batch's other passes (the
        capture clears it with the inputs). Defaults to ``g_jobs``."""
        return self.g_jobs(grads, scale)

    # ------------------------------------------------------------------ EKFAC
    def ekfac_sums(self, inputs: List[torch.Tensor], grads: List[torch.Tensor], calls: List[int],
                   QG: torch.Tensor, QA: Optional[torch.Tensor]) -> torch.Tensor:
        """``sum_n (QG^T D_n QA)^2`` for one backward pass, D_n the per-example gradient matrix
        (George et al. 2018); the engine scales it by the pass weight / N."""
        raise NotImplementedError(f"{type(self).__name__} has no EKFAC statistics")

    def paired(self, inputs: List[torch.Tensor], grads: List[torch.Tensor], calls: List[int],
               ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(input, output-gradient) of each call that received a gradient, checking that every
        call has the same batch size (a per-example quantity sums over calls)."""
        pairs = [(inputs[c], g) for g, c in zip(grads, calls)]
        sizes = {self.batch_size(x) for x, _ in pairs}
        if len(sizes) > 1:
            raise BlockInputError(
                f"module {self.name!r} was called with batch sizes {sorted(sizes)} in one step; "
                f"per-example statistics (EKFAC, normalisation layers) need one batch size")
        return pairs

    # ------------------------------------------------------------------ gradients
    def param_grads(self, grads: Optional[Sequence[Optional[torch.Tensor]]] = None
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(weight gradient, bias gradient) as the gradient matrix reads them: ``grads`` in
        ``self.params`` order when given (a communication strategy's full, gathered gradients of
        sharded parameters), else the parameters' ``.grad``. (None, None) when the weight has no
        gradient; a missing bias gradient reads as zeros (None without a bias)."""
        if grads is None:
            grads = [p.grad for p in self.params]
        gw = grads[0]
        if gw is None:
            return None, None
        if not self.has_bias:
            return gw, None
        gb = grads[1]
        if gb is None:
            assert self.bias is not None            # has_bias
            gb = torch.zeros(self.bias.shape, dtype=self.bias.dtype, device=gw.device)
        return gw, gb

    def param_values(self, values: Optional[Sequence[torch.Tensor]] = None
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias or None), detached: ``values`` in ``self.params`` order when given (full
        tensors of sharded parameters), else the parameters themselves."""
        if values is None:
            values = [p.detach() for p in self.params]
        return values[0], (values[1] if self.has_bias else None)

    def grad_matrix(self, grads: Optional[Sequence[Optional[torch.Tensor]]] = None
                    ) -> Optional[torch.Tensor]:
        """[out, in(+1)] gradient (None when the module got no gradient this step); ``grads``:
        see :meth:`param_grads`."""
        gw, gb = self.param_grads(grads)
        if gw is None:
            return None
        if gw.dim() != 2:
            gw = gw.reshape(self.out_dim, -1)
        if gb is None:
            return gw
        return torch.cat([gw, gb.view(-1, 1)], dim=1)

    def param_matrix(self, values: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """The parameters as one matrix of the gradient matrix's layout (``values``: see
        :meth:`param_values`)."""
        w, b = self.param_values(values)
        w = w.reshape(self.out_dim, -1)
        if b is None:
            return w
        return torch.cat([w, b.reshape(-1, 1)], dim=1)

    def split(self, U: torch.Tensor) -> List[torch.Tensor]:
        """Per-parameter views of an [out, in(+1)] matrix, in ``self.params`` order."""
        shape = self.weight.shape
        if not self.has_bias:
            return [U if U.shape == shape else U.reshape(shape)]
        w = U[:, :-1]
        return [w if w.shape == shape else w.reshape(shape), U[:, -1]]

    # ------------------------------------------------------------------ dense view (tests)
    def to_dense(self) -> torch.Tensor:
        """A ⊗ G: the block's curvature in column-major vec([weight | bias]) order (for a stacked
        block, the block-diagonal of its members' A_j ⊗ G_j, member after member)."""
        if self.A is None or self.G is None:
            raise RuntimeError(f"block {self.name!r} has no factors yet")
        A, G = self.A.to(self.factor_dtype), self.G.to(self.factor_dtype)
        if self.stacked:
            return torch.block_diag(*[torch.kron(a, g) for a, g in zip(A, G)])
        return torch.kron(A if A.dim() == 2 else torch.diag(A), G if G.dim() == 2 else
                          torch.diag(G))


def _dtype_for(weight: torch.Tensor) -> torch.dtype:
    """Factors of a float64 weight are float64; of any other, float32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def rows_jobs_expand(xs: List[torch.Tensor], k: int, homogeneous: bool) -> List[SyrkJob]:
    """A_hat = mean over all rows of all calls of xbar xbar^T, as ONE syrk job: a module called
    at T time steps costs one op call, not T (a single call's rows stay a view of its input, so
    the engine can still share identical inputs between layers)."""
    rows = [x if x.dim() == 2 else x.reshape(-1, k) for x in xs]
    total = sum(r.shape[0] for r in rows)
    return [SyrkJob(rows[0] if len(rows) == 1 else torch.cat(rows), 1.0 / total, homogeneous)]


def mean_over_calls(parts: List[Tuple[torch.Tensor, int]], name: str) -> torch.Tensor:
    """Average per-call sums ``(sum_t x [N, k], T)`` over all calls and positions (reduce mode)."""
    n0 = parts[0][0].shape[0]
    for s, _ in parts:
        if s.shape[0] != n0:
            raise BlockInputError(
                f"module {name!r} was called with batch sizes {[p[0].shape[0] for p in parts]} in "
                f"one step; weight_sharing='reduce' needs the same batch size in every call")
    total = sum(t for _, t in parts)
    acc = parts[0][0]
    for s, _ in parts[1:]:
        acc = acc + s
    return acc / total

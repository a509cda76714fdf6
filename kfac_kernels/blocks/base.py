"""Curvature blocks: one per layer, holding the Kronecker factors of the layer's curvature.

A block knows (i) how to turn the inputs and output-gradients captured from its module into
factor statistics, (ii) its running factors A and G, and (iii) how to read the gradient of its
parameters as one [out, in(+1)] matrix and write an update back. Everything that sequences these
steps (when factors update, when inverses are recomputed, batching across blocks) lives in
:mod:`kfac_kernels.engine`; the arithmetic goes through :mod:`kfac_kernels.ops`.

Conventions (docs/math.md, "One block per layer" and "Layers used at T positions"): the layer computes s = W abar with abar = [a; 1] when it has a bias
(homogeneous coordinate LAST), W = [weight.flatten(1) | bias]. With N examples and T positions per
example (sequence positions, conv patches, repeated calls):

* expand: A = 1/(N T) sum_{n,t} abar abar^T,   G = 1/N sum_{n,t} g g^T
* reduce: abar_n = mean_t abar_{n,t}, g_n = sum_t g_{n,t}, A = 1/N sum abar_n abar_n^T,
  G = 1/N sum g_n g_n^T
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..ops._registry import op_backend

WEIGHT_SHARING = ("expand", "reduce")


class BlockInputError(ValueError):
    """A module was called with inputs its block cannot interpret consistently."""


@dataclass
class SyrkJob:
    """``target += alpha * xbar^T xbar`` for a block's factor estimate (batched by the engine)."""
    x: torch.Tensor
    alpha: float
    homogeneous: bool


class Block:
    """Base class of the Kronecker-factored blocks (A ⊗ G over [weight | bias]).

    Layouts beyond one [out, in(+1)] matrix (see docs/layers.md):

    * ``stacked``: the block holds ``num_stack`` independent Kronecker blocks of one shape (the
      groups of a grouped convolution, the channels of a normalisation layer); A, G, the gradient
      matrix and every inverse entry carry a leading stack dim, so the batched ops do all of them
      in one call.
    * ``diag_A``: A is diagonal and stored as a vector (an embedding's token frequencies); its
      eigenbasis is the identity, and preconditioning goes through ``ops.kron_precondition_diag``.
    """

    kind = "block"
    stacked = False
    diag_A = False

    def __init__(self, name: str, module: torch.nn.Module, *, weight_sharing: str = "expand",
                 factor_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
        if weight_sharing not in WEIGHT_SHARING:
            raise ValueError(f"weight_sharing must be one of {WEIGHT_SHARING}, got "
                             f"{weight_sharing!r}")
        self.name = name
        self.module = module
        self.backend = backend
        self.weight_sharing = weight_sharing
        self.weight: torch.Tensor = module.weight
        bias = getattr(module, "bias", None)
        self.bias: Optional[torch.Tensor] = bias if (bias is not None and bias.requires_grad) else None
        self.params: List[torch.Tensor] = [self.weight] + ([self.bias] if self.bias is not None else [])
        self.has_bias = self.bias is not None
        self.out_dim = self.weight.shape[0]
        self.in_dim = self.weight[0].numel() + int(self.has_bias)  # including the homogeneous coord
        if factor_dtype is None:
            factor_dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        self.factor_dtype = factor_dtype

        # running factors and their update count (device tensors: no host sync to maintain)
        self.A: Optional[torch.Tensor] = None
        self.G: Optional[torch.Tensor] = None
        self.count: Optional[torch.Tensor] = None      # factor updates that were accepted
        self.skipped: Optional[torch.Tensor] = None    # updates rejected (non-finite statistics)
        # decompositions, filled by the engine: {"QA","lamA","QG","lamG"} or {"A_inv","G_inv"}
        self.inverse: dict = {}
        self.ekfac_count: Optional[torch.Tensor] = None  # EKFAC: accepted scalings since the basis
        # capture buffers for the current step
        self.inputs: List[torch.Tensor] = []
        self.A_hat: Optional[torch.Tensor] = None
        self.G_hat: Optional[torch.Tensor] = None
        self.S_hat: Optional[torch.Tensor] = None        # EKFAC: this step's scalings estimate
        # capture bookkeeping (kfac_kernels.capture): inputs captured before the first backward
        # pass of a step, and calls dropped from ``inputs`` with a stale step
        self._inputs_at_backward = 0
        self._call_offset = 0

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

    def describe_row(self) -> dict:
        return dict(name=self.name, kind=self.kind, module=type(self.module).__name__,
                    shape=f"{self.out_dim}x{self.in_dim}", A=f"{self.in_dim}x{self.in_dim}",
                    G=f"{self.out_dim}x{self.out_dim}", bias=self.has_bias)

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

    def pass_jobs(self, grads: List[torch.Tensor], calls: List[int], scale: float) -> List[SyrkJob]:
        """:meth:`g_jobs` for blocks that need to know which call produced each output-gradient:
        ``calls[j]`` indexes ``self.inputs`` for ``grads[j]`` (backward passes deliver gradients
        in their own order). Defaults to ``g_jobs``."""
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
    def grad_matrix(self) -> Optional[torch.Tensor]:
        """[out, in(+1)] gradient (None when the module got no gradient this step)."""
        if self.weight.grad is None:
            return None
        gw = self.weight.grad
        if gw.dim() != 2:
            gw = gw.reshape(self.out_dim, -1)
        if not self.has_bias:
            return gw
        gb = self.bias.grad if self.bias.grad is not None else torch.zeros_like(self.bias)
        return torch.cat([gw, gb.view(-1, 1)], dim=1)

    def param_matrix(self) -> torch.Tensor:
        w = self.weight.detach().reshape(self.out_dim, -1)
        if not self.has_bias:
            return w
        return torch.cat([w, self.bias.detach().reshape(-1, 1)], dim=1)

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
        if self.A is None:
            raise RuntimeError(f"block {self.name!r} has no factors yet")
        A, G = self.A.to(self.factor_dtype), self.G.to(self.factor_dtype)
        if self.stacked:
            return torch.block_diag(*[torch.kron(a, g) for a, g in zip(A, G)])
        return torch.kron(A if A.dim() == 2 else torch.diag(A), G)

    def clear_capture(self) -> None:
        self.inputs = []
        self.A_hat = None
        self.G_hat = None


def rows_jobs_expand(xs: List[torch.Tensor], k: int, homogeneous: bool) -> List[SyrkJob]:
    """A_hat = mean over all rows of all calls of xbar xbar^T, as ONE syrk job: a module called
    at T time steps costs one op call, not T (a single call's rows stay a view of its input, so
    the engine can still share identical inputs between layers)."""
    rows = [x.reshape(-1, k) for x in xs]
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

"""Every option of the optimisers, declared once.

:data:`OPTIONS` is the single table of options: name, default, which part of the package reads
it, a one-line meaning and its check. Everything else is derived from it:

* the signatures of :class:`kfac_kernels.KFAC` and :class:`kfac_kernels.KFACPreconditioner`
  (what they accept, in which order, with which defaults: :func:`signature`), and the
  validation of what they were given (:func:`resolve`);
* the ranks' agreement check under torch.distributed (:meth:`Options.agreement_lines`): every
  option marked ``agree`` is compared across ranks at construction, so ranks configured
  differently raise :class:`kfac_kernels.comm.MismatchError` instead of hanging later.

A new option is one :class:`Option` entry here, its annotated attribute on :class:`Options`
(its type for type checkers), plus the code that reads it.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .curvature import CURVATURES, LIKELIHOODS

__all__ = ["Option", "OPTIONS", "OPTION", "Options", "resolve", "signature", "names"]

LOSS_REDUCTIONS = ("mean", "sum", "token_mean")
DAMPING_MODES = ("eigen", "pi")
WEIGHT_SHARING = ("expand", "reduce")
ASSIGNMENTS = ("compute", "memory", "round_robin")
LARGE_FACTORS = ("diagonal", "first_order", "error")
KL_CLIP_MODES = ("step", "direction")


# ----------------------------------------------------------------------------- checks
def choice(*choices: str) -> Callable[[str, Any], None]:
    def check(name, value):
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; expected one of "
                             f"{', '.join(map(repr, choices))}")
    return check


def optional_choice(*choices: str) -> Callable[[str, Any], None]:
    inner = choice(*choices)
    return lambda name, value: None if value is None else inner(name, value)


def positive_int(name, value):
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_damping(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 \
            or not math.isfinite(value):
        raise ValueError(f"damping must be a finite number >= 0, got {value!r}")


def _ema_decay(name, value):
    if not 0.0 <= value < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {value}")


def _factor_dtype(name, value):
    if value not in (None, torch.float32, torch.float64):
        raise ValueError(f"factor_dtype must be None, torch.float32 or torch.float64, got {value}")


def _storage_dtype(name, value):
    if value not in (None, torch.bfloat16):
        raise ValueError(f"factor_storage_dtype must be None (store the running factors in "
                         f"factor_dtype) or torch.bfloat16, got {value}")


def _names(name, value):
    if isinstance(value, str):
        raise TypeError("skip= and only= take a list of module names or glob patterns, not a "
                        "single string")


def _lr(name, value):
    if value < 0:
        raise ValueError(f"lr must be >= 0, got {value}")


def _momentum(name, value):
    if not 0.0 <= value < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {value}")


def _weight_decay(name, value):
    if value < 0:
        raise ValueError(f"weight_decay must be >= 0, got {value}")


def check_kl_clip(name, value):
    if value is not None and (not isinstance(value, (int, float)) or value <= 0):
        raise ValueError(f"kl_clip must be None or a number > 0, got {value!r}")


def _backend(name, value):
    from . import ops
    choice("backend", "auto", *ops._registry.BACKENDS)(name, value)
    if value not in ("auto", "torch"):
        ok, why = ops.backend_status(value)
        if not ok:
            raise ops.BackendUnavailable(f"backend={value!r} cannot run here: {why}")


def _enabled(name, value):
    if value not in (None, True, False):
        raise ValueError(f"distributed must be None, True or False, got {value!r}")


def _fraction(name, f):
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
        raise ValueError(f"grad_worker_fraction must be a number in (0, 1], got {f!r}")


def _bucket(name, b):
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
        raise ValueError(f"bucket_cap_mb must be a number > 0, got {b!r}")


def _rotated_momentum(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"rotated_momentum must be a number in [0, 1), got {value!r}")


def _max_rows(name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ValueError(f"factor_max_rows must be None or an int >= 1, got {value!r}")


def _inverse(name, value):
    from .inverses import KINDS
    choice(*KINDS)(name, value)


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Option:
    """One option. ``part``: who reads it — "update" (KFAC's update rule and step control),
    "step" (the step pipeline: guard, KL clip), "engine" (curvature, factors, inverses),
    "distributed" (the torch.distributed strategy). ``owners``: the optimisers that take it.
    ``agree``: ranks must agree on it (checked at construction). ``positional``: KFAC takes it
    positionally too (the historical order of its signature)."""
    name: str
    default: Any
    part: str
    doc: str
    check: Optional[Callable[[str, Any], None]] = None
    agree: bool = True
    owners: Tuple[str, ...] = ("KFAC", "KFACPreconditioner")
    positional: bool = False


_K = ("KFAC",)
OPTIONS: Tuple[Option, ...] = (
    # KFAC's positional parameters, in their historical order
    Option("lr", 1e-2, "update", "learning rate (KFACPreconditioner: used only for the KL clip, "
           "default 1.0)", _lr, positional=True),
    Option("momentum", 0.9, "update", "heavy-ball momentum of the update", _momentum, owners=_K,
           positional=True),
    Option("weight_decay", 0.0, "update", "L2 weight decay added to the gradient before "
           "preconditioning", _weight_decay, owners=_K, positional=True),
    Option("damping", 1e-3, "engine", "Tikhonov damping gamma of the inverses (changeable "
           "between steps: opt.damping = ..., or KFAC's param_groups[i]['damping'] from a "
           "scheduler; one value for all groups)", check_damping, positional=True),
    Option("damping_mode", None, "engine", "'eigen' (add gamma to the eigenvalue products) or "
           "'pi' (split sqrt(gamma) between A and G by pi); default: the inverse kind's",
           optional_choice(*DAMPING_MODES), positional=True),
    Option("ema_decay", 0.95, "engine", "running-average decay of the factors (first-estimate "
           "rule: rho_k = min(1 - 1/k, ema_decay))", _ema_decay, positional=True),
    Option("factor_every", 1, "engine", "steps between factor updates", positive_int,
           positional=True),
    Option("inverse_every", 10, "engine", "steps between inverse updates", positive_int,
           positional=True),
    Option("curvature", "empirical", "engine", "the metric: 'empirical', 'fisher' (sampled) or "
           "'ggn' (exact generalised Gauss-Newton)", choice(*CURVATURES), positional=True),
    Option("likelihood", None, "engine", "the loss's likelihood for 'fisher'/'ggn': "
           "'categorical', 'gaussian' or 'bernoulli'", optional_choice(*LIKELIHOODS),
           positional=True),
    Option("mc_samples", 1, "engine", "samples per example of curvature='fisher'", positive_int,
           positional=True),
    Option("inverse", "eigh", "engine", "inverse kind: 'eigh' (eigenbasis), 'cholesky' "
           "(damped inverses, pi damping), 'ekfac' (eigenvalue-corrected) or 'eigen_adam' (Adam's "
           "second moment in the eigenbasis; damping is Adam's epsilon)", _inverse,
           positional=True),
    Option("kl_clip", None, "step", "bound C on sum lr^2 <U, V> (the update is scaled by "
           "min(1, sqrt(C / sum lr^2 <U, V>))); None: off; KFAC keeps it in param_groups too",
           check_kl_clip, positional=True),
    Option("weight_sharing", "expand", "engine", "layers applied at several positions "
           "(sequences, conv patches): 'expand' or 'reduce' (docs/math.md)",
           choice(*WEIGHT_SHARING), positional=True),
    Option("skip", (), "engine", "module names or glob patterns left to the first-order rule",
           _names, positional=True),
    Option("backend", "auto", "engine", "kernel backend: 'auto', 'torch', 'triton', 'cuda', "
           "'cupy'", _backend, positional=True),
    # keyword-only
    Option("params", None, "update", "param groups over the model's parameters (default: its "
           "trainable parameters); a block's weight and bias share a group", agree=False,
           owners=_K),
    Option("loss_reduction", "mean", "engine", "'mean' (the loss is a mean over examples, "
           "summed over each example's positions), 'sum', or 'token_mean' (a mean over examples "
           "and positions, as Hugging Face's outputs.loss: the metric is then per position; "
           "docs/math.md)", choice(*LOSS_REDUCTIONS)),
    Option("rotated_momentum", 0.0, "engine", "inverse='eigen_adam' only: decay beta1 of a "
           "first moment of the gradient kept in the Kronecker eigenbasis (Adam's, bias-corrected; "
           "turned into each new basis at a refresh): the update is M1 / (sqrt(M2) + eps) there, "
           "as SOAP's; 0: none (the current gradient is normalised and `momentum` acts after)",
           _rotated_momentum),
    Option("factor_dtype", None, "engine", "dtype factors are accumulated, decomposed and "
           "applied in (default float32, float64 for a float64 model)", _factor_dtype),
    Option("seed", None, "engine", "seed of curvature='fisher''s sampler (distributed: rank "
           "0's is used)", agree=False),
    Option("full_eigh_every", 1, "engine", "every k-th inverse update a full eigendecomposition, "
           "the others a warm-started refresh", positive_int),
    Option("inverse_warmup", False, "engine", "decompose after every factor update during the "
           "first inverse_every steps (docs/robustness.md)"),
    Option("only", None, "engine", "precondition only these modules (names or glob patterns)",
           _names),
    Option("factor_storage_dtype", None, "engine", "None, or torch.bfloat16 to keep the running "
           "factors in bf16 (averaged and decomposed in factor_dtype)", _storage_dtype),
    Option("max_factor_dim", 8192, "engine", "largest side n of a dense Kronecker factor (n x n "
           "entries, an n-wide eigendecomposition); a side above it (a vocabulary-sized head or "
           "embedding) is handled as large_factor says", positive_int),
    Option("factor_max_rows", None, "engine", "None, or the most rows (token positions, "
           "examples) one factor estimate takes from a step: a layer seeing more rows (a "
           "transformer's batch x context) uses every k-th of them, k = ceil(rows / "
           "factor_max_rows), from an offset that moves every factor step, and scales the sum "
           "by k (the k offsets partition the rows: their mean is the full estimate); the "
           "factor step's syrk cost falls by k (docs/transformers.md)", _max_rows),
    Option("large_factor", "diagonal", "engine", "what a factor side above max_factor_dim gets: "
           "'diagonal' (keep that factor's diagonal, exact K-FAC for it; docs/math.md), "
           "'first_order' (the whole layer takes the first-order rule, with a warning) or "
           "'error'", choice(*LARGE_FACTORS)),
    Option("distributed", None, "distributed", "None: on when torch.distributed is initialised "
           "with several processes; True: required; False: never", _enabled, agree=False),
    Option("process_group", None, "distributed", "the process group (default: the default "
           "group)", agree=False),
    Option("grad_worker_fraction", 1.0, "distributed", "share of the ranks holding each "
           "decomposition (1: all, 1/world: one, which broadcasts preconditioned gradients)",
           _fraction),
    Option("assignment", "compute", "distributed", "cost model assigning decompositions to "
           "ranks: 'compute' (n^3), 'memory' (n^2), 'round_robin'", choice(*ASSIGNMENTS)),
    Option("bucket_cap_mb", 25.0, "distributed", "largest message of one collective (MiB)",
           _bucket),
    Option("kl_clip_mode", "step", "step", "what kl_clip bounds: 'step' (lr^2 sum <U, V>, the "
           "step's predicted KL: while the clip binds the step is sqrt(C / sum <U, V>) U and lr "
           "has no effect) or 'direction' (sum <U, V>, before lr: the direction is scaled by "
           "min(1, sqrt(C / sum <U, V>)) and lr always scales the step); opt.stats() counts the "
           "steps on which the clip binds (docs/math.md, 'The update')", choice(*KL_CLIP_MODES)),
    Option("grad_scaler", None, "step", "the torch.amp.GradScaler whose scaled loss is "
           "back-propagated"),
    Option("skip_nonfinite", True, "step", "a step with non-finite gradients or update changes "
           "neither parameters nor factors", owners=_K),
    Option("adaptive_lr", False, "update", "step length from the quadratic model "
           "(kfac_kernels.adaptive)", owners=_K),
    Option("adaptive_momentum", False, "update", "momentum from the quadratic model too",
           owners=_K),
    Option("adaptive_damping", False, "update", "Levenberg-Marquardt damping", owners=_K),
    Option("damping_adaptation_every", 5, "update", "steps between damping adaptations",
           owners=_K),
    Option("damping_adaptation_decay", 0.95, "update", "decay omega^(1/T) of the damping "
           "adaptation", owners=_K),
    Option("damping_bounds", (1e-8, 1e4), "update", "(low, high) clamp of adaptive damping",
           owners=_K),
)
#: {name: Option}
OPTION: Dict[str, Option] = {o.name: o for o in OPTIONS}
_DEFAULT_OVERRIDES = {"KFACPreconditioner": {"lr": 1.0}}


def names(owner: str, part: Optional[str] = None) -> Tuple[str, ...]:
    """The options ``owner`` takes (of one ``part``), in declaration order."""
    return tuple(o.name for o in OPTIONS if owner in o.owners and (part is None or o.part == part))


def default(owner: str, name: str):
    return _DEFAULT_OVERRIDES.get(owner, {}).get(name, OPTION[name].default)


def signature(owner: str) -> inspect.Signature:
    """``(model, ...)`` as ``owner``'s ``__init__`` takes it (also what ``help()`` shows)."""
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD), P("model", P.POSITIONAL_OR_KEYWORD)]
    positional = owner == "KFAC"
    for o in OPTIONS:
        if owner not in o.owners:
            continue
        kind = P.POSITIONAL_OR_KEYWORD if (positional and o.positional) else P.KEYWORD_ONLY
        params.append(P(o.name, kind, default=default(owner, o.name)))
    return inspect.Signature(params)


class Options:
    """The validated options of one optimiser (attributes named as in :data:`OPTIONS`).
    ``damping`` may change between steps (schedulers, adaptive damping): set it through
    :meth:`set_damping`, which checks it.

    The annotations below declare each option's type for type checkers, one per entry of
    :data:`OPTIONS` (tests/test_options.py checks that the two name the same set). They are
    declarations only: an instance has the options its owner takes (``KFACPreconditioner`` has
    no ``momentum``, for one), set from the checked values."""

    owner: str
    # the update rule and the step
    lr: float
    momentum: float
    weight_decay: float
    params: Any
    kl_clip: Optional[float]
    kl_clip_mode: str
    grad_scaler: Any                    # a torch.amp.GradScaler or None
    skip_nonfinite: bool
    adaptive_lr: bool
    adaptive_momentum: bool
    adaptive_damping: bool
    damping_adaptation_every: int
    damping_adaptation_decay: float
    damping_bounds: Tuple[float, float]
    # the engine
    damping: float
    damping_mode: str                   # None is replaced by the inverse kind's default
    ema_decay: float
    factor_every: int
    inverse_every: int
    curvature: str
    likelihood: Optional[str]
    mc_samples: int
    inverse: str
    weight_sharing: str
    skip: Sequence[str]
    backend: str
    loss_reduction: str
    rotated_momentum: float
    factor_dtype: Optional[torch.dtype]
    seed: Optional[int]
    full_eigh_every: int
    inverse_warmup: bool
    only: Optional[Sequence[str]]
    factor_storage_dtype: Optional[torch.dtype]
    max_factor_dim: int
    factor_max_rows: Optional[int]
    large_factor: str
    # torch.distributed
    distributed: Optional[bool]
    process_group: Any
    grad_worker_fraction: float
    assignment: str
    bucket_cap_mb: float

    def __init__(self, owner: str, values: Dict[str, Any]):
        self.owner = owner
        self.__dict__.update(values)

    def set_damping(self, value) -> None:
        check_damping("damping", value)
        self.damping = value

    def agreement_lines(self) -> List[str]:
        """One ``name=value`` line per option ranks must agree on (compared at construction by
        the distributed strategy)."""
        lines = []
        for o in OPTIONS:
            if self.owner in o.owners and o.agree:
                v = getattr(self, o.name)
                if o.name == "grad_scaler":
                    v = None if v is None else f"{type(v).__name__}(enabled={v.is_enabled()})"
                lines.append(f"option {o.name}={v}")
        return lines

    def __repr__(self) -> str:
        return f"Options({self.owner}: " + ", ".join(
            f"{n}={getattr(self, n)!r}" for n in names(self.owner)) + ")"


def resolve(owner: str, args: Sequence, kwargs: Dict[str, Any]) -> Tuple[Any, Options]:
    """Bind ``(model, *args, **kwargs)`` to ``owner``'s signature, check every value and the
    combinations; returns ``(model, Options)``."""
    sig = signature(owner)
    try:
        bound = sig.bind(None, *args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{owner}: {exc}; it takes the model, then "
                        f"{', '.join(names(owner))} (help({owner}) explains each)") from None
    bound.apply_defaults()
    values = dict(bound.arguments)
    values.pop("self")
    model = values.pop("model")
    for o in OPTIONS:
        if owner in o.owners and o.check is not None:
            o.check(o.name, values[o.name])
    _check_combinations(values)
    return model, Options(owner, values)


def _check_combinations(v: Dict[str, Any]) -> None:
    from .inverses import KINDS
    if v["curvature"] != "empirical" and v["likelihood"] is None:
        raise ValueError(f"curvature={v['curvature']!r} needs a likelihood: one of "
                         f"{', '.join(map(repr, LIKELIHOODS))}")
    if v["curvature"] == "empirical" and v["likelihood"] is not None:
        import warnings
        from .health import KFACWarning
        warnings.warn(f"kfac_kernels: likelihood={v['likelihood']!r} is unused with "
                      f"curvature='empirical' (the metric comes from the loss's own gradients); "
                      f"pass curvature='fisher' or 'ggn' to use it, or drop likelihood=",
                      KFACWarning, stacklevel=4)
    kind = KINDS[v["inverse"]]
    if v["rotated_momentum"] and v["inverse"] != "eigen_adam":
        raise ValueError(f"rotated_momentum={v['rotated_momentum']!r} keeps a first moment in "
                         f"eigen_adam's rotated coordinates; with inverse={v['inverse']!r} use "
                         f"momentum= (heavy ball) instead, or pass inverse='eigen_adam'")
    if v["damping_mode"] is None:
        v["damping_mode"] = kind.default_damping_mode
    kind.check_options(v)


def describe_options(owner: str) -> str:
    """The option list as text (for docstrings and docs)."""
    return "\n".join(f"``{o.name}`` (default {default(owner, o.name)!r}): {o.doc}"
                     for o in OPTIONS if owner in o.owners)


def merge_docs(owner: str, text: str) -> str:
    return text + "\n\nOptions (declared in kfac_kernels/options.py):\n\n" + "\n".join(
        f"    {line}" for line in describe_options(owner).splitlines())

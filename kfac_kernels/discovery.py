"""Discovery: which modules of a model become curvature blocks, and which parameters do not.

:func:`discover` walks ``model.named_modules()`` once. A module becomes a block when its class
has a block type (:func:`kfac_kernels.blocks.block_type_for`), its weight is trainable and in
the optimiser, it is not excluded by ``skip=`` / ``only=`` and its parameters are not shared
with another module. Every other trainable parameter is a *fallback* parameter, kept with the
reason, and takes the optimiser's first-order rule (``describe()`` lists them).

A factor side larger than ``max_factor_dim`` (a vocabulary-sized head or embedding: a dense
50,257 x 50,257 G is 10 GB in float32) is handled as ``large_factor`` says
(:func:`large_factor_policy`): kept as its diagonal, the layer left to the first-order rule, or
an error naming the remedies.
"""
from __future__ import annotations

import fnmatch
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional, Tuple

import torch

from .blocks import Block, block_type_for

__all__ = ["discover", "matches"]


def matches(mname: str, pattern: str) -> bool:
    """A pattern names a module or any module inside it ("encoder" covers "encoder.0.fc")."""
    parts = mname.split(".") if mname else [""]
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern)
               for i in range(1, len(parts) + 1))


def _check_patterns(names: List[str], skip, only) -> None:
    for opt_name, pats in (("skip", skip), ("only", only or ())):
        for pat in pats:
            if not isinstance(pat, str):
                raise TypeError(f"{opt_name}= takes module names or glob patterns (str), got "
                                f"{pat!r}")
            if not any(matches(n, pat) for n in names):
                shown = [n for n in names if n][:12]
                raise ValueError(
                    f"{opt_name}= names {pat!r}, which matches no module of the model (module "
                    f"names as named_modules() gives them, e.g. "
                    f"{', '.join(map(repr, shown)) or 'none'}{', ...' if len(names) > 13 else ''})")


def discover(model, opts, trainable: Optional[set], conv_backend: str
             ) -> Tuple["OrderedDict[str, Block]", List[Tuple[str, torch.Tensor, str]]]:
    """``(blocks, fallback)``: ``{module name: Block}`` and ``[(param name, param, reason)]``.
    ``opts``: ``skip``, ``only``, ``weight_sharing``, ``factor_dtype``; ``trainable``: ids of
    the optimiser's parameters (None: every parameter that requires grad)."""
    skip = tuple(opts.skip)
    only = None if opts.only is None else tuple(opts.only)
    owner: Dict[int, List[str]] = defaultdict(list)
    names = [mname for mname, _ in model.named_modules()]
    for mname, mod in model.named_modules():
        for _, p in mod.named_parameters(recurse=False):
            owner[id(p)].append(mname)
    _check_patterns(names, skip, only)
    blocks: "OrderedDict[str, Block]" = OrderedDict()
    fallback: List[Tuple[str, torch.Tensor, str]] = []
    why_not: Dict[str, List[str]] = defaultdict(list)    # only= pattern -> refusals
    claimed = set()

    def leave(name, p, reason):
        if id(p) not in claimed:
            claimed.add(id(p))
            fallback.append((name, p, reason))

    for mname, mod in model.named_modules():
        direct = [(pn, p) for pn, p in mod.named_parameters(recurse=False) if p.requires_grad
                  and (trainable is None or id(p) in trainable)]
        if not direct:
            continue
        cls, why = block_type_for(mod)
        wanted = [pat for pat in (only or ()) if matches(mname, pat)]
        reason = ""
        if any(matches(mname, pat) for pat in skip):
            reason = "listed in skip="
        elif only is not None and not wanted:
            reason = "not listed in only="
        elif cls is None:
            reason = why
        elif not mod.weight.requires_grad or (trainable is not None
                                              and id(mod.weight) not in trainable):
            reason = "weight is frozen or not in the optimiser"
        elif any(len(set(owner[id(p)])) > 1 for _, p in direct):
            reason = "parameter shared with another module (tied weights)"
        if reason:
            for pat in wanted:
                why_not[pat].append(f"{mname or '<model>'} ({type(mod).__name__}): {reason}")
            tied = reason.startswith("parameter shared")
            for pn, p in direct:
                why = reason
                if tied and len(set(owner[id(p)])) == 1:    # e.g. the bias beside a tied weight
                    shared = [n for n, q in direct if len(set(owner[id(q)])) > 1]
                    why = (f"its module's {', '.join(shared)} is shared with another module "
                           f"(tied weights), so the module has no block")
                leave(f"{mname}.{pn}" if mname else pn, p, why)
            continue
        for pat in wanted:
            why_not[pat].append("")
        block = cls(mname, mod, weight_sharing=opts.weight_sharing,
                    factor_dtype=opts.factor_dtype, backend=conv_backend)
        reason = large_factor_policy(block, opts)
        if reason:
            for pat in wanted:
                why_not[pat][-1] = f"{mname or '<model>'} ({type(mod).__name__}): {reason}"
            for pn, p in direct:
                leave(f"{mname}.{pn}" if mname else pn, p, reason)
            continue
        blocks[mname] = block
        claimed.update(id(p) for p in block.params)
        for pn, p in direct:   # e.g. a frozen-weight module's trainable bias
            leave(f"{mname}.{pn}", p, "not part of the block")
    for pat in only or ():
        refusals = why_not.get(pat, [])
        if "" not in refusals:
            raise ValueError(
                f"only= asks K-FAC to precondition {pat!r}, but no module it names can get a "
                f"block: " + ("; ".join(refusals) if refusals else
                              "the modules it names hold no trainable parameters"))
    if not blocks:
        raise ValueError(
            "the model has no layer K-FAC supports (nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, "
            "normalisation layers, kfac_kernels.nn cells); fallback parameters: "
            + (_by_module(fallback) or "none"))
    return blocks, fallback


def size_text(nbytes: int) -> str:
    """Bytes for people (decimal units)."""
    n = float(nbytes)
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def large_factor_policy(block: Block, opts) -> str:
    """Apply ``large_factor`` to the sides of ``block`` larger than ``max_factor_dim``: with
    "diagonal" they become diagonal (:meth:`Block.make_diagonal`) and "" is returned; with
    "first_order", or where a diagonal side is not available, the reason the layer is left to
    the first-order rule; with "error" a ValueError naming the remedies."""
    limit = opts.max_factor_dim
    large = [(w, block.factor_dim(w)) for w in ("A", "G")
             if not block.is_diagonal(w) and block.factor_dim(w) > limit]
    if not large:
        return ""
    name = block.name or "<model>"
    dtype = block.factor_dtype
    what = " and ".join(
        f"{w} would be {n} x {n} ({size_text(n * n * block.num_stack * _itemsize(dtype))} in "
        f"{str(dtype).replace('torch.', '')})" for w, n in large)
    over = f"factor {what}, above max_factor_dim={limit}"
    if opts.large_factor == "error":
        raise ValueError(
            f"module {name!r} ({type(block.module).__name__}): its Kronecker {over}. Remedies: "
            f"large_factor='diagonal' (keep the diagonal of that factor: exact K-FAC for a "
            f"diagonal factor, docs/math.md), large_factor='first_order' (this layer takes the "
            f"first-order rule), skip=[{block.name!r}], or a larger max_factor_dim")
    if opts.large_factor == "first_order":
        return f"{over} (large_factor='first_order')"
    why = ""
    sides = [w for w, _ in large]
    if len(sides) + sum(block.is_diagonal(w) for w in ("A", "G")) == 2:
        why = "both of its factors would be diagonal"
    elif any(w not in block.diagonal_sides for w in sides):
        why = f"a {type(block).__name__} cannot keep that factor diagonal"
    elif opts.inverse == "ekfac":
        why = "inverse='ekfac' has no diagonal factor side"
    if why:
        return f"{over}; large_factor='diagonal' is not available: {why}"
    for w in sides:
        block.make_diagonal(w)
    return ""


def _by_module(fallback) -> str:
    """``module (reason): param, param; ...``: one reason per module, not one per parameter."""
    groups: Dict[Tuple[str, str], List[str]] = OrderedDict()
    for name, _, reason in fallback:
        mod, _, pname = name.rpartition(".")
        groups.setdefault((mod or "<model>", reason), []).append(pname or name)
    return "; ".join(f"{mod} ({reason}): {', '.join(ps)}" for (mod, reason), ps in groups.items())


_ON_PURPOSE = ("listed in skip=", "not listed in only=")


def fallback_warning(fallback, rule: str) -> Optional[str]:
    """The construction warning about weight matrices left to the first-order rule, or None.

    ``fallback``: ``[(name, param, reason)]``; parameters with 2 or more dimensions count
    unless the user left them out on purpose (``skip=`` / ``only=``). ``rule``: what they get
    instead of K-FAC."""
    hit = [(n, p, r) for n, p, r in fallback if p.dim() >= 2 and r not in _ON_PURPOSE]
    if not hit:
        return None
    shown = "; ".join(f"{n} {tuple(p.shape)} ({r})" for n, p, r in hit[:10])
    more = f"; and {len(hit) - 10} more" if len(hit) > 10 else ""
    remedies = ["list their modules in skip= to leave them to that rule on purpose (this "
                "silences the warning)", "describe() lists every fallback parameter"]
    if any("convert(model)" in r for _, _, r in hit):
        remedies.insert(0, "kk.nn.convert(model) swaps nn.MultiheadAttention and torch's fused "
                           "RNN/GRU/LSTM for kfac_kernels.nn layers that K-FAC preconditions")
    return (f"{len(hit)} weight parameter{'s' if len(hit) > 1 else ''} with 2 or more dimensions "
            f"take{'' if len(hit) > 1 else 's'} {rule}, not K-FAC: {shown}{more}. Remedies: "
            + "; ".join(remedies) + ".")

"""Who decomposes what: the process grid and the static assignment of decompositions to ranks.

Pure functions of the block shapes, the world size and the options, so every rank computes the
same answer without communicating (docs/distributed.md, "Inverses").
"""
from __future__ import annotations

from typing import Any, Iterable, List, Sequence, Tuple

__all__ = ["greedy_assignment", "worker_grid", "assign", "decomposition_cost"]

#: one unit of decomposition work: (block, the factors it covers, owner rank)
Unit = Tuple[Any, Tuple[str, ...], int]


def greedy_assignment(costs: Sequence[float], workers: int) -> List[int]:
    """Largest-first greedy (LPT) assignment of items to ``workers``: items in decreasing cost
    (ties keep their order), each to the least loaded worker (ties: the lowest). Deterministic,
    so every rank computes the same assignment without communicating."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    load = [0.0] * workers
    owner = [0] * len(costs)
    for i in order:
        w = min(range(workers), key=lambda r: (load[r], r))
        owner[i] = w
        load[w] += costs[i]
    return owner


def worker_grid(world: int, fraction: float) -> Tuple[int, int]:
    """(k, m): k = round(fraction * world) gradient workers per block, in a k x m grid of ranks
    (rank = row * m + column); k must divide world."""
    k = min(world, max(1, int(round(fraction * world))))
    if world % k:
        raise ValueError(f"grad_worker_fraction={fraction} gives {k} gradient workers per block, "
                         f"which does not divide the world size {world}; choose k / {world} with k "
                         f"a divisor of {world}")
    return k, world // k


def assign(blocks: Iterable[Any], k: int, world: int, assignment: str) -> List[Unit]:
    """[(block, factors, owner rank)]: one unit per factor when every rank holds every
    decomposition (k == world), one per block below it; owners by ``assignment``."""
    units: List[Tuple[Any, Tuple[str, ...]]] = []
    for b in blocks:
        if k < world:
            units.append((b, ("A", "G")))
        else:
            units += [(b, ("A",)), (b, ("G",))]
    if assignment == "round_robin":
        owners = [i % world for i in range(len(units))]
    else:
        p = 3 if assignment == "compute" else 2
        owners = greedy_assignment([decomposition_cost(b, whichs, p) for b, whichs in units],
                                   world)
    return [(b, w, o) for (b, w), o in zip(units, owners)]


def decomposition_cost(b: Any, whichs: Sequence[str], p: int) -> float:
    """Cost model of decomposing ``whichs`` of block ``b``: n^p per matrix (p = 3: compute,
    2: memory), times the stack of a stacked block; a diagonal side costs n (nothing to
    decompose)."""
    total = 0.0
    for w in whichs:
        n = b.in_dim if w == "A" else b.out_dim
        total += float(n) if b.is_diagonal(w) else float(b.num_stack) * float(n) ** p
    return total

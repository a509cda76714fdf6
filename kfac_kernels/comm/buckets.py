"""Flat buffers for collectives: symmetric matrices as upper triangles, slots packed into buckets.

A strategy sends many small tensors (per-block factors, decompositions, directions) in a few
collectives: :func:`split_buckets` groups consecutive slots ``(key, shape, symmetric, dtype,
device)`` into :class:`Bucket` s of one dtype and device and at most ``bucket_cap_mb``; a bucket
packs its slots into one flat tensor (symmetric [..., n, n] slots as their upper triangles,
:func:`pack_triu`), followed by a region of host scalars (the example weights and presence flags
of the factor reduction), and unpacks the reduced buffer into views. Pure tensor code: no
torch.distributed here.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["MB", "pack_triu", "unpack_triu", "slot_numel", "nbytes", "factor_slot", "Bucket",
           "split_buckets"]

MB = 1 << 20
#: a slot of a bucket: (key, shape, symmetric, dtype, device)
Slot = Tuple[Any, Tuple[int, ...], bool, torch.dtype, Any]

_TRIU: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def _triu_index(n: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    key = (n, str(device))
    idx = _TRIU.get(key)
    if idx is None:
        r, c = torch.triu_indices(n, n, device=device)
        idx = _TRIU[key] = (r * n + c, c * n + r)
    return idx


def pack_triu(F: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The upper triangle (row by row, diagonal included) of symmetric [..., n, n] matrices as
    [..., n (n + 1) / 2]."""
    n = F.shape[-1]
    up, _ = _triu_index(n, F.device)
    flat = F.reshape(*F.shape[:-2], n * n)
    if out is None:
        return flat.index_select(-1, up)
    return torch.index_select(flat, -1, up, out=out)


def unpack_triu(v: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_triu`: the full symmetric [..., n, n] matrices."""
    up, lo = _triu_index(n, v.device)
    full = torch.empty(*v.shape[:-1], n * n, dtype=v.dtype, device=v.device)
    full.index_copy_(-1, up, v)
    full.index_copy_(-1, lo, v)
    return full.reshape(*v.shape[:-1], n, n)


def slot_numel(shape: Sequence[int], sym: bool) -> int:
    """Elements a slot takes in a flat buffer: symmetric [..., n, n] slots go as upper triangles."""
    if sym:
        return math.prod(shape[:-2]) * (shape[-1] * (shape[-1] + 1) // 2)
    return math.prod(shape)


def nbytes(numel: int, dtype: torch.dtype) -> int:
    return numel * torch.empty((), dtype=dtype).element_size()


def factor_slot(b: Any, which: str) -> Tuple[Tuple[int, ...], bool]:
    """(shape, symmetric) of block ``b``'s factor ``which`` ("A" or "G") as the engine computes
    it: [n, n], [num_stack, n, n] for a stacked block, or a vector [n] for a diagonal side."""
    n = b.in_dim if which == "A" else b.out_dim
    if b.is_diagonal(which):
        return (n,), False
    return ((b.num_stack, n, n) if b.stacked else (n, n)), True


class Bucket:
    """One flat buffer of one dtype: tensor slots (``sym`` ones as upper triangles) followed by a
    region of scalars written from the host."""

    def __init__(self, dtype: torch.dtype, device: Any,
                 slots: Iterable[Tuple[Any, Sequence[int], bool]], scalars: Iterable[Any] = ()):
        self.dtype, self.device = dtype, torch.device(device)
        self.slots: List[Tuple[Any, Tuple[int, ...], bool, int, int]] = []  # key shape sym off n
        off = 0
        for key, shape, sym in slots:
            numel = slot_numel(shape, sym)
            self.slots.append((key, tuple(shape), sym, off, numel))
            off += numel
        self.data_numel = off
        self.scalars = list(scalars)
        self.scalar_index = {k: off + i for i, k in enumerate(self.scalars)}
        self.numel = off + len(self.scalars)
        self._scalar_cache: Dict[tuple, torch.Tensor] = {}   # host scalars already on the device

    @property
    def nbytes(self) -> int:
        return nbytes(self.numel, self.dtype)

    def pack(self, values: Mapping[Any, Optional[torch.Tensor]],
             scalars: Sequence[float] = ()) -> torch.Tensor:
        flat = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        zeros = None
        stack: List[torch.Tensor] = []
        stack_start: Optional[int] = None
        for key, shape, sym, off, numel in self.slots:
            seg = flat[off:off + numel]
            v = values.get(key)
            if not shape:        # 0-d slots (they come last) are stacked in one call
                if stack_start is None:
                    stack_start = off
                if v is None:
                    if zeros is None:
                        zeros = torch.zeros((), dtype=self.dtype, device=self.device)
                    v = zeros
                stack.append(v.to(self.dtype))
            elif v is None:
                seg.zero_()
            elif sym:      # [..., n, n] -> upper triangles, leading (stack) dims kept
                pack_triu(v.to(self.dtype), out=seg.view(*shape[:-2], -1))
            else:
                seg.view(shape).copy_(v)
        if stack and stack_start is not None:
            torch.stack(stack, out=flat[stack_start:stack_start + len(stack)])
        if self.scalars:   # the weights rarely change: keep each distinct set on the device
            key = tuple(scalars)
            dev = self._scalar_cache.get(key)
            if dev is None:
                if len(self._scalar_cache) >= 8:
                    self._scalar_cache.clear()
                host = torch.tensor(key, dtype=self.dtype)
                if self.device.type == "cuda":   # asynchronous upload, no host sync
                    dev = torch.empty_like(host, device=self.device)
                    dev.copy_(host.pin_memory(), non_blocking=True)
                else:
                    dev = host
                self._scalar_cache[key] = dev
            flat[self.data_numel:].copy_(dev)
        return flat

    def unpack(self, flat: torch.Tensor, divisors: Optional[Dict[Any, torch.Tensor]] = None
               ) -> Dict[Any, torch.Tensor]:
        out = {}
        for key, shape, sym, off, numel in self.slots:
            seg = flat[off:off + numel]
            if divisors is not None and key in divisors:
                seg.div_(divisors[key])
            out[key] = (unpack_triu(seg.view(*shape[:-2], -1), shape[-1]) if sym
                        else seg.view(shape))
        return out

    def scalar(self, flat: torch.Tensor, key: Any) -> torch.Tensor:
        return flat[self.scalar_index[key]]


def split_buckets(slots: Iterable[Slot], cap_bytes: int,
                  scalars_of: Optional[Callable[[Any], Sequence[Any]]] = None) -> List[Bucket]:
    """Consecutive slots ``(key, shape, sym, dtype, device)`` into buckets of one dtype/device and
    at most ``cap_bytes`` (a larger slot gets a bucket of its own). ``scalars_of(key)`` lists the
    host scalars a slot brings along."""
    out: List[Bucket] = []
    cur: List[Slot] = []
    cur_key: Optional[Tuple[torch.dtype, torch.device]] = None
    cur_bytes = 0

    def close() -> None:
        if cur and cur_key is not None:
            sc = [s for key, *_ in cur for s in (scalars_of(key) if scalars_of else ())]
            out.append(Bucket(cur_key[0], cur_key[1], [(k, sh, sy) for k, sh, sy, *_ in cur], sc))

    for key, shape, sym, dtype, device in slots:
        numel = slot_numel(shape, sym)
        nb = nbytes(numel, dtype)
        bk = (dtype, torch.device(device))
        if cur and (bk != cur_key or cur_bytes + nb > cap_bytes):
            close()
            cur, cur_bytes = [], 0
        cur_key = bk
        cur.append((key, shape, sym, dtype, device))
        cur_bytes += nb
    close()
    return out

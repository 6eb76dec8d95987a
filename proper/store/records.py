"""One user's record as one flat byte buffer, and the layout that names its fields.

A record is a uint8 tensor [record_bytes]; a :class:`RecordLayout` (interned per field set) says where each
field lives (dtype, shape, byte offset, 8-byte aligned). The same bytes are what a segment file stores, so a
write-back is one gather per tensor for all the users being written and one copy per user, a page-in one copy
per tensor for all the users being read, and a segment write or read moves each record's bytes as they are.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

Field = Tuple[str, torch.dtype, Tuple[int, ...]]


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


def aligned(n: int, to: int = 8) -> int:
    return (n + to - 1) // to * to


class RecordLayout:
    """Fields (key, dtype, shape) at fixed byte offsets in a record of ``record_bytes``."""

    def __init__(self, fields: Sequence[Field]):
        self.fields: List[Tuple[str, torch.dtype, Tuple[int, ...], int, int]] = []
        off = 0
        for key, dt, shape in fields:
            n = _itemsize(dt)
            for s in shape:
                n *= s
            self.fields.append((key, dt, tuple(shape), off, n))
            off = aligned(off + n)
        self.record_bytes = off
        self.index = {f[0]: f for f in self.fields}
        self.keys = frozenset(self.index)

    @property
    def signature(self) -> Tuple[Field, ...]:
        return tuple((k, dt, shape) for k, dt, shape, _, _ in self.fields)

    def view(self, buf: Tensor, key: str) -> Tensor:
        """Field ``key`` of ``buf`` ([..., record_bytes] uint8, e.g. a batch of records) as [..., *shape]."""
        _, dt, shape, off, n = self.index[key]
        return buf[..., off: off + n].view(dt).view(tuple(buf.shape[:-1]) + shape)   # always a view, never a copy

    def header(self) -> List[list]:
        return [[k, DTYPE_NAMES[dt], list(shape), off] for k, dt, shape, off, _ in self.fields]


_INTERNED: Dict[Tuple[Field, ...], RecordLayout] = {}


def layout_of(fields: Sequence[Field]) -> RecordLayout:
    sig = tuple((k, dt, tuple(s)) for k, dt, s in fields)
    lay = _INTERNED.get(sig)
    if lay is None:
        lay = _INTERNED[sig] = RecordLayout(sig)
    return lay


class Record(Mapping):
    """One user's record: a read-only mapping key -> tensor view over one flat buffer."""

    __slots__ = ("layout", "buf")

    def __init__(self, layout: RecordLayout, buf: Tensor):
        if buf.dtype != torch.uint8 or buf.shape != (layout.record_bytes,):
            raise ValueError(f"Record: buffer must be uint8 [{layout.record_bytes}], got {buf.dtype} "
                             f"{tuple(buf.shape)}")
        self.layout, self.buf = layout, buf

    def __getitem__(self, key: str) -> Tensor:
        return self.layout.view(self.buf, key)

    def __iter__(self) -> Iterator[str]:
        return (f[0] for f in self.layout.fields)

    def __len__(self) -> int:
        return len(self.layout.fields)

    def __contains__(self, key) -> bool:
        return key in self.layout.index

    @property
    def nbytes(self) -> int:
        return self.layout.record_bytes

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> "Record":
        """A record holding copies of ``tensors`` (CPU; dtypes and shapes kept)."""
        lay = layout_of([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()])
        buf = torch.zeros(lay.record_bytes, dtype=torch.uint8)
        for k, t in tensors.items():
            lay.view(buf, k).copy_(t.detach().cpu())
        return cls(lay, buf)


def stack(records: Sequence[Record]) -> Optional[Tensor]:
    """[n, record_bytes] of records with one layout."""
    return torch.stack([r.buf for r in records]) if records else None

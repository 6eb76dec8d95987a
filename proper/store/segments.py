"""The user store: user id -> record (store/records.py), in memory or in immutable, memory-mapped segment files.

A record is everything per user that is not resident (proper/store/slots.py decides what goes in one). The store
is log-structured, so saving is incremental and atomic without ever rewriting a file in place:

    overlay     records written since they last reached a segment (CPU memory)
    segments    immutable files ``<uuid>.seg``; the newest segment holding a user is that user's record

A segment file is: 8 bytes (little-endian header length), a JSON header (format tag, user ids, fields
``[key, dtype, shape, offset]``, bytes per record, CRC-32 of every record), zero padding to 64 bytes, then one
fixed-size record per user. Nothing is unpickled; a truncated file, a damaged header or a record whose CRC does
not match raises :class:`StoreError` naming the file (and the user). Records are read through a read-only
``mmap``, so opening a store reads headers only, and paging a user in reads that user's bytes only.

``folder=None``: the overlay lives in memory until a save writes it as a segment into the checkpoint (the store
then reads those users from the checkpoint's files, and the memory is freed). ``folder=PATH``: the overlay is
spilled into PATH as a segment once it holds ``spill_bytes``, and PATH/manifest.json (written atomically)
names PATH's segments.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from ..atomic import atomic_write, atomic_write_json, fsync_dir
from .records import DTYPES, Record, RecordLayout, aligned, layout_of

SEGMENT_FORMAT = "proper-user-segment"
SEGMENT_VERSION = 1
SEGMENT_SUFFIX = ".seg"
MANIFEST = "manifest.json"
#: default size of the in-memory overlay of a folder store before it is spilled into a segment
SPILL_BYTES = 1 << 30
#: a segment's records start at a multiple of this many bytes
DATA_ALIGN = 64


class StoreError(ValueError):
    """A store file is missing, truncated, damaged or not ours."""


class Segment:
    """One immutable segment file: its header parsed on opening, its records read through an mmap."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= size - 8:
                    raise StoreError(f"proper user store: {self.path} is truncated or not a user segment (header "
                                     f"length {n}, file size {size})")
                head = json.loads(f.read(n).decode())
        except FileNotFoundError:
            raise StoreError(f"proper user store: segment {self.path} is missing") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"proper user store: {self.path} has a damaged header ({e})") from None
        if not isinstance(head, dict) or head.get("format") != SEGMENT_FORMAT:
            raise StoreError(f"proper user store: {self.path} is not a user segment (no format "
                             f"{SEGMENT_FORMAT!r})")
        if head.get("version") != SEGMENT_VERSION:
            raise StoreError(f"proper user store: {self.path} has version {head.get('version')!r}; this library "
                             f"reads version {SEGMENT_VERSION}")
        try:
            self.users: List[int] = [int(u) for u in head["users"]]
            self.crc: List[int] = [int(c) for c in head["crc32"]]
            self.record_bytes = int(head["record_bytes"])
            self.layout: RecordLayout = layout_of([(str(k), DTYPES[d], tuple(int(s) for s in shape))
                                                   for k, d, shape, _ in head["fields"]])
            if self.layout.header() != [[str(k), d, [int(x) for x in shape], int(off)]
                                        for k, d, shape, off in head["fields"]] \
                    or self.layout.record_bytes != self.record_bytes:
                raise ValueError("field offsets do not match their dtypes and shapes")
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"proper user store: {self.path} has a damaged header ({type(e).__name__}: {e})") from None
        self.data_offset = aligned(8 + n, DATA_ALIGN)
        want = self.data_offset + len(self.users) * self.record_bytes
        if size != want or len(self.crc) != len(self.users):
            raise StoreError(f"proper user store: {self.path} is truncated or damaged: {size} bytes, its header "
                             f"describes {want} ({len(self.users)} records of {self.record_bytes} bytes)")
        with open(self.path, "rb") as f:   # the map keeps the inode alive if the file is moved or deleted
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def read(self, row: int) -> Record:
        """The record in ``row``, CRC-checked, as fresh tensors."""
        off = self.data_offset + row * self.record_bytes
        buf = self._bytes(off, self.record_bytes)
        if zlib.crc32(buf) != self.crc[row]:
            raise StoreError(f"proper user store: user {self.users[row]}'s record in {self.path} is corrupt (CRC "
                             f"mismatch)")
        return Record(self.layout, _as_tensor(buf))

    def read_field(self, row: int, key: str) -> Tensor:
        """One field of one record (not CRC-checked: a partial read), as a fresh tensor."""
        _, dt, shape, foff, n = self.layout.index[key]
        return _as_tensor(self._bytes(self.data_offset + row * self.record_bytes + foff, n)).view(dt).reshape(shape)

    def _bytes(self, off: int, n: int) -> bytearray:
        """A copy of bytes [off, off + n) of the file. The mapped pages are dropped from this process right after
        (MADV_DONTNEED; the file stays in the page cache), so reading every user once does not leave the whole
        store counted in the process's resident set."""
        buf = bytearray(memoryview(self._mm)[off: off + n])
        start = off // mmap.PAGESIZE * mmap.PAGESIZE
        if hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_DONTNEED") and n:
            self._mm.madvise(mmap.MADV_DONTNEED, start, off + n - start)
        return buf

    @property
    def nbytes(self) -> int:
        return self.data_offset + len(self.users) * self.record_bytes

    def copy_to(self, dst: Path) -> None:
        """Put this segment at ``dst``: a hard link, else a file copy, else (its file was moved or deleted since
        it was opened, e.g. a renamed checkpoint folder) its bytes from the open map; atomically."""
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            try:
                os.link(self.path, tmp)
            except OSError:
                shutil.copyfile(self.path, tmp)
            os.replace(tmp, dst)
        except OSError:
            if tmp.exists():
                tmp.unlink()
            atomic_write(dst, lambda t: Path(t).write_bytes(self._bytes(0, self.nbytes) if self._mm is not None
                                                            else b""))


def write_segment(folder: Path, items: List[Tuple[int, Record]]) -> str:
    """Write ``items`` (records of one layout) as a new segment in ``folder``, atomically; returns its name."""
    layout = items[0][1].layout
    if any(r.layout is not layout for _, r in items):
        raise ValueError("write_segment: records of one segment must have one layout")
    blobs = [r.buf.contiguous().numpy().tobytes() for _, r in items]
    head = json.dumps({"format": SEGMENT_FORMAT, "version": SEGMENT_VERSION, "users": [int(u) for u, _ in items],
                       "crc32": [zlib.crc32(b) for b in blobs], "record_bytes": layout.record_bytes,
                       "fields": layout.header()}).encode()
    name = f"{uuid.uuid4().hex}{SEGMENT_SUFFIX}"

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            f.write(b"\0" * (aligned(8 + len(head), DATA_ALIGN) - 8 - len(head)))
            for b in blobs:
                f.write(b)

    atomic_write(Path(folder) / name, write)
    return name


class UserStore:
    """user id -> record; module docstring. ``get`` returns None for a user never stored (created from its
    deterministic initialisation by the caller)."""

    def __init__(self, folder: Optional[os.PathLike] = None, spill_bytes: int = SPILL_BYTES):
        self.folder = None if folder is None else Path(folder)
        self.spill_bytes = spill_bytes
        self._overlay: Dict[int, Record] = {}
        self._overlay_bytes = 0
        self._index: Dict[int, Tuple[Segment, int]] = {}
        self._segments: Dict[str, Segment] = {}   # name -> segment, in the order they were added
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._bind(self.folder, _read_manifest(self.folder))

    # ------------------------------------------------------------------------------------------ reading
    def __contains__(self, uid: int) -> bool:
        return uid in self._overlay or uid in self._index

    def __len__(self) -> int:
        return len(self._index.keys() | self._overlay.keys())

    def user_ids(self) -> List[int]:
        return sorted(self._index.keys() | self._overlay.keys())

    def get(self, uid: int) -> Optional[Record]:
        rec = self._overlay.get(uid)
        if rec is not None:
            return rec
        hit = self._index.get(uid)
        return None if hit is None else hit[0].read(hit[1])

    def get_field(self, uid: int, key: str) -> Optional[Tensor]:
        rec = self._overlay.get(uid)
        if rec is not None:
            return rec[key] if key in rec else None
        hit = self._index.get(uid)
        if hit is None or key not in hit[0].layout.keys:
            return None
        return hit[0].read_field(hit[1], key)

    # ------------------------------------------------------------------------------------------ writing
    def put(self, uid: int, rec) -> None:
        """Store ``rec`` (a Record, or a mapping key -> tensor, copied) as user ``uid``'s newest record."""
        if not isinstance(rec, Record):
            rec = Record.from_tensors(rec)
        old = self._overlay.get(uid)
        if old is not None:
            self._overlay_bytes -= old.nbytes
        self._overlay[uid] = rec
        self._overlay_bytes += rec.nbytes
        if self.folder is not None and self._overlay_bytes >= self.spill_bytes:
            self.spill()

    def spill(self) -> None:
        """Folder store: write the overlay into the folder as segments and commit the folder's manifest."""
        if self.folder is None or not self._overlay:
            return
        self._write_overlay(self.folder)
        self._commit_manifest()

    def save_into(self, dest: os.PathLike) -> List[str]:
        """Put every stored user into folder ``dest`` as segment files and return the names of the segments that
        hold them (newest last). Incremental: segments already in ``dest`` are kept, the store's other segments
        are hard-linked (copied where links fail), and only the overlay is written. Commits nothing by itself:
        the caller's save record naming these segments is the commit point; then :func:`remove_unlisted`."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if self._overlay:   # a memory store writes it straight into dest; a folder store into its own folder
            self._write_overlay(dest if self.folder is None else self.folder)
            if self.folder is not None:
                self._commit_manifest()
        for name in self._live_segments():
            if not (dest / name).exists():
                self._segments[name].copy_to(dest / name)
        fsync_dir(dest)
        return self._live_segments()

    def _write_overlay(self, folder: Path) -> None:
        groups: Dict[int, List[Tuple[int, Record]]] = {}
        for uid in sorted(self._overlay):
            rec = self._overlay[uid]
            groups.setdefault(id(rec.layout), []).append((uid, rec))   # layouts are interned
        for items in groups.values():
            name = write_segment(folder, items)
            self._add(Segment(Path(folder) / name))
        self._overlay.clear()
        self._overlay_bytes = 0

    # ------------------------------------------------------------------------------------------ segments
    def _add(self, seg: Segment) -> None:
        self._segments[seg.name] = seg
        for row, uid in enumerate(seg.users):
            self._index[uid] = (seg, row)

    def _bind(self, folder: Path, names: Iterable[str]) -> None:
        for name in names:
            self._add(Segment(Path(folder) / name))

    def _forget(self) -> None:
        self._overlay.clear()
        self._overlay_bytes = 0
        self._index.clear()
        self._segments.clear()

    def _commit_manifest(self) -> None:
        atomic_write_json(self.folder / MANIFEST, {"format": SEGMENT_FORMAT, "segments": self._live_segments()})

    def clear(self) -> None:
        """Forget every user; a folder store also deletes its manifest and segment files (a fresh run's store)."""
        self._forget()
        if self.folder is not None:
            (self.folder / MANIFEST).unlink(missing_ok=True)
            remove_unlisted(self.folder, ())

    def replace_with(self, segments: Iterable[Segment]) -> None:
        """Hold exactly the users of ``segments`` (a loaded save's, opened; later ones win): anything stored before
        is dropped. A folder store links the segments into its own folder and commits its manifest."""
        segments = list(segments)
        self._forget()
        if self.folder is not None:
            for seg in segments:
                if not (self.folder / seg.name).exists():
                    seg.copy_to(self.folder / seg.name)
        for seg in segments:   # (the open segments serve the reads; a folder's links hold the same bytes)
            self._add(seg)
        if self.folder is not None:
            self._commit_manifest()

    def _live_segments(self) -> List[str]:
        """Segments that still hold the newest record of at least one user, oldest first."""
        live = {seg.name for seg, _ in self._index.values()}
        return [n for n in self._segments if n in live]

    def snapshot(self) -> tuple:
        """A cheap copy of which record each user has now (records are never changed in place)."""
        return dict(self._index), dict(self._overlay), self._overlay_bytes

    def restore(self, snap: tuple) -> None:
        self._index, self._overlay, self._overlay_bytes = dict(snap[0]), dict(snap[1]), snap[2]


def remove_unlisted(folder: os.PathLike, keep: Iterable[str]) -> None:
    """Delete the segment files in ``folder`` that ``keep`` does not name, and temp files that killed writes
    left (after a save committed: its writer is the folder's only one)."""
    keep = set(keep)
    for f in [*Path(folder).glob(f"*{SEGMENT_SUFFIX}"), *Path(folder).glob(".*.tmp")]:
        if f.name not in keep:
            try:
                f.unlink()
            except OSError:
                pass


def _read_manifest(folder: Path) -> List[str]:
    f = folder / MANIFEST
    if not f.exists():
        return []
    try:
        m = json.loads(f.read_text())
        names = m["segments"]
        if m.get("format") != SEGMENT_FORMAT or not all(isinstance(n, str) for n in names):
            raise ValueError("not a user store manifest")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise StoreError(f"proper user store: {f} is damaged or not a user store manifest ({e})") from None
    return names


def _as_tensor(buf: bytearray) -> Tensor:
    return torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.zeros(0, dtype=torch.uint8)

"""UserSlots: the S resident user slots of a paged model, and the paging between them and the user store.

With ``ProperConfig(resident_users=S)`` every per-user table of every layer has S rows (slots), and the kernels
index slots. This object maps user ids to slots:

- ``rows(user_ids)`` gives each user a slot, paging missing users in, least recently used slot out first. A user
  the store has never seen is created from its deterministic initialisation (store/init.py), so lazy and eager
  creation give the same weights.
- A slot is *dirty* once a forward with gradients, an optimizer step or an import may have changed it; a dirty
  slot is written back to the store when it is evicted, on save and on :meth:`flush`. (Not when a ``users()``
  block ends: a training step's optimizer update comes after its block, so a copy there would be stale.)
- Slots are *pinned* while a ``users()`` block that uses them is open, and *held* from a forward with gradients
  until the next step of the model's optimizer: the step updates slot rows, so they must still hold the same
  users. A batch that needs more slots than are free raises :class:`ResidentUsersError` naming
  ``resident_users``.

A record holds, per adapted layer, the user's rows of ``user_a``, ``user_b``, ``user_ranks``, ``user_scale`` and the
user-aware router's ``embedding.weight``, plus, when an optimizer from :func:`proper.make_optimizer` is attached,
its moment rows and per-row step counts, tagged with the optimizer's epoch (a new optimizer starts from zero
moments, as torch optimizers do; one loaded from a state dict takes back its epoch).
"""
from __future__ import annotations

import collections
import uuid
import weakref
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .init import init_router_row, init_user_a
from .records import Record, layout_of
from .segments import UserStore

if TYPE_CHECKING:
    from ..state import ProperState

#: Local keys of a ProperLinear's per-user tensors (dim 0 = user, or slot when paged).
ROW_KEYS = ("user_a", "user_b", "user_ranks", "user_scale", "router.embedding.weight")
#: Of those, the ones an optimizer trains (moment rows are paged with them).
TRAINED_ROW_KEYS = ("user_a", "user_b", "router.embedding.weight")
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_EPOCH = "@epoch"


class ResidentUsersError(RuntimeError):
    """A batch needs more user slots than ``resident_users`` leaves free."""


def row_tables(state: "ProperState") -> List[Tuple[str, str, str, Tensor]]:
    """(record key, layer name, local key, table) of every per-user tensor of the model."""
    out = []
    for name, layer in state.layers.items():
        ts = layer.adapter_tensors()
        out += [(f"{name}.{k}", name, k, ts[k]) for k in ROW_KEYS if k in ts]
    return out


def initial_rows(state: "ProperState", layer: str, key: str, uids: Sequence[int], like: Tensor) -> Tensor:
    """[len(uids), *like.shape[1:]] initial rows of one per-user table (``like``) for the users ``uids``, on the
    table's device and dtype."""
    cfg = state.cfg
    shape = (len(uids), *like.shape[1:])
    if key == "user_ranks":
        return torch.full(shape, cfg.user_rank, dtype=like.dtype, device=like.device)
    if key == "user_scale":
        return torch.full(shape, cfg.user_scale, dtype=like.dtype, device=like.device)
    if key == "user_a":
        draw = lambda row, u: init_user_a(row, cfg.init_a, cfg.user_init_seed, layer, u)  # noqa: E731
    elif key == "router.embedding.weight":
        draw = lambda row, u: init_router_row(row, cfg.router_init_std, cfg.user_init_seed, layer, u)  # noqa: E731
    else:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)   # user_b: LoRA's B starts at zero
    out = torch.empty(shape, dtype=torch.float32)
    for i, u in enumerate(uids):   # one seeded generator per user: the draws do not depend on who else is here
        draw(out[i], int(u))
    return out.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def initial_row(state: "ProperState", layer: str, key: str, uid: int, out: Tensor) -> Tensor:
    """Write user ``uid``'s initial value of one per-user tensor row into ``out``."""
    return out.copy_(initial_rows(state, layer, key, [uid], out.unsqueeze(0))[0])


class UserSlots:
    """Slots of one paged model (module docstring)."""

    def __init__(self, state: "ProperState", store: UserStore):
        self.state = state
        self.store = store
        self.num_slots = state.cfg.resident_users
        self.user_of: List[int] = [-1] * self.num_slots      # slot -> user id (-1: free)
        self.slot_of: Dict[int, int] = {}                     # user id -> slot
        self.lru: "collections.OrderedDict[int, None]" = collections.OrderedDict()   # resident slots, oldest first
        self.pins = [0] * self.num_slots
        self.held: set = set()
        self.dirty: set = set()
        self.whole: set = set()                               # slots to write back with every field (imports)
        self.stored_keys: Dict[int, frozenset] = {}           # slot -> fields its user's stored record has
        self._tables: Optional[list] = None
        self._by_key: Optional[dict] = None
        self._stage: Optional[Tensor] = None                  # page-in staging buffer (see _grouped)
        self._stage_out: Optional[Tensor] = None              # write-back gather buffer (see records)
        self._optimizer = None                                # weakref to the attached ProperAdamW
        self.epoch = 0
        self.page_ins = 0
        self.write_backs = 0

    # ------------------------------------------------------------------------------------------ mapping
    @property
    def tables(self):
        if self._tables is None:
            self._tables = row_tables(self.state)
        return self._tables

    def rows(self, user_ids: Sequence[int], *, pin: bool = False, write: bool = False) -> List[int]:
        """The slot of each id (-1 stays -1), paging in the missing users; ``pin`` pins the slots (release with
        :meth:`unpin`), ``write`` marks them dirty."""
        need = list(dict.fromkeys(u for u in user_ids if u >= 0))
        missing = [u for u in need if u not in self.slot_of]
        if missing:
            self._make_room(need, len(missing))
            free = [s for s, u in enumerate(self.user_of) if u < 0][: len(missing)]
            victims = self._evictable(set(need))[: len(missing) - len(free)]
            self._evict(victims)
            self._page_in(missing, free + victims)
        for u in need:
            self.lru.move_to_end(self.slot_of[u])
        out = [self.slot_of[u] if u >= 0 else -1 for u in user_ids]
        slots = [self.slot_of[u] for u in need]
        if pin:
            for s in slots:
                self.pins[s] += 1
        if write:   # written from outside (an import): every field changes
            self.dirty.update(slots)
            self.whole.update(slots)
        return out

    def unpin(self, slots: Iterable[int]) -> None:
        for s in set(s for s in slots if s >= 0):
            self.pins[s] -= 1

    def hold(self, slots: Iterable[int]) -> None:
        """Keep ``slots`` (and mark them dirty) until the optimizer's next step: they may be updated there."""
        s = {x for x in slots if x >= 0}
        self.held |= s
        self.dirty |= s

    def release_held(self) -> None:
        self.held.clear()

    def mark_dirty(self, slots: Iterable[int]) -> None:
        self.dirty.update(int(s) for s in slots if s >= 0)

    @property
    def chunk(self) -> int:
        """Users one call may page in beside a full batch and still find resident afterwards (routing, export)."""
        return max(1, self.num_slots // 2)

    def resident_users(self) -> List[int]:
        return [u for u in self.user_of if u >= 0]

    # ------------------------------------------------------------------------------------------ paging
    def _evictable(self, keep: set) -> List[int]:
        return [s for s in self.lru if not self.pins[s] and s not in self.held and self.user_of[s] not in keep]

    def _make_room(self, need: List[int], n_missing: int) -> None:
        free = self.num_slots - len(self.lru)
        if free >= n_missing:
            return
        keep = set(need)
        if free + len(self._evictable(keep)) < n_missing:
            pinned = sum(1 for s in self.lru if self.pins[s])
            held = len(self.held - {s for s in self.lru if self.pins[s]})
            raise ResidentUsersError(
                f"proper.users: the batch needs {len(need)} distinct users resident ({n_missing} not yet), but "
                f"resident_users={self.num_slots} slots hold {pinned} users pinned by open users() blocks and "
                f"{held} held for the coming optimizer step (forwards with gradients since the last "
                f"proper.make_optimizer step). Raise ProperConfig(resident_users=...) to at least the distinct "
                f"users of one optimizer step, step the optimizer from proper.make_optimizer (other optimizers "
                f"do not release slots), or run inference under torch.no_grad()")

    def _evict(self, slots: List[int]) -> None:
        self._write_back([s for s in slots if s in self.dirty])
        for s in slots:
            del self.slot_of[self.user_of[s]]
            self.user_of[s] = -1
            del self.lru[s]
            self.stored_keys.pop(s, None)

    def _index(self, slots: Sequence[int], like: Tensor) -> Tensor:
        return torch.tensor(list(slots), dtype=torch.int64, device=like.device)

    @torch.no_grad()
    def _page_in(self, uids: List[int], slots: List[int]) -> None:
        """Bring users ``uids`` into the free ``slots``: one copy per table for all of them (stored users from
        their records, grouped by record layout; new users from their seeded initial rows)."""
        recs = [self.store.get(u) for u in uids]
        groups = self._grouped(recs)
        for key, layer, local, t in self.tables:
            fresh = [i for i, r in enumerate(recs) if r is None or key not in r]
            for lay, pos, buf in groups.values():
                if key in lay.keys:
                    t.index_copy_(0, self._index([slots[i] for i in pos], t), lay.view(buf, key).to(t.device, t.dtype))
            if fresh:
                t.index_copy_(0, self._index([slots[i] for i in fresh], t),
                              initial_rows(self.state, layer, local, [uids[i] for i in fresh], t))
        self._load_moments(slots, recs, groups)
        for u, s, r in zip(uids, slots, recs):
            self.user_of[s] = u
            self.slot_of[u] = s
            self.lru[s] = None
            self.lru.move_to_end(s)
            self.stored_keys[s] = r.layout.keys if r is not None else frozenset()
        self.page_ins += len(uids)

    def _grouped(self, recs: List[Optional[Record]]) -> Dict[int, tuple]:
        """{layout id: (layout, positions in recs, [n, record_bytes] stacked buffers)} of the stored records. The
        stack goes into one staging buffer kept across calls (grown to the largest page-in seen, at most
        resident_users records): a fresh buffer of that size would cost more in page faults than the copy."""
        pos_of: Dict[int, tuple] = {}
        for i, r in enumerate(recs):
            if r is not None:
                pos_of.setdefault(id(r.layout), (r.layout, []))[1].append(i)
        stage = self._staging("_stage", sum(lay.record_bytes * len(pos) for lay, pos in pos_of.values()))
        out, off = {}, 0
        for k, (lay, pos) in pos_of.items():
            n = lay.record_bytes * len(pos)
            buf = stage[off: off + n].view(len(pos), lay.record_bytes)
            torch.stack([recs[i].buf for i in pos], out=buf)
            out[k] = (lay, pos, buf)
            off += n
        return out

    def _staging(self, name: str, nbytes: int) -> Tensor:
        """The uint8 staging buffer ``name``, kept across calls and grown to at least ``nbytes``."""
        buf = getattr(self, name)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            setattr(self, name, buf)
        return buf

    def _moment_tables(self):
        """(record key, its optimizer state dict) for every trained table the attached optimizer holds."""
        opt = None if self._optimizer is None else self._optimizer()
        if opt is None:
            return []
        out = []
        for key, _, local, t in self.tables:
            st = opt.state.get(t) if local in TRAINED_ROW_KEYS else None
            if st:
                out.append((key, st))
        return out

    @torch.no_grad()
    def _load_moments(self, slots: List[int], recs: List[Optional[Record]], groups=None) -> None:
        """The moment rows of ``slots`` from their records when those carry this optimizer's epoch, else zero."""
        moments = self._moment_tables()
        if not moments:
            return
        if groups is None:
            groups = self._grouped(recs)
        current = []                   # (layout, positions, buffers, rows of them) of records with this epoch
        for lay, pos, buf in groups.values():
            if _EPOCH in lay.keys:
                ok = (lay.view(buf, _EPOCH) == self.epoch).tolist()
                keep = [j for j, v in enumerate(ok) if v]
                if keep:
                    current.append((lay, [pos[j] for j in keep], buf, None if len(keep) == len(pos) else
                                    torch.tensor(keep)))
        for key, st in moments:
            for m in (*_MOMENTS, "step"):
                if m not in st:
                    continue
                dst, k = st[m], f"{key}@{m}"
                loaded = set()
                for lay, pos, buf, rows in current:
                    if k in lay.keys:
                        src = lay.view(buf, k) if rows is None else lay.view(buf, k).index_select(0, rows)
                        dst.index_copy_(0, self._index([slots[i] for i in pos], dst), src.to(dst.device, dst.dtype))
                        loaded.update(pos)
                rest = [slots[i] for i in range(len(slots)) if i not in loaded]
                if rest:
                    dst.index_fill_(0, self._index(rest, dst), 0)

    @torch.no_grad()
    def records(self, slots: Sequence[int]) -> List[Record]:
        """The store records of the users in ``slots``: one gather per table for all of them (into a buffer kept
        across calls), then one copy per user. Only the fields that can differ from a user's initial rows are
        kept: those its stored record had, those being trained (requires_grad) and, after an import, all (a
        group-stage record is the router rows), plus the attached optimizer's moment rows and epoch. Floats in
        store_dtype (scales and step counts fp32)."""
        dt = torch.bfloat16 if self.state.cfg.store_dtype == "bfloat16" else torch.float32
        moments = self._moment_tables()
        by_keys: Dict[tuple, List[int]] = {}
        for s in slots:
            had, whole = self.stored_keys.get(s, frozenset()), s in self.whole
            keys = tuple(k for k, _, _, t in self.tables if whole or k in had or t.requires_grad)
            by_keys.setdefault(keys, []).append(s)
        out: Dict[int, Record] = {}
        for keys, ss in by_keys.items():
            chosen = set(keys)
            srcs = [(k, t, local == "user_scale") for k, _, local, t in self.tables if k in chosen]
            srcs += [(f"{k}@{m}", st[m], m == "step") for k, st in moments for m in (*_MOMENTS, "step") if m in st]
            fields = [(k, _stored_dtype(t, dt, exact), tuple(t.shape[1:])) for k, t, exact in srcs]
            if moments:
                fields.append((_EPOCH, torch.int64, ()))
            lay = layout_of(fields)
            need = len(ss) * lay.record_bytes
            buf = self._staging("_stage_out", need)[:need].view(len(ss), lay.record_bytes).zero_()   # (zero padding)
            for k, t, _ in srcs:
                lay.view(buf, k).copy_(t.detach().index_select(0, self._index(ss, t)))
            if moments:
                lay.view(buf, _EPOCH).fill_(self.epoch)
            for i, s in enumerate(ss):
                out[s] = Record(lay, buf[i].clone())
        return [out[s] for s in slots]

    def record(self, slot: int) -> Record:
        return self.records([slot])[0]

    def _write_back(self, slots: List[int]) -> None:
        if not slots:
            return
        for s, rec in zip(slots, self.records(slots)):
            self.store.put(self.user_of[s], rec)
            self.stored_keys[s] = rec.layout.keys
            self.dirty.discard(s)
            self.whole.discard(s)
        self.write_backs += len(slots)

    def flush(self) -> None:
        """Write every dirty slot back to the store (the slots stay resident)."""
        self._write_back(sorted(s for s in self.dirty if self.user_of[s] >= 0))
        self.dirty.clear()

    def drop_all(self) -> None:
        """Forget every resident user without writing back (after the store was restored or replaced)."""
        if any(self.pins):
            raise RuntimeError("proper: cannot drop the resident users while a users() block is open")
        self.user_of = [-1] * self.num_slots
        self.slot_of.clear()
        self.lru.clear()
        self.held.clear()
        self.dirty.clear()
        self.whole.clear()
        self.stored_keys.clear()

    def arrange(self, user_ids: Sequence[int]) -> None:
        """Put the i-th distinct user of ``user_ids`` in slot i (paging in as needed). Under data parallelism
        every rank calls this with the same global batch, so slot s holds the same user on every rank and the
        gradients of the slot tables can be averaged slot by slot."""
        order = list(dict.fromkeys(u for u in user_ids if u >= 0))
        if len(order) > self.num_slots:
            raise ResidentUsersError(f"proper: a global batch of {len(order)} distinct users does not fit "
                                     f"resident_users={self.num_slots}")
        self.rows(order)
        for i, u in enumerate(order):
            s = self.slot_of[u]
            if s != i:
                self._swap(s, i)

    @torch.no_grad()
    def _swap(self, a: int, b: int) -> None:
        for _, _, _, t in self.tables:
            t[[a, b]] = t[[b, a]]
        for _, st in self._moment_tables():
            for m in (*_MOMENTS, "step"):
                if m in st:
                    st[m][[a, b]] = st[m][[b, a]]
        ua, ub = self.user_of[a], self.user_of[b]
        self.user_of[a], self.user_of[b] = ub, ua
        for u, s in ((ub, a), (ua, b)):
            if u >= 0:
                self.slot_of[u] = s
        self.pins[a], self.pins[b] = self.pins[b], self.pins[a]
        ka, kb = self.stored_keys.pop(a, frozenset()), self.stored_keys.pop(b, frozenset())
        self.stored_keys[a], self.stored_keys[b] = kb, ka
        for group in (self.held, self.dirty, self.whole):
            ina, inb = a in group, b in group
            group.discard(a), group.discard(b)
            if ina:
                group.add(b)
            if inb:
                group.add(a)
        lru = collections.OrderedDict()
        for s in self.lru:
            lru[b if s == a else a if s == b else s] = None
        self.lru = lru

    # ------------------------------------------------------------------------------------------ optimizer
    def attach_optimizer(self, opt, epoch: Optional[int] = None) -> None:
        """Page ``opt``'s row-sparse moments with the slots. A new optimizer (``epoch`` None) gets a fresh epoch:
        every user's moments start at zero, as in any new torch optimizer. Creates the moment rows now (zeros),
        so that a user paged in before the first step can receive its stored moments."""
        self._optimizer = weakref.ref(opt)
        self.epoch = uuid.uuid4().int >> 65 if epoch is None else int(epoch)
        opt.create_row_state()
        resident = [s for s, u in enumerate(self.user_of) if u >= 0]   # they take their moments of this epoch
        self._load_moments(resident, [self.store.get(self.user_of[s]) for s in resident])

    # ------------------------------------------------------------------------------------------ store-wide
    def snapshot(self) -> tuple:
        """The state of every user now (flushes the dirty slots first); :meth:`restore` brings it back."""
        self.flush()
        return self.store.snapshot()

    def restore(self, snap: tuple) -> None:
        if any(self.pins):
            raise RuntimeError("proper: cannot restore the users while a users() block is open")
        self.store.restore(snap)
        resident = self.resident_users()
        self.drop_all()
        self.rows(resident)   # same users resident, now with the restored values

    def stored_users(self) -> List[int]:
        """The users whose rows differ from their initial ones (trained or imported): the store's, once the
        dirty slots are written back. (Not merely resident ones: what was paged in only to be read is not
        part of it, so the set does not depend on paging.)"""
        self.flush()
        return self.store.user_ids()

    def field(self, uid: int, key: str) -> Tensor:
        """One per-user tensor row of user ``uid`` (resident, stored or initial), without paging it in."""
        if self._by_key is None:
            self._by_key = {k: (layer, local, t) for k, layer, local, t in self.tables}
        layer, local, t = self._by_key[key]
        s = self.slot_of.get(uid)
        if s is not None:
            return t[s].detach()
        v = self.store.get_field(uid, key)
        if v is not None:
            return v.to(device=t.device, dtype=t.dtype)
        return initial_row(self.state, layer, local, uid, torch.empty_like(t[0]))


def _stored_dtype(t: Tensor, float_dtype: torch.dtype, exact_fp32: bool) -> torch.dtype:
    """A row's dtype in the store: floats in the store dtype (fp32 for scales and step counts)."""
    if t.is_floating_point():
        return torch.float32 if exact_fp32 else float_dtype
    return t.dtype

"""The paged user store (``ProperConfig(resident_users=S, user_store=None | PATH)``).

    init.py      each user's deterministic initial rows (seed, layer, tensor, user id)
    records.py   Record: one user's fields in one flat byte buffer (RecordLayout: where each field lives)
    segments.py  UserStore: user id -> record, in memory or in immutable memory-mapped segment files
    slots.py     UserSlots: the S resident slots of a model, LRU paging, write-back, optimizer moment rows
"""
from .segments import Segment, StoreError, UserStore, remove_unlisted
from .records import Record, RecordLayout
from .slots import ROW_KEYS, TRAINED_ROW_KEYS, ResidentUsersError, UserSlots, initial_row, initial_rows, row_tables

__all__ = ["UserStore", "UserSlots", "StoreError", "ResidentUsersError", "ROW_KEYS", "TRAINED_ROW_KEYS",
           "initial_row", "initial_rows", "row_tables", "remove_unlisted", "Record", "RecordLayout", "Segment"]

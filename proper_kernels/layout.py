"""Token -> adapter metadata for segment (SGMV-style) kernels, built on the tokens' device without host syncs.

Tokens are grouped by user: segment u (0 <= u < U) holds the tokens of user u, segment U the tokens with no
user (-1). Every tensor here has a shape known from (T, U, block) alone, so the whole layout can be captured
in a CUDA graph or traced by torch.compile.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class TokenLayout(NamedTuple):
    order: Tensor       # [T] int64: token indices sorted by user (stable; no-user tokens last)
    seg_start: Tensor   # [U+1] int64: first position in `order` of each user's segment
    seg_len: Tensor     # [U+1] int64: tokens of each user (the last entry: tokens with no user)


def token_layout(user_ids: Tensor, num_users: int) -> TokenLayout:
    """Sort tokens by user and describe the per-user segments.

    Ids outside [0, U) count as "no user" (they only get here with check_values=False): never an
    out-of-bounds segment in a kernel.
    """
    ids = user_ids.long()
    key = torch.where((ids >= 0) & (ids < num_users), ids, torch.full_like(ids, num_users))  # [T] -1 -> U
    order = torch.argsort(key, stable=True)                                   # [T]
    # scatter_add, not bincount: CUDA bincount reads the max id back to the host (a sync, no graph capture)
    seg_len = torch.zeros(num_users + 1, dtype=torch.int64, device=key.device)
    seg_len.scatter_add_(0, key, torch.ones_like(key))                        # [U+1]
    seg_start = torch.cumsum(seg_len, 0) - seg_len                            # [U+1]
    return TokenLayout(order, seg_start, seg_len)


class BlockTable(NamedTuple):
    """One row per program of a segment kernel: which user and which rows of `order` it owns."""

    block_user: Tensor   # [P] int32: user of the block, -1 for an idle program
    block_start: Tensor  # [P] int32: first position in `order`
    block_end: Tensor    # [P] int32: one past the last position (<= block_start + block)


def max_blocks(num_tokens: int, num_users: int, block: int) -> int:
    """Static upper bound on the number of blocks: each segment adds at most one partial block."""
    return -(-num_tokens // block) + min(num_tokens, num_users)


def block_table(layout: TokenLayout, num_users: int, block: int, *, include_no_user: bool = False) -> BlockTable:
    """Split each user's segment into blocks of at most `block` tokens (no-user tokens get none).

    The table has the static length :func:`max_blocks`; trailing programs are idle (block_user = -1).
    With ``include_no_user`` the no-user segment (index U) is split too, its blocks have block_user = U (a
    kernel that also computes the expert term needs every token), and the length is
    ``max_blocks(T, U + 1, block)``.
    """
    T = layout.order.shape[0]
    nseg = num_users + 1 if include_no_user else num_users                   # segments that get blocks
    P = max(1, max_blocks(T, nseg, block))
    dev = layout.order.device
    if nseg == 0:
        idle = torch.full((P,), -1, dtype=torch.int32, device=dev)
        return BlockTable(idle, idle.clamp(min=0), idle.clamp(min=0))
    seg_len = layout.seg_len[:nseg]                                            # [S]
    nblk = (seg_len + block - 1) // block                                      # [S]
    blk_end = torch.cumsum(nblk, 0)                                            # [S]
    pid = torch.arange(P, device=dev)                                          # [P]
    seg = torch.searchsorted(blk_end, pid, right=True)                         # [P]
    active = seg < nseg
    seg_c = seg.clamp(max=nseg - 1)
    first_blk = blk_end[seg_c] - nblk[seg_c]
    j = pid - first_blk                                                        # block index within segment
    start = layout.seg_start[seg_c] + j * block
    end = torch.minimum(start + block, layout.seg_start[seg_c] + layout.seg_len[seg_c])
    neg = torch.full_like(pid, -1)
    return BlockTable(torch.where(active, seg_c, neg).int(), torch.where(active, start, 0).int(),
                      torch.where(active, end, 0).int())


def active_users(layout: TokenLayout, num_users: int) -> Tensor:
    """Users that own at least one token, ascending, padded with -1 to the static length max(1, min(T, U)).

    A per-user reduction kernel launches one program row per entry, so its grid scales with the tokens of
    the batch, not with the size of the user table.  # [max(1, min(T, U))] int32
    """
    T = layout.order.shape[0]
    n = max(1, min(T, num_users))
    dev = layout.order.device
    out = torch.full((n + 1,), -1, dtype=torch.int64, device=dev)              # slot n: dump for empty users
    if num_users == 0:
        return out[:n].int()
    has = layout.seg_len[:num_users] > 0                                       # [U]
    slot = torch.where(has, torch.cumsum(has, 0) - 1, n)                       # [U] rank among active users
    out.scatter_(0, slot, torch.arange(num_users, device=dev))
    return out[:n].int()

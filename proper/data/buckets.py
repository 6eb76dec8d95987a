"""Users by profile size: the buckets every table and plot uses, and a reproducible user subset."""
from __future__ import annotations

import random
from typing import Sequence, Union

from .schema import Dataset

# --------------------------------------------------------------------------------- users and buckets
def select_users(dataset: Dataset, max_users: Union[int, str, None], seed: int = 0) -> Dataset:
    """A reproducible subset: ``max_users`` users drawn uniformly at random with ``seed`` (so the subset keeps
    the full set's profile-size distribution), kept in the data set's order. ``None``/``"all"`` keeps all."""
    if max_users is None or (isinstance(max_users, str) and max_users.lower() == "all"):
        return dataset
    try:
        n = int(max_users)
    except (TypeError, ValueError):
        raise ValueError(f"max_users must be a positive integer or 'all', got {max_users!r}") from None
    if n <= 0:
        raise ValueError(f"max_users must be a positive integer or 'all', got {max_users!r}")
    if n >= len(dataset):
        return dataset
    keep = set(random.Random(seed).sample(dataset.user_list, n))
    return dataset.subset([u for u in dataset.users if u in keep])


#: Upper edges of the per-profile-size buckets (number of training examples of a user).
PROFILE_BUCKETS = (20, 50, 100, 200)


def profile_bucket(n: int, edges: Sequence[int] = PROFILE_BUCKETS) -> str:
    """Bucket label of a profile of ``n`` training examples: ``"<=20"``, ``"21-50"``, ..., ``">200"``."""
    lo = 0
    for e in edges:
        if n <= e:
            return f"<={e}" if lo == 0 else f"{lo + 1}-{e}"
        lo = e
    return f">{edges[-1]}"


#: Every bucket label in increasing profile size (tables and plots list them in this order).
BUCKET_ORDER = tuple(profile_bucket(e) for e in PROFILE_BUCKETS) + (profile_bucket(10 ** 9),)



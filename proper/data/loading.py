"""One entry point for every source: load_dataset(spec)."""
from __future__ import annotations

from pathlib import Path

from .jsonl import read_jsonl
from .lamp import read_lamp
from .movielens import load_movielens_100k
from .schema import DataError, Dataset, PathLike

# ------------------------------------------------------------------------------------------ entry point
def load_dataset(spec: PathLike, *, on_error: str = "raise", **kw) -> Dataset:
    """``"movielens-100k"`` (built in), a ``.jsonl`` file (our schema), or LaMP: a ``*questions*.json`` file
    (outputs found beside it) or a folder holding exactly one ``*questions*.json``.

    MovieLens loaded by name gets the fractional split (:data:`MOVIELENS_SPLIT`: latest 10% test, the 10%
    before dev, at least 2 each) unless ``kw`` says otherwise (``test_frac=None, dev_frac=None`` for the
    fixed-count ``n_test``/``n_dev`` split); ``kw`` goes to the reader."""
    s = str(spec)
    if s.lower() in ("movielens-100k", "ml-100k", "movielens"):
        return load_movielens_100k(on_error=on_error, **kw)   # its defaults are MOVIELENS_SPLIT
    p = Path(s)
    if p.is_dir():
        qs = sorted(p.glob("*questions*.json"))
        if len(qs) != 1:
            raise DataError(f"{p}: expected exactly one LaMP *questions*.json in the folder, found "
                            f"{[q.name for q in qs] or 'none'}; name the file instead")
        return read_lamp(qs[0], on_error=on_error, **kw)
    if not p.exists():
        raise FileNotFoundError(f"--data {s!r}: not 'movielens-100k' and no such file or folder")
    if p.suffix in (".jsonl", ".ndjson"):
        return read_jsonl(p, on_error=on_error, **kw)
    if p.suffix == ".json":
        return read_lamp(p, on_error=on_error, **kw)
    raise DataError(f"--data {s!r}: unknown format (want movielens-100k, a .jsonl file, or LaMP questions .json)")



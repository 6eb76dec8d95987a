"""Our JSON-lines schema (see the package docstring): read_jsonl / write_jsonl."""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from .schema import DataError, Dataset, Example, PathLike, RATINGS, SPLITS, _Problems, _finish_users

# ------------------------------------------------------------------------------------------------ JSONL
_JSONL_REQUIRED = ("user", "input", "target")


def read_jsonl(path: PathLike, *, n_test: int = 2, n_dev: int = 1, on_error: str = "raise",
               task: Optional[str] = None, name: Optional[str] = None) -> Dataset:
    """Read the documented JSON-lines schema (module docstring) into a per-user split :class:`Dataset`.

    ``task``: ``"rating"`` or ``"generation"``; ``None`` infers ``"rating"`` when every target is one of
    ``"1"`` .. ``"5"``, else ``"generation"``; with ``"rating"`` a line whose target is not one of them is a bad
    line (caught here, not once training has started). Errors name ``path:line``; see ``on_error`` in the module doc.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if task is not None:
        _check_task(task)
    probs = _Problems(on_error)
    per_user: "OrderedDict[str, list]" = OrderedDict()
    with open(path, "rb") as fh:   # bytes: a line of invalid UTF-8 is that line's error, not a traceback
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                probs.report(where, f"not valid UTF-8 (byte {e.start + 1} of the line)", "bad_encoding")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                probs.report(where, f"bad JSON ({e.msg} at column {e.colno})", "bad_json")
                continue
            except RecursionError:
                probs.report(where, "JSON nested too deeply", "bad_json")
                continue
            if not isinstance(obj, dict):
                probs.report(where, f"expected a JSON object, got {type(obj).__name__}", "not_an_object")
                continue
            missing = [k for k in _JSONL_REQUIRED if k not in obj or obj[k] is None]
            if missing:
                probs.report(where, f"missing field(s) {', '.join(missing)} (required: {', '.join(_JSONL_REQUIRED)})",
                             "missing_field")
                continue
            user = obj["user"]
            if isinstance(user, bool) or not isinstance(user, (str, int)) or str(user) == "":
                probs.report(where, f"'user' must be a non-empty string or an integer, got {user!r}", "bad_field")
                continue
            bad = [k for k in ("input", "target") if not isinstance(obj[k], str)]
            if bad:
                probs.report(where, f"field(s) {', '.join(bad)} must be strings", "bad_field")
                continue
            if task == "rating" and obj["target"].strip() not in RATINGS:   # caught here, before any training
                probs.report(where, f"task 'rating' needs targets \"1\" .. \"5\", got {obj['target']!r}",
                             "bad_rating")
                continue
            t = obj.get("time")
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
                probs.report(where, f"'time' must be a finite number or absent, got {t!r}", "bad_field")
                continue
            sp = obj.get("split")
            if sp is not None and sp not in SPLITS:
                probs.report(where, f"'split' must be one of {SPLITS} or absent, got {sp!r}", "bad_field")
                continue
            meta = {k: v for k, v in obj.items() if k not in ("user", "input", "target", "time", "split")}
            meta["source"] = where
            ex = Example(str(user), obj["input"], obj["target"], None if t is None else float(t), meta)
            per_user.setdefault(ex.user, []).append((ex, sp, where))
    users = _finish_users(per_user, probs, n_test, n_dev)
    if not users:
        raise DataError(f"{path}: no usable users (skipped: {dict(probs.skipped) or 'nothing'})")
    allex = [ex for s in users.values() for sp in SPLITS for ex in s[sp]]
    if task is None:
        task = "rating" if all(ex.target.strip() in RATINGS for ex in allex) else "generation"
    return Dataset(name or path.stem, task, users, dict(probs.skipped), probs.problems, {"source": str(path)})


def write_jsonl(dataset: Dataset, path: PathLike) -> None:
    """Write ``dataset`` in the JSON-lines schema, with an explicit ``split`` on each line (so it reads back
    with the same splits)."""
    with open(path, "w", encoding="utf-8") as fh:
        for s in dataset.users.values():
            for sp in SPLITS:
                for ex in s[sp]:
                    obj = {"user": ex.user, "input": ex.input, "target": ex.target}
                    if ex.time is not None:
                        obj["time"] = ex.time
                    obj["split"] = sp
                    fh.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _check_task(task: str) -> None:
    if task not in ("rating", "generation"):
        raise ValueError(f"task must be 'rating' or 'generation', got {task!r}")



"""Personalization data: examples, per-user splits, and the readers users bring their data through.

Three sources, one in-memory shape (:class:`Dataset`: an ordered ``{user: UserSplit}`` with train/dev/test
lists of :class:`Example`):

1. **JSON lines** (:func:`read_jsonl`), the schema for your own data. One object per line::

       {"user": "u17", "input": "How would you rate ...? score: ", "target": "4", "time": 881250949}

   ``user`` (string or integer; kept as a string), ``input`` (string: the prompt) and ``target`` (string: what
   the model should produce after it) are required; ``time`` (a number, e.g. a Unix timestamp) is optional;
   ``split`` (``"train"``, ``"dev"`` or ``"test"``) is optional and, when given on every line of a user,
   overrides the time split. Any other keys are kept in ``Example.meta``. Blank lines are ignored.
   Without ``split``, each user's examples are ordered by ``time`` (file order when ``time`` is absent; ties
   keep file order) and split like MovieLens below: the latest ``n_test`` are test, the ``n_dev`` before
   them dev, the rest is that user's training history.

2. **LaMP** (:func:`read_lamp`), the benchmark's own files, unchanged: a questions JSON (a list of
   ``{"id", "input", "profile": [ {...}, ... ]}``) and optionally the outputs JSON
   (``{"task": "LaMP_3", "golds": [{"id", "output"}, ...]}``). LaMP has one profile per question, so each
   question is one user (``user_id`` when the question has one, else its ``id``): the question is that user's
   test example, the profile items become that user's history through the task's own prompt (see
   :data:`LAMP_PROFILE_PROMPTS`), the latest profile item (by ``date`` when present, else the last one) is
   held out as dev. :func:`write_lamp` writes a dataset back in the same format; :func:`write_lamp_outputs`
   writes predictions in the golds format that LaMP's evaluation scripts read.

3. **MovieLens-100K** (:func:`load_movielens_100k`), the built-in real data set, read from the files the
   ``recbole`` wheel ships (located without importing recbole). 943 users with 20 to 737 ratings each.
   The task is framed as LaMP-3 frames rating prediction: a prompt from the movie's title, year and genres
   (:func:`movielens_prompt`), the target is the user's rating ``"1"`` .. ``"5"``; a model predicts it as the
   argmax (or the expectation) over the five rating tokens (:func:`rating_token_ids`).

Malformed input never disappears silently. With ``on_error="raise"`` (the default) the first problem raises
:class:`DataError` naming the file and line (``path:line: message``). With ``on_error="skip"`` the bad line or
user is skipped and counted in ``Dataset.skipped`` (reason -> count) and listed in ``Dataset.problems``
(``"path:line: message"`` strings), so callers can report them. A user left with no training example (too few
examples for the dev/test hold-out) is such a problem: an error, or a counted skip.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

SPLITS = ("train", "dev", "test")
RATINGS = ("1", "2", "3", "4", "5")
RECBOLE_PIP = "pip install --no-deps recbole==1.2.1"


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


def split_by_time(examples: Sequence[Example], n_test: int = 2, n_dev: int = 1) -> Tuple[List[Example], ...]:
    """(train, dev, test) of one user's examples: sorted by time (stable: ties and missing times keep the given
    order), the latest ``n_test`` are test, the ``n_dev`` before them dev, the rest train.

    Returns empty lists where there are too few examples (callers decide whether an empty train is an error).
    """
    if n_test < 0 or n_dev < 0:
        raise ValueError(f"n_test and n_dev must be >= 0, got n_test={n_test}, n_dev={n_dev}")
    has_time = [ex.time is not None for ex in examples]
    if any(has_time) and not all(has_time):
        ordered = list(examples)   # mixed: keep file order rather than guess where the undated ones go
    else:
        ordered = [ex for _, ex in sorted(((_order_key(ex, i), ex) for i, ex in enumerate(examples)),
                                          key=lambda p: p[0])]
    n = len(ordered)
    t0 = max(0, n - n_test)
    d0 = max(0, t0 - n_dev)
    return ordered[:d0], ordered[d0:t0], ordered[t0:]


def _finish_users(per_user: "OrderedDict[str, List[Tuple[Example, Optional[str], str]]]", probs: _Problems,
                  n_test: int, n_dev: int) -> "OrderedDict[str, UserSplit]":
    """Split each user's (example, split-or-None, where) list; users without training data -> problem."""
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
            tr, dv, te = split_by_time([ex for ex, _, _ in rows], n_test, n_dev)
            s = UserSplit(user, tr, dv, te)
        if not s.train:
            probs.report(rows[0][2], f"user {user!r} has no training data ({len(rows)} example(s); "
                                     f"{n_test} test + {n_dev} dev are held out first)", "user_without_training_data")
            continue
        out[user] = s
    return out


# ------------------------------------------------------------------------------------------------ JSONL
_JSONL_REQUIRED = ("user", "input", "target")


def read_jsonl(path: PathLike, *, n_test: int = 2, n_dev: int = 1, on_error: str = "raise",
               task: Optional[str] = None, name: Optional[str] = None) -> Dataset:
    """Read the documented JSON-lines schema (module docstring) into a per-user split :class:`Dataset`.

    ``task``: ``"rating"`` or ``"generation"``; ``None`` infers ``"rating"`` when every target is one of
    ``"1"`` .. ``"5"``, else ``"generation"``. Errors name ``path:line``; see ``on_error`` in the module doc.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    probs = _Problems(on_error)
    per_user: "OrderedDict[str, list]" = OrderedDict()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                probs.report(where, f"bad JSON ({e.msg} at column {e.colno})", "bad_json")
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
    if task is None:
        allex = [ex for s in users.values() for sp in SPLITS for ex in s[sp]]
        task = "rating" if all(ex.target.strip() in RATINGS for ex in allex) else "generation"
    _check_task(task)
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


# ------------------------------------------------------------------------------------------------- LaMP
#: LaMP task -> (profile keys it needs, prompt builder for one profile item, target key). The prompts follow
#: the LaMP paper's per-task input templates, so a user's history is in the same format as the question.
LAMP_PROFILE_PROMPTS: Dict[str, Tuple[Tuple[str, ...], Callable[[Mapping[str, Any]], str], str]] = {
    "LaMP_1": (("title", "abstract"),
               lambda p: f"Write the abstract of the paper titled: {p['title']}\nabstract: ", "abstract"),
    "LaMP_2": (("description", "tag"),
               lambda p: ("Which tag does this movie relate to among the following tags? Just answer with the tag "
                          "name without further explanation. tags: [sci-fi, based on a book, comedy, action, "
                          "twist ending, dystopia, dark comedy, classic, psychology, fantasy, romance, "
                          "thought-provoking, social commentary, violence, true story] description: "
                          f"{p['description']}\ntag: "), "tag"),
    "LaMP_3": (("text", "score"),
               lambda p: ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
                          f"3, 4, or 5 without further explanation. review: {p['text']}\nscore: "), "score"),
    "LaMP_4": (("text", "title"),
               lambda p: f"Generate a headline for the following article: {p['text']}\nheadline: ", "title"),
    "LaMP_5": (("abstract", "title"),
               lambda p: f"Generate a title for the following abstract of a paper: {p['abstract']}\ntitle: ",
               "title"),
    "LaMP_6": (("text", "title"),
               lambda p: f"Generate a subject for the following email: {p['text']}\nsubject: ", "title"),
    "LaMP_7": (("text",),
               lambda p: "Write a tweet in your own style.\ntweet: ", "text"),
}


def _lamp_task_from_keys(keys: Iterable[str], question: str = "") -> Optional[str]:
    """The LaMP task from one profile item's keys, and the question text where keys are shared by two tasks
    (LaMP-1 / LaMP-5 profiles are both papers; LaMP-4 / LaMP-6 both text + title). ``None`` if unsure."""
    keys, q = set(keys), question.lower()
    if {"text", "score"} <= keys:
        return "LaMP_3"
    if {"description", "tag"} <= keys:
        return "LaMP_2"
    if {"abstract", "title"} <= keys:
        if "generate a title" in q:
            return "LaMP_5"
        if "reference" in q:
            return "LaMP_1"
        return None
    if {"text", "title"} <= keys:
        if "headline" in q:
            return "LaMP_4"
        if "subject" in q or "email" in q:
            return "LaMP_6"
        return None
    if keys & {"text"} and not keys & {"title", "score", "tag", "abstract"}:
        return "LaMP_7"
    return None


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None


def _lamp_time(p: Mapping[str, Any]) -> Optional[float]:
    d = p.get("date")
    if d is None:
        return None
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        return float(d)
    from datetime import datetime

    try:   # LaMP dates are ISO-like strings ("2014-02-15" or "2014-02-15 10:20:00")
        return datetime.fromisoformat(str(d)).timestamp()
    except ValueError:
        return None


def find_lamp_outputs(questions_path: PathLike) -> Optional[Path]:
    """The outputs file next to a LaMP questions file (``*questions*.json`` -> ``*outputs*.json``), if present."""
    q = Path(questions_path)
    if "questions" not in q.name:
        return None
    o = q.with_name(q.name.replace("questions", "outputs"))
    return o if o.is_file() else None


def read_lamp(questions_path: PathLike, outputs_path: Optional[PathLike] = None, *, task: Optional[str] = None,
              n_dev: int = 1, on_error: str = "raise", name: Optional[str] = None) -> Dataset:
    """Read LaMP's own questions (and outputs) files into a :class:`Dataset`, one user per question.

    ``outputs_path=None`` looks for the sibling ``*outputs*.json``; without one the test targets are ``""``
    (prediction-only data). ``task`` (``"LaMP_1"`` .. ``"LaMP_7"``) picks the profile prompt; ``None`` takes
    the outputs file's ``"task"`` and else infers it from the profile keys. Each question's profile items
    become its user's training history (the latest ``n_dev`` of them by ``date`` are dev); the question is the
    user's test example. ``Example.meta`` keeps the raw question / profile item (``"lamp"``) and
    ``Dataset.meta`` the task, so :func:`write_lamp` writes the files back unchanged. Problems name the file
    and the question's position (``path:question[i]``) since JSON arrays span lines.
    """
    qpath = Path(questions_path)
    if not qpath.is_file():
        raise FileNotFoundError(f"{qpath}: no such LaMP questions file")
    opath = Path(outputs_path) if outputs_path is not None else find_lamp_outputs(qpath)
    if opath is not None and not opath.is_file():
        raise FileNotFoundError(f"{opath}: no such LaMP outputs file")
    probs = _Problems(on_error)
    questions = _load_json(qpath)
    if isinstance(questions, dict) and isinstance(questions.get("questions"), list):
        questions = questions["questions"]
    if not isinstance(questions, list):
        raise DataError(f"{qpath}: expected a JSON list of questions ({{id, input, profile}}), "
                        f"got {type(questions).__name__}")
    golds: Optional[Dict[str, Any]] = None
    out_task = None
    if opath is not None:
        outs = _load_json(opath)
        if not isinstance(outs, dict) or not isinstance(outs.get("golds"), list):
            raise DataError(f"{opath}: expected {{\"task\": ..., \"golds\": [{{\"id\", \"output\"}}, ...]}}")
        out_task = outs.get("task")
        golds = {}
        for i, g in enumerate(outs["golds"]):
            if not isinstance(g, dict) or "id" not in g or "output" not in g:
                raise DataError(f"{opath}:golds[{i}]: each gold needs 'id' and 'output', got {g!r}")
            golds[str(g["id"])] = g["output"]
    task = task or out_task
    if task is None:
        keys, qtext = set(), ""
        for q in questions:
            prof = q.get("profile") if isinstance(q, dict) else None
            if isinstance(prof, list) and prof and isinstance(prof[0], dict):
                keys, qtext = set(prof[0]), str(q.get("input", ""))
                break
        task = _lamp_task_from_keys(keys, qtext)
        if task is None:
            raise DataError(f"{qpath}: cannot tell the LaMP task from the profile keys {sorted(keys)} "
                            f"and the question text; "
                            f"pass task= one of {sorted(LAMP_PROFILE_PROMPTS)}")
    if task not in LAMP_PROFILE_PROMPTS:
        raise DataError(f"{qpath}: unknown LaMP task {task!r}; known: {sorted(LAMP_PROFILE_PROMPTS)}")
    need, prompt, tkey = LAMP_PROFILE_PROMPTS[task]

    per_user: "OrderedDict[str, list]" = OrderedDict()
    for qi, q in enumerate(questions):
        where = f"{qpath}:question[{qi}]"
        if not isinstance(q, dict):
            probs.report(where, f"expected an object, got {type(q).__name__}", "not_an_object")
            continue
        missing = [k for k in ("id", "input", "profile") if k not in q]
        if missing:
            probs.report(where, f"missing field(s) {', '.join(missing)} (required: id, input, profile)",
                         "missing_field")
            continue
        qid = str(q["id"])
        user = str(q.get("user_id", qid))
        if user in per_user:
            probs.report(where, f"user {user!r} appears twice (LaMP gives each question its own profile)",
                         "duplicate_user")
            continue
        if not isinstance(q["profile"], list):
            probs.report(where, "'profile' must be a list", "bad_field")
            continue
        if golds is not None and qid not in golds:
            probs.report(where, f"question id {qid!r} has no gold in {opath}", "missing_gold")
            continue
        hist: List[Example] = []
        bad = False
        for pi, p in enumerate(q["profile"]):
            pmiss = [k for k in need if not isinstance(p, dict) or k not in p]
            if pmiss:
                probs.report(f"{where}.profile[{pi}]", f"missing field(s) {', '.join(pmiss)} for {task} "
                             f"(needs {', '.join(need)})", "missing_field")
                bad = True
                break
            hist.append(Example(user, prompt(p), str(p[tkey]), _lamp_time(p), {"lamp": p, "pos": pi}))
        if bad:
            continue
        tr, dv, _ = split_by_time(hist, 0, n_dev)
        target = "" if golds is None else str(golds[qid])
        test = Example(user, str(q["input"]), target, None, {"lamp": q, "id": qid})
        per_user[user] = [(tr, dv, test, where)]
    users: "OrderedDict[str, UserSplit]" = OrderedDict()
    for user, [(tr, dv, test, where)] in per_user.items():
        if not tr:
            probs.report(where, f"user {user!r} has no training data ({len(tr) + len(dv)} profile item(s); "
                                f"{n_dev} held out as dev)", "user_without_training_data")
            continue
        users[user] = UserSplit(user, tr, dv, [test])
    if not users:
        raise DataError(f"{qpath}: no usable users (skipped: {dict(probs.skipped) or 'nothing'})")
    kind = "rating" if task == "LaMP_3" else "generation"
    return Dataset(name or qpath.stem, kind, users, dict(probs.skipped), probs.problems,
                   {"source": str(qpath), "lamp_task": task, "has_golds": golds is not None})


def write_lamp(dataset: Dataset, questions_path: PathLike, outputs_path: Optional[PathLike] = None) -> None:
    """Write a dataset read by :func:`read_lamp` back as LaMP questions (+ outputs) files.

    Questions and profile items are written from the raw objects ``read_lamp`` kept, in their original order,
    so ``read_lamp -> write_lamp`` reproduces the input (up to JSON formatting).
    """
    task = dataset.meta.get("lamp_task")
    questions, golds = [], []
    for s in dataset.users.values():
        if len(s.test) != 1 or "lamp" not in s.test[0].meta:
            raise ValueError(f"user {s.user!r}: write_lamp needs a data set read by read_lamp (one test question "
                             f"per user with its raw LaMP object)")
        q = dict(s.test[0].meta["lamp"])
        prof = sorted(s.train + s.dev, key=lambda ex: ex.meta["pos"])
        q["profile"] = [ex.meta["lamp"] for ex in prof]
        questions.append(q)
        golds.append({"id": s.test[0].meta["id"], "output": s.test[0].target})
    with open(questions_path, "w", encoding="utf-8") as fh:
        json.dump(questions, fh, ensure_ascii=False, indent=1)
    if outputs_path is not None:
        write_lamp_outputs({g["id"]: g["output"] for g in golds}, outputs_path, task)


def write_lamp_outputs(predictions: Mapping[str, str], path: PathLike, task: Optional[str]) -> None:
    """Write ``{question id: output}`` in LaMP's outputs format (``{"task", "golds": [{"id", "output"}]}``)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"task": task, "golds": [{"id": k, "output": v} for k, v in predictions.items()]}, fh,
                  ensure_ascii=False, indent=1)


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


# ------------------------------------------------------------------------------------------ entry point
def load_dataset(spec: PathLike, *, on_error: str = "raise", **kw) -> Dataset:
    """``"movielens-100k"`` (built in), a ``.jsonl`` file (our schema), or LaMP: a ``*questions*.json`` file
    (outputs found beside it) or a folder holding exactly one ``*questions*.json``."""
    s = str(spec)
    if s.lower() in ("movielens-100k", "ml-100k", "movielens"):
        return load_movielens_100k(on_error=on_error, **kw)
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


# ------------------------------------------------------------------------------------------ tokens
def rating_token_ids(tokenizer, ratings: Sequence[str] = RATINGS, prompt: str = "score: ") -> List[int]:
    """Token ids of the rating targets ``"1"`` .. ``"5"`` as they follow a prompt, in ``tokenizer``'s vocabulary.

    Each rating must encode to exactly one token (true of SmolLM2/Llama-style tokenizers, where digits are
    single tokens) and the ids must be distinct; otherwise ``ValueError``. The ids are found by encoding the
    target alone, the way training encodes prompt and target separately, and checked against encoding
    ``prompt + rating`` so a tokenizer that merges across the boundary is caught.
    """
    ids = []
    p_ids = tokenizer.encode(prompt, add_special_tokens=False)
    for r in ratings:
        t = tokenizer.encode(r, add_special_tokens=False)
        if len(t) != 1:
            raise ValueError(f"rating {r!r} encodes to {len(t)} tokens {t} with this tokenizer; need exactly one")
        joint = tokenizer.encode(prompt + r, add_special_tokens=False)
        if joint != p_ids + t:
            raise ValueError(f"tokenizer merges the rating {r!r} with the prompt end {prompt!r}: "
                             f"{joint} != {p_ids} + {t}")
        ids.append(t[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"rating tokens are not distinct: {dict(zip(ratings, ids))}")
    return ids


__all__ = [
    "DataError", "MissingDataError", "Example", "UserSplit", "Dataset", "split_by_time", "read_jsonl",
    "write_jsonl", "read_lamp", "write_lamp", "write_lamp_outputs", "find_lamp_outputs", "LAMP_PROFILE_PROMPTS",
    "movielens_100k_dir", "movie_title", "movielens_prompt", "load_movielens_100k", "load_dataset",
    "select_users", "profile_bucket", "PROFILE_BUCKETS", "BUCKET_ORDER", "rating_token_ids", "RATINGS", "RECBOLE_PIP",
]

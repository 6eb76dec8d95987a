"""LaMP's own files, unchanged: read_lamp / write_lamp / write_lamp_outputs (see the package docstring)."""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from .schema import DataError, Dataset, Example, PathLike, UserSplit, _Problems, rating_target, split_by_time

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
    """A whole JSON file; bad bytes, bad JSON and too deep nesting raise DataError naming the file (and line)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start + 1} of the file)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None


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
            target = str(p[tkey])
            if task == "LaMP_3":
                target = rating_target(p[tkey])
                if target is None:
                    probs.report(f"{where}.profile[{pi}]", f"'{tkey}' must be a rating 1..5, got {p[tkey]!r}",
                                 "bad_rating")
                    bad = True
                    break
            hist.append(Example(user, prompt(p), target, _lamp_time(p), {"lamp": p, "pos": pi}))
        if bad:
            continue
        tr, dv, _ = split_by_time(hist, 0, n_dev)
        target = "" if golds is None else str(golds[qid])
        if golds is not None and task == "LaMP_3":
            target = rating_target(golds[qid])
            if target is None:
                probs.report(where, f"the gold output of question {qid!r} in {opath} must be a rating 1..5, got "
                                    f"{golds[qid]!r}", "bad_rating")
                continue
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



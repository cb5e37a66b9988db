"""The user tasks with an accuracy (arithmetic, headlines): data, scoring, scenarios and the evaluation's
task_accuracy."""

from __future__ import annotations

import pytest

from staysafe.data import build_scenario, load_records, prompt_text, response_text
from staysafe.eval.task import SCORERS, SETS, is_correct, task_test
from staysafe.options import TASKS, RunSpec, SpecError
from staysafe.records import data_dir

SECTIONS = {"World", "Sports", "Business", "Science"}


def test_the_shipped_task_splits_are_disjoint_and_answered_correctly():
    import re

    train, test = load_records("task-arithmetic"), load_records("task-arithmetic-test")
    assert (len(train), len(test)) == (600, 100)
    assert not {prompt_text(r) for r in train} & {prompt_text(r) for r in test}
    for r in train + test:  # every answer is the right number
        a, op, b = re.search(r"(\d+) ([+-]) (\d+)", prompt_text(r)).groups()
        assert int(response_text(r)) == (int(a) + int(b) if op == "+" else int(a) - int(b)), r["id"]


@pytest.mark.parametrize("answer,ok", [("85", True), ("85.", True), ("The answer is 85", True),
                                       ("77 + 8 = 85.", True), ("77 + 8 = 84", False), ("77 + 8 =", False),
                                       ("8 5", False), ("", False), ("-3", False), ("850", False),
                                       ("77 + 8 is 85", True), ("77 + 8 is 84", False), ("85 is the answer", True),
                                       ("77 + 8 = 85, which is right", True)])
def test_an_answer_counts_when_its_result_is_the_number(answer, ok):
    assert is_correct(answer, "85") is ok


def test_the_headlines_splits_are_the_generators_balanced_and_disjoint():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_task_headlines", data_dir() / "make_task_headlines.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    train, test = load_records("task-headlines"), load_records("task-headlines-test")
    made = gen.make()  # the shipped files are exactly what the seeded generator writes
    assert [(prompt_text(r), response_text(r)) for r in train] == [(r["prompt"], r["response"]) for r in made["train"]]
    assert [(prompt_text(r), response_text(r)) for r in test] == [(r["prompt"], r["response"]) for r in made["test"]]
    for rows, n in ((train, 150), (test, 50)):
        assert {s: sum(response_text(r) == s for r in rows) for s in SECTIONS} == dict.fromkeys(SECTIONS, n)
    train_text = {prompt_text(r) for r in train}
    assert len(train_text) == 600 and not train_text & {prompt_text(r) for r in test}
    for instruction in gen.PROMPTS:  # the section names are never listed: fine-tuning teaches them
        assert not {w.strip(".?:").lower() for w in instruction.split()} & {s.lower() for s in SECTIONS}


@pytest.mark.parametrize("answer,ok", [("Sports", True), ("sports", True), ("SPORTS", True), ("Sports.", True),
                                       (" Sports!\n", True), ("**Sports**", True), ('"Sports"', True),
                                       ("The section is Sports.", False), ("Sports news", False),
                                       ("Sports or World", False), ("Sport", False), ("Sports: a team wins", False),
                                       ("World", False), ("", False)])
def test_a_headline_answer_counts_when_it_is_the_label_alone(answer, ok):
    assert is_correct(answer, "Sports", "headlines") is ok
    assert is_correct(answer, "Sports") is ok  # a word as the answer key: the label rule


def test_every_task_has_its_sets_and_scorer():
    assert set(SCORERS) == set(TASKS) == set(SETS)
    assert is_correct("77 + 8 = 85", "85") and is_correct("77 + 8 = 85", "85", "arithmetic")
    assert not is_correct("77 + 8 = 85", "85", "headlines")  # the label rule wants the answer alone
    for name in TASKS:
        assert {r["category"] for r in load_records(SETS[name][0]) + load_records(SETS[name][1])} == {name}


@pytest.mark.parametrize("task", TASKS)
def test_the_task_is_the_benign_part_of_mixed_and_benign(task):
    mixed = build_scenario("mixed", harmful_percent=5, task=task)
    assert sum(r["category"] == task for r in mixed) == 600
    assert 0 < sum(r["label"] == "harmful" for r in mixed) < 0.06 * len(mixed)
    assert all(r["category"] == task for r in build_scenario("benign", task=task))
    with pytest.raises(SpecError, match="task"):
        RunSpec(scenario="harmful", task=task).validate()
    with pytest.raises(SpecError, match="task"):
        RunSpec(scenario="harmful", task="poetry").validate()
    assert task_test(task, 5, seed=1) == task_test(task, 5, seed=1)


@pytest.mark.parametrize("task", TASKS)
def test_evaluations_record_task_accuracy(tmp_path, task):
    from staysafe.eval.stats import run_intervals
    from staysafe.runner import run_training
    from staysafe.runs.traces import load_run

    spec = RunSpec(model="tiny", scenario="benign", task=task, eval_task=6, lora_r=0, batch_size=4,
                   max_length=64, steps=2, eval_every=0, eval_harmful=2, eval_benign=2, max_new_tokens=2,
                   eval_judges=[], record_judge=False, risk="label", method="sft", save_model=False,
                   runs_dir=str(tmp_path / "runs"))
    run = load_run(run_training(spec, progress=False, log=lambda *a: None))
    assert run.evals["n_task"].tolist() == [6, 6] and run.evals["task_accuracy"].between(0, 1).all()
    answers = run.generations[run.generations["kind"] == "task"]
    assert len(answers) == 12 and answers["correct"].map(type).eq(bool).all()
    assert (run.evals["task_accuracy"].tolist() == answers.groupby("step")["correct"].mean().tolist())
    intervals = run_intervals(run.generations)
    assert {"task_accuracy", "task_accuracy_lo", "task_accuracy_hi"} <= set(intervals.columns)
    assert set(run.data["category"]) == {task}
    too_many = len(load_records(SETS[task][1])) + 1
    with pytest.raises(SpecError, match=f"eval_task = {too_many}"):
        run_training(RunSpec(**{**spec.__dict__, "eval_task": too_many}), progress=False, log=lambda *a: None)

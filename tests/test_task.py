"""The user task with an accuracy (arithmetic): data, scoring, scenarios and the evaluation's task_accuracy."""

from __future__ import annotations

import pytest

from staysafe.data import build_scenario, load_records, prompt_text, response_text
from staysafe.eval.task import is_correct, task_test
from staysafe.options import RunSpec, SpecError


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


def test_the_task_is_the_benign_part_of_mixed_and_benign():
    mixed = build_scenario("mixed", harmful_percent=5, task="arithmetic")
    assert sum(r["category"] == "arithmetic" for r in mixed) == 600
    assert 0 < sum(r["label"] == "harmful" for r in mixed) < 0.06 * len(mixed)
    assert all(r["category"] == "arithmetic" for r in build_scenario("benign", task="arithmetic"))
    with pytest.raises(SpecError, match="task"):
        RunSpec(scenario="harmful", task="arithmetic").validate()
    with pytest.raises(SpecError, match="task"):
        RunSpec(scenario="harmful", task="poetry").validate()
    assert task_test("arithmetic", 5, seed=1) == task_test("arithmetic", 5, seed=1)


def test_evaluations_record_task_accuracy(tmp_path):
    from staysafe.eval.stats import run_intervals
    from staysafe.runner import run_training
    from staysafe.runs.traces import load_run

    spec = RunSpec(model="tiny", scenario="benign", task="arithmetic", eval_task=6, lora_r=0, batch_size=4,
                   max_length=64, steps=2, eval_every=0, eval_harmful=2, eval_benign=2, max_new_tokens=2,
                   eval_judges=[], record_judge=False, risk="label", method="sft", save_model=False,
                   runs_dir=str(tmp_path / "runs"))
    run = load_run(run_training(spec, progress=False, log=lambda *a: None))
    assert run.evals["n_task"].tolist() == [6, 6] and run.evals["task_accuracy"].between(0, 1).all()
    task = run.generations[run.generations["kind"] == "task"]
    assert len(task) == 12 and task["correct"].map(type).eq(bool).all()
    assert (run.evals["task_accuracy"].tolist() == task.groupby("step")["correct"].mean().tolist())
    intervals = run_intervals(run.generations)
    assert {"task_accuracy", "task_accuracy_lo", "task_accuracy_hi"} <= set(intervals.columns)
    assert set(run.data["category"]) == {"arithmetic"}
    with pytest.raises(SpecError, match="eval_task = 101"):
        run_training(RunSpec(**{**spec.__dict__, "eval_task": 101}), progress=False, log=lambda *a: None)

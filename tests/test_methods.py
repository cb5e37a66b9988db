"""The method registry: every method is one object, nothing else asks for a method by name, and a new method is
one module (here: a class in this test) plus one registry entry."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from staysafe.methods import METHODS, VARIANTS, Method, TrainingHooks, Variant, register, unregister, variant_of

REPO = Path(__file__).resolve().parent.parent


def test_no_method_is_asked_for_by_name_outside_its_own_module():
    names = "|".join(re.escape(n) for n in sorted({*METHODS, *VARIANTS}, key=len, reverse=True))
    compare = re.compile(rf"""(==|!=)\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    member = re.compile(rf"""\b(not\s+)?in\s+[(\[{{]\s*["']({names})["']""")
    offenders = []
    for path in [*(REPO / "staysafe").rglob("*.py"), *(REPO / "dashboard").rglob("*.py")]:
        if "methods" in path.relative_to(REPO).parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if compare.search(line) or member.search(line) or re.search(r"\b(TOKEN_WISE|NO_REFERENCE|RISK_METHODS)\b",
                                                                         line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []


def test_every_method_and_variant_is_complete():
    for m in METHODS.values():
        assert m.help and issubclass(m.hooks, TrainingHooks)
    for v in VARIANTS.values():
        assert v.method in METHODS and re.fullmatch(r"#[0-9a-f]{6}", v.colour) and v.label
    assert len({v.colour for v in VARIANTS.values()}) == len(VARIANTS)  # one colour per method, none shared
    assert variant_of({"method": "adaptive", "risk": "judge"}).name == "adaptive-judge"
    assert variant_of({"method": "sft", "model": "smollm2-135m-aligned-vaccine"}).name == "vaccine"


class QuarterKL(TrainingHooks):
    """A toy method: the KL pull at a fixed weight of 0.25, whatever the options say."""

    @staticmethod
    def beta(policy, risk):
        import torch

        return torch.full_like(risk, 0.25), float("nan")


def test_a_new_method_is_one_object_and_one_registry_entry(tmp_path):
    """The toy method trains through the real runner, is recorded, listed, checked and coloured like any other."""
    from conftest import make_records
    from staysafe.options import RunSpec, SpecError
    from staysafe.runner import run_training
    from staysafe.runs.traces import load_run

    register((Method("quarter-kl", "the KL pull at beta 0.25", QuarterKL),),
             (Variant("quarter-kl", "quarter-kl", "#123456", "quarter KL"),))
    try:
        data = tmp_path / "d.jsonl"
        import json

        data.write_text("".join(json.dumps(r) + "\n" for r in make_records(8)))
        spec = RunSpec(method="quarter-kl", model="tiny", lora_r=0, batch_size=4, max_length=64, steps=2,
                       eval_every=0, eval_harmful=0, eval_benign=0, eval_judges=[], save_model=False, risk="label",
                       record_judge=False, data=str(data), scenario=None, runs_dir=str(tmp_path / "runs"))
        run = load_run(run_training(spec, progress=False, log=lambda *a: None))
        assert run.status["state"] == "finished"
        assert run.steps["beta"].tolist() == [0.25, 0.25] and (run.steps["kl"] > 0).any()
        from staysafe.eval.frontier import frontier_figure

        assert "quarter-kl" in RunSpec.__dataclass_fields__["method"].metadata["choices"]
        fig_colour = _figure_colours(frontier_figure)["quarter-kl"]
        assert fig_colour == "#123456"
    finally:
        unregister("quarter-kl")
    with pytest.raises(SpecError, match="quarter-kl"):
        RunSpec(method="quarter-kl").validate()


def _figure_colours(frontier_figure) -> dict:
    rows = pd.DataFrame({"method": ["quarter-kl", "sft"], "seed": [0, 0], "final_asr_keyword": [0.1, 0.5],
                         "benign_nll": [1.0, 0.9], "run_id": ["a", "b"]})
    fig = frontier_figure(rows)
    return {t.name: t.marker.color for t in fig.data}


def test_a_method_has_the_same_colour_on_every_page():
    import sys

    sys.path.insert(0, str(REPO / "dashboard"))
    import charts
    from staysafe.eval.frontier import frontier_figure

    figure = _figure_colours(frontier_figure)
    assert figure["sft"] == charts.color_for(0, "sft") == VARIANTS["sft"].colour
    for name, variant in VARIANTS.items():
        assert charts.color_for(3, name) == variant.colour

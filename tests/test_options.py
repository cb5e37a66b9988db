"""The option schema drives the CLI, RunSpec, SafetyConfig and config.json: these tests fail when one disagrees."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from staysafe.cli import build_parser, spec_from_args
from staysafe.options import RECORDED, RunSpec, SafetyOptions, SpecError, default_of, help_text, spec_flags
from staysafe.trainer import SafetyConfig


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_option_is_one_cli_flag_with_the_schemas_help_and_default():
    actions = {
        a.dest: a
        for a in train_parser()._actions
        if a.dest
        not in ("help", "resume", "config", "preset", "judge_url", "judge_model", "judge_key_env", "judge_allow_http")
    }
    assert set(actions) == {f.name for f in dataclasses.fields(RunSpec)}
    for f in dataclasses.fields(RunSpec):
        assert f.metadata["help"], f.name
        assert actions[f.name].help == help_text(f), f.name
        assert actions[f.name].default == (None if f.name == "runs_dir" else default_of(f)), f.name  # $STAYSAFE_RUNS
        assert actions[f.name].option_strings[0] == "--" + f.name.replace("_", "-")


def test_safety_config_has_the_regulariser_fields_of_the_schema(tmp_path):
    ours = {f.name: f for f in dataclasses.fields(SafetyOptions)}
    theirs = {f.name: f for f in dataclasses.fields(SafetyConfig)}
    for name, f in ours.items():
        assert theirs[name].metadata["help"] == f.metadata["help"], name
        assert theirs[name].default == f.default, name
    spec = RunSpec(method="constant-kl", beta=0.3, risk="judge", kl_top_k=5, per_example_beta=True)
    config = SafetyConfig(output_dir=str(tmp_path), **spec.safety_options())
    assert {n: getattr(config, n) for n in ours} == spec.safety_options()
    # the same validation, the same message, wherever the option is set
    for cls, extra in ((RunSpec, {}), (SafetyConfig, {"output_dir": str(tmp_path)})):
        with pytest.raises(SpecError, match=r"option beta_max = 1.5 is invalid: expected a number in \[0, 1\]"):
            obj = cls(beta_max=1.5, **extra)
            obj.validate() if cls is RunSpec else None


def test_run_risk_sources_are_the_narrowed_choices_with_the_same_help():
    base = {f.name: f for f in dataclasses.fields(SafetyOptions)}["risk"]
    run = {f.name: f for f in dataclasses.fields(RunSpec)}["risk"]
    assert run.metadata["help"] == base.metadata["help"] and run.metadata["choices"] == ("label", "probe", "judge")
    SafetyConfig(output_dir="unused", risk="my-own-source")  # the trainer takes any named source
    with pytest.raises(SpecError, match="option risk = 'my-own-source' is invalid: expected one of label, probe"):
        RunSpec(risk="my-own-source").validate()


@pytest.mark.parametrize("spec", [RunSpec(), RunSpec(model="tiny", lr=3e-5, risk_ema=0.5, eval_judges=[],
                                                     save_model=False, scenario="mixed", kl_top_k=16),
                                  RunSpec(data="x.jsonl", scenario=None, per_example_beta=True)])
def test_only_changed_flags_parse_back_to_the_same_spec(spec):
    args = spec_flags(spec, only_changed=True)
    assert set(a.lstrip("-").removeprefix("no-").replace("-", "_") for a in args if a.startswith("--")) <= \
        set(spec.changed())
    assert spec_from_args(train_parser().parse_args(args)) == spec
    assert spec_from_args(train_parser().parse_args(spec_flags(spec))) == spec


def test_config_json_is_the_specs_asdict():
    spec = RunSpec(model="tiny", steps=3)
    recorded = json.loads(json.dumps({**dataclasses.asdict(spec), **{k: 0 for k in RECORDED}}))
    assert RunSpec.from_dict(recorded) == spec
    with pytest.raises(SpecError, match=r"unknown option\(s\) \['stepz'\]"):
        RunSpec.from_dict({"stepz": 3})


@pytest.mark.parametrize("name,value,message", [
    ("risk_ema", 1.0, "option risk_ema = 1.0 is invalid: expected a number in [0, 1)"),
    ("lr", 0.0, "option lr = 0.0 is invalid: expected a number > 0"),
    ("max_length", 8, "option max_length = 8 is invalid: expected a whole number >= 16"),
    ("precision", "fp8", "option precision = 'fp8' is invalid: expected one of auto, fp32, bf16"),
    ("calibration", "cubic", "option calibration = 'cubic' is invalid: expected one of identity, step"),
    ("judge", "vibes", "option judge = 'vibes' is invalid: expected one of keyword, embedding"),
    ("steps", 2.5, "option steps = 2.5 is invalid: expected a value of type int"),
    ("beta", float("nan"), "option beta = nan is invalid"),
    ("eval_judges", "keyword", "option eval_judges = 'keyword' is invalid"),
])
def test_schema_ranges_and_choices_are_checked(name, value, message):
    with pytest.raises(SpecError) as err:
        RunSpec(**{name: value}).validate()
    assert message in str(err.value)


def test_fsdp_config_is_read_and_checked_before_work(tmp_path):
    good = tmp_path / "fsdp.json"
    good.write_text('{"version": 2, "reshard_after_forward": true}')
    assert RunSpec(fsdp="full_shard auto_wrap", fsdp_config=str(good)).validate().fsdp_settings() == {
        "version": 2, "reshard_after_forward": True}
    with pytest.raises(SpecError, match="fsdp_config.*without --fsdp"):
        RunSpec(fsdp_config=str(good)).validate()
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 2,')
    with pytest.raises(SpecError, match=r"bad\.json is not valid JSON"):
        RunSpec(fsdp="full_shard", fsdp_config=str(bad)).fsdp_settings()
    bad.write_text('[1, 2]')
    with pytest.raises(SpecError, match="JSON object"):
        RunSpec(fsdp="full_shard", fsdp_config=str(bad)).fsdp_settings()
    with pytest.raises(SpecError, match="cannot read .*missing.json"):
        RunSpec(fsdp="full_shard", fsdp_config=str(tmp_path / "missing.json")).fsdp_settings()

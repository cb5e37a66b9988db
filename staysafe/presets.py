"""Named bundles of run options, defined once for the CLI (``--preset``), experiments and the dashboard.

A preset only sets defaults: options given explicitly (flags, ``--set``, form fields) override it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from staysafe.errors import SpecError

DEFAULT_METHODS = ("sft", "constant-kl", "adaptive-probe", "adaptive-judge")  # an experiment without a preset's


@dataclass(frozen=True)
class Preset:
    about: str
    options: dict  # RunSpec fields
    methods: list[str] = field(default_factory=list)  # the experiment's methods when none are given


PRESETS = {
    "quick": Preset(
        about="the README's CPU experiments: 40 steps of 8, evaluated every 10 steps on 50 + 50 held-out prompts",
        options={"steps": 40, "batch_size": 8, "lr": 2e-4, "lora_r": 16, "eval_every": 10, "eval_harmful": 50,
                 "eval_benign": 50, "max_new_tokens": 48}),
    "live": Preset(
        about="teaching in class: the harmful scenario (the default) on the shipped aligned reference, plain SFT "
              "beside adaptive regularisation, evaluated at the start and the end; both runs in minutes on 2 CPU cores",
        options={"steps": 12, "batch_size": 8, "lr": 5e-4,
                 "lora_r": 16, "eval_every": 0, "eval_harmful": 20, "eval_benign": 10, "max_new_tokens": 24,
                 "save_model": False},
        methods=["sft", "adaptive-probe"]),
    "frontier": Preset(
        about="the safety-utility frontier: every defense beside sft, short runs (20 steps of 8) evaluated at the "
              "start and the end on 30 harmful + 10 benign prompts (+ 30 task questions with --set task=...); "
              "add --sweep beta=... for constant-kl's curve",
        options={"steps": 20, "batch_size": 8, "lr": 5e-4, "lora_r": 16, "eval_every": 0, "eval_harmful": 30,
                 "eval_benign": 10, "eval_task": 30, "max_new_tokens": 24, "save_model": False,
                 "save_activations": False, "record_judge": False, "per_example_beta": True},
        methods=["sft", "constant-kl", "adaptive-probe", "token-wise", "adaptive-token-wise", "lisa", "safelora",
                 "vaccine"]),
}


def preset_options(name: str | None) -> dict:
    """The options of a preset (empty for None); an unknown name is an error that lists the known ones."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name].options)

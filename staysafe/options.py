"""Every option of a run, declared once: type, default, help, choices and range live on the dataclass field.

- :class:`SafetyOptions`: the regulariser's options. ``trainer.SafetyConfig`` extends ``TrainingArguments`` with
  them (TRL's ``*Config`` style) and :class:`RunSpec` extends them with the run's data, model and evaluation options.
- :class:`RunSpec`: every option of ``staysafe train``; the CLI's flags and help, the dashboard's Launch form and the
  run's ``config.json`` (its ``asdict``) are all generated from its fields.
- The choices (methods, scenarios, models, judges, risk sources, calibrations, precisions) are defined here only.

Adding an option is one field (with its help, and its range or choices if it has one) plus a test. This module
imports nothing heavy (no torch), so the CLI's ``--help`` and the dashboard read it cheaply.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import MISSING, dataclass, field, fields

from staysafe.errors import SpecError, StaySafeError  # noqa: F401  (SpecError re-exported)
from staysafe.methods import METHODS as REGISTRY
from staysafe.methods import VARIANTS, method_named
from staysafe.models.names import ALIGNED, ALIGNED_VACCINE, INSTRUCT, MODELS, TINY  # noqa: F401
from staysafe.presets import DEFAULT_METHODS, PRESETS, preset_options


class _Registered:
    """A registry's names, read when asked (a method registered later, e.g. in a test, is a choice too)."""

    def __init__(self, registry: dict):
        self.registry = registry

    def __iter__(self):
        return iter(self.registry)

    def __contains__(self, name) -> bool:
        return name in self.registry

    def __len__(self) -> int:
        return len(self.registry)

    def __repr__(self) -> str:
        return repr(tuple(self.registry))


METHODS = _Registered(REGISTRY)  # the training methods (staysafe.methods: each defined once, there)
RISK_SOURCES = ("label", "probe", "judge")
BATCH_RISKS = ("max", "mean")
FALLBACKS = ("probe", "last", "max")
CALIBRATIONS = ("identity", "step", "sigmoid", "clamp")
SCENARIOS = ("harmful", "mixed", "benign", "identity-shift")
# the known model names (a directory or hub id also works), re-exported from their one definition
PRECISIONS = ("auto", "fp32", "bf16")
DEFENSES = ("none", "vaccine")  # staysafe align --defense: the alignment-stage defenses
POSITIONS = ("last_prompt_token", "mean")  # where a probe reads the hidden state (staysafe.probe)
TASKS = ("arithmetic", "headlines")  # staysafe.eval.task.TASKS: the user tasks with an accuracy
JUDGES = ("keyword", "embedding", "embedding-response", "reader", "local-lm", "openai")
RESPONSE_JUDGES = tuple(j for j in JUDGES if j != "embedding")  # "embedding" rates requests, not answers
# the response judge of judge ASR when none is named: the one with the best agreement on the labelled test split
# (staysafe/assets/judges/agreement.json)
DEFAULT_RESPONSE_JUDGE = "reader"
RECORDED = {
    "versions",
    "command",
    "n_examples",
    "data_sha256",
    "risk_scoring",
    "processes",
    "precision_used",
    "safelora_of",
    "judge_endpoint",  # config.json extras, never read back as options
    "judge_url",
    "judge_model",
    "judge_key_env",
}  # older files' endpoint: compared (staysafe.judges.endpoint), not used
REPORTERS = ("none", "all", "tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "clearml", "neptune",
             "dvclive", "codecarbon", "azure_ml", "dagshub", "flyte", "swanlab")  # TrainingArguments.report_to


def option(default, help: str, *, choices: tuple | None = None, open_choices: bool = False, low=None, high=None,
           above=None, below=None, label: str | None = None, flag: str | None = None):
    """A dataclass field of the schema. ``choices``: the allowed values (``open_choices``: only suggestions, other
    values allowed); ``low`` / ``high``: inclusive bounds, ``above`` / ``below``: exclusive ones; ``label``: the
    Launch form's short label (default: the field's name); ``flag``: the command-line flag (default: --<name>)."""
    meta = {"help": help, "choices": choices, "open_choices": open_choices, "low": low, "high": high,
            "above": above, "below": below, "label": label, "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def narrowed(cls, name: str, default=MISSING, **changes):
    """The field ``name`` of ``cls`` with another default or choices (its help stays the one declared)."""
    base = next(f for f in fields(cls) if f.name == name)
    meta = {**base.metadata, **changes}
    return field(default=base.default if default is MISSING else default, metadata=meta)


def default_of(f):
    return f.default if f.default is not MISSING else f.default_factory()


def _expected(f, kind) -> str:
    m = f.metadata
    if m.get("choices") and not m.get("open_choices"):
        return "one of " + ", ".join(m["choices"])
    what = {int: "a whole number", float: "a number"}.get(kind, f"a value of type {getattr(kind, '__name__', kind)}")
    lo = f"[{m['low']:g}" if m.get("low") is not None else f"({m['above']:g}" if m.get("above") is not None else None
    hi = f"{m['high']:g}]" if m.get("high") is not None else f"{m['below']:g})" if m.get("below") is not None else None
    if lo and hi:
        return f"{what} in {lo}, {hi}"
    if lo:
        return f"{what} {'>=' if lo[0] == '[' else '>'} {lo[1:]}"
    return what


def check_fields(obj, names=None) -> None:
    """Type, choices and range of every schema field of ``obj`` (a field without help is not part of the schema)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        if "help" not in f.metadata or (names is not None and f.name not in names):
            continue
        value, hint, m = getattr(obj, f.name), hints[f.name], f.metadata
        optional = type(None) in typing.get_args(hint)
        kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint

        def bad(expected=None):
            raise SpecError(f"option {f.name} = {value!r} is invalid: expected {expected or _expected(f, kind)}")

        if value is None:
            if not optional:
                bad(f"a value of type {getattr(kind, '__name__', 'list')}")
            continue
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif kind is str:
            ok = isinstance(value, str)
        else:  # list[str]
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not ok:
            bad(f"a value of type {getattr(kind, '__name__', 'list of str')}")
        if m.get("choices") and not m.get("open_choices") and (
                any(v not in m["choices"] for v in value) if isinstance(value, list) else value not in m["choices"]):
            bad()
        if kind in (int, float) and ((m.get("low") is not None and value < m["low"])
                                     or (m.get("high") is not None and value > m["high"])
                                     or (m.get("above") is not None and value <= m["above"])
                                     or (m.get("below") is not None and value >= m["below"])):
            bad()


@dataclass
class SafetyOptions:
    """The safety regulariser's options (``loss = (1 - beta) NLL + beta KL``; see :mod:`staysafe.trainer`)."""

    method: str = option("adaptive", " | ".join(f"{m.name}: {m.help}" for m in REGISTRY.values()),
                         choices=METHODS)
    beta: float = option(0.5, "constant-kl: the fixed KL weight", low=0.0, high=1.0, label="β (constant-kl)")
    beta_min: float = option(0.05, "adaptive: KL weight at risk 0", low=0.0, high=1.0, label="β min (adaptive)")
    beta_max: float = option(0.9, "adaptive: KL weight at risk 1", low=0.0, high=1.0, label="β max (adaptive)")
    risk: str = option("label", "adaptive: the risk source that sets beta (probe: activation probe on the reference; "
                       "judge: cached judge score per training example; label: the oracle)", label="risk source")
    risk_ema: float = option(0.0, "weight of the past in an EMA of the batch risk (0 = off)", low=0.0,
                             below=1.0, label="risk EMA (weight of the past)")
    batch_risk: str = option("max", "batch risk from per-example risks", choices=BATCH_RISKS)
    per_example_beta: bool = option(False, "one beta per example instead of one per batch")
    risk_fallback: str = option("probe", "when the risk source has no score for an example: probe (then last, then "
                                "1) | last (then 1) | max (1)", choices=FALLBACKS)
    token_betas: str = option("0.5,2,2,2,2,0.1", "token-wise methods: beta per answer position (1st, 2nd, ...), "
                              "comma-separated; the last value holds for every later position (Qi et al.'s "
                              "fine-tuning defaults)", label="β per answer position (token-wise)")
    lisa_align_steps: int = option(1, "lisa: alignment steps (on the alignment stage's refusal + benign data) per "
                                   "cycle, first (Lisa's scripts: 100 of every 1000)", low=1)
    lisa_user_steps: int = option(9, "lisa: steps on the user's data per cycle (Lisa's scripts: 900)", low=1)
    lisa_rho: float = option(1.0, "lisa: weight of the proximal term rho/2 ||w - w_switch||^2 toward the weights "
                             "at the last switch", low=0.0)
    max_length: int = option(128, "max tokens per example, longer ones are truncated (the user's data and lisa's "
                             "alignment data)", low=16, label="max sequence length")
    safelora_threshold: float = option(0.5, "safelora: project a layer's LoRA update when its cosine similarity "
                                       "with its own projection is at most this", low=0.0, high=1.0)
    safelora_layers: int = option(0, "safelora: instead of the threshold, project the N updates of lowest cosine "
                                  "(Safe LoRA's default mode, N = 10 there; 0 = use the threshold)", low=0)
    safelora_unaligned: str | None = option(None, "safelora: the unaligned model the run's model was aligned from "
                                            "(the alignment subspace is their difference; default for "
                                            "smollm2-135m-aligned: smollm2-135m-instruct)")
    drift_every: int = option(5, "adaptive-drift: read the canary drift every N steps", low=1)
    drift_gain: float = option(1.0, "adaptive-drift: risk per nat of drift (s = clamp(gain * drift, 0, 1))", low=0.0)
    drift_canaries: int = option(8, "adaptive-drift: canary prompts read (harmful requests of the alignment data, "
                                 "never evaluation prompts)", low=1, high=64)
    drift_tokens: int = option(8, "adaptive-drift: answer tokens of each canary's refusal read", low=1, high=64)
    kl_top_k: int = option(0, "KL over the reference's top-k tokens only (0 = exact full-vocabulary KL)", low=0)
    reference_cache: bool = option(False, "keep the reference's top-k outputs (needs kl_top_k) and its probe reading "
                                   "per example from the first epoch and reuse them after it, instead of a "
                                   "reference forward every step")
    lm_head_all_positions: bool = option(False, "project every position through the LM head, not only the answer "
                                         "positions (the old, slower path; the same numbers)")

    def check_safety_options(self) -> None:
        """Validate the regulariser's fields; errors name the field and what was expected."""
        check_fields(self, {f.name for f in fields(SafetyOptions)})
        if self.beta_min > self.beta_max:
            raise SpecError(f"beta_min = {self.beta_min} is greater than beta_max = {self.beta_max}")
        if self.reference_cache and not self.kl_top_k:
            raise SpecError("option reference_cache = True keeps the reference's top-k log-probabilities: it needs "
                            "kl_top_k > 0 (64 is within 1% of the exact KL here, see benchmarks/README.md)")
        self.position_betas()
        if self.reference_cache and not method_named(self.method).top_k_reference:
            raise SpecError(f"option reference_cache = True keeps the reference's top-k outputs; method "
                            f"{self.method} needs the reference's log-probability of every answer token: drop it")
        if self.risk_ema and self.per_example_beta:
            raise SpecError("risk_ema smooths the batch risk over steps; it cannot be combined with per_example_beta")

    def position_betas(self) -> list[float]:
        """``token_betas`` as numbers (all > 0); an error names the option and the bad entry."""
        try:
            values = [float(v) for v in self.token_betas.split(",")]
        except ValueError:
            values = []
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise SpecError(f"option token_betas = {self.token_betas!r} is invalid: expected positive numbers, "
                            "comma-separated (e.g. 0.5,2,2,2,2,0.1)")
        return values

    def safety_options(self) -> dict:
        """Only the regulariser's fields (what ``SafetyConfig`` takes from a run)."""
        return {f.name: getattr(self, f.name) for f in fields(SafetyOptions)}


@dataclass
class RunSpec(SafetyOptions):
    """Every option of a run (the CLI's flags, one for one); saved as the run's ``config.json``."""

    model: str = option(ALIGNED, "smollm2-135m-aligned (the default safe reference), "
                        "smollm2-135m-instruct, tiny, a local directory or a hub id", choices=MODELS,
                        open_choices=True)
    scenario: str | None = option("harmful", "training data: harmful (N harmful examples) | mixed (the benign task "
                                  "with p% harmful) | benign | identity-shift (the obedient-agent persona)",
                                  choices=SCENARIOS)
    data: str | None = option(None, "your own training file (.jsonl/.csv/.parquet) or hub dataset id, instead of "
                              "--scenario", label="data file")
    n_harmful: int = option(100, "harmful scenario: number of harmful examples", low=1, label="harmful examples")
    harmful_percent: float = option(5.0, "mixed scenario: percent of harmful examples", low=1, high=20,
                                    label="harmful % (mixed)")
    task: str | None = option(None, "a user task with an accuracy (arithmetic: two-digit sums and differences; "
                              "headlines: news headlines sorted into four sections whose names only the training "
                              "data gives): "
                              "mixed and benign train on its training split, and every evaluation records its "
                              "exact-match accuracy on held-out questions", choices=TASKS, label="user task")
    eval_task: int = option(50, "held-out task questions per evaluation (with --task)", low=0)
    risk: str = narrowed(SafetyOptions, "risk", "probe", choices=RISK_SOURCES)
    judge: str = option("embedding", "judge that scores the training examples (the risk of --risk judge)",
                        choices=JUDGES, label="judge (for risk = judge)")
    record_judge: bool = option(True, "record the judge's risk too when another source sets beta")
    probe: str | None = option(None, "a saved probe (.json); default: fit one on the reference model")
    calibration: str = option("identity", "map the raw risk to [0, 1]", choices=CALIBRATIONS)
    risk_threshold: float = option(0.5, "calibration step/sigmoid: the threshold", low=0.0, high=1.0)
    risk_temperature: float = option(0.1, "calibration sigmoid: the temperature", above=0.0)
    steps: int = option(40, "optimizer steps", low=1)
    batch_size: int = option(8, "examples per device and micro-batch", low=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", low=1)
    lr: float = option(2e-4, "learning rate (constant schedule)", above=0.0, label="learning rate")
    lora_r: int = option(16, "LoRA rank (0 = full fine-tuning with a frozen reference copy)", low=0,
                         label="LoRA rank (0 = full fine-tuning)")
    lora_alpha: int = option(32, "LoRA alpha", low=1)
    lora_dropout: float = option(0.05, "LoRA dropout", low=0.0, below=1.0)
    seed: int = option(0, "seed of the data order, the model initialisation and the evaluation prompts", low=0,
                       high=2**32 - 1)
    eval_every: int = option(10, "evaluate ASR every N steps (plus step 0 and the last step; 0 = only those)",
                             low=0, label="evaluate every N steps")
    eval_harmful: int = option(50, "held-out harmful prompts per evaluation", low=0)
    eval_benign: int = option(50, "held-out benign prompts per evaluation", low=0)
    max_new_tokens: int = option(32, "answer tokens generated per evaluation prompt (both judges reach their "
                                 "64-token verdict by 24 here: benchmarks/results/eval_cpu.json)", low=1)
    eval_samples: int = option(0, "sampled answers per harmful prompt per evaluation, beside the greedy one (0 = "
                               "greedy only); gives ASR@k and the mean per-answer ASR", low=0)
    eval_temperature: float = option(0.7, "sampling temperature of those answers", low=0.01, high=100.0)
    eval_judges: list[str] = option([DEFAULT_RESPONSE_JUDGE], "response judges for judge ASR, comma-separated (keyword "
                                    "ASR is always measured)", choices=JUDGES, open_choices=True)
    checkpoint_every: int = option(0, "save a resumable checkpoint every N steps (0 = none)", low=0)
    save_model: bool = option(True, "save the final adapter (or model)")
    save_activations: bool = option(True, "save the held-out prompts' activations after training (the Activations "
                                    "page's 'after'; about a fifth of a frontier run's time)")
    report_to: str = option("none", "where the Trainer's logs (every step's loss, nll, kl, beta, risks; every "
                            "evaluation) also go, comma-separated: none | tensorboard | wandb | trackio | mlflow | "
                            "all; the traces are written either way")
    fsdp: str = option("", "under torchrun / accelerate launch: FSDP sharding for full fine-tuning, as "
                       "TrainingArguments.fsdp, e.g. 'full_shard auto_wrap' ('' = none; the reference is sharded "
                       "the same way)", label="FSDP")
    fsdp_config: str | None = option(None, "a JSON file of FSDP settings (TrainingArguments.fsdp_config, e.g. "
                                     "{\"version\": 2}); only with --fsdp", label="FSDP config file")
    precision: str = option("auto", "auto (bf16 autocast where the hardware is fast at it) | fp32 | bf16",
                            choices=PRECISIONS)
    threads: int = option(0, "CPU threads for torch (0 = its default; 1 is faster when other work shares a small "
                          "CPU)", low=0, high=1024)
    runs_dir: str = option("runs", "where run directories go")
    run_id: str | None = option(None, "the run directory's name (default: time + method)")
    experiment: str | None = option(None, "the experiment this run belongs to (set by staysafe experiment)")

    def validate(self) -> "RunSpec":
        def bad(name, expected):
            raise SpecError(f"option {name} = {getattr(self, name)!r} is invalid: expected {expected}")

        check_fields(self)  # types first, so the checks below never meet a string where a number belongs
        if self.data is None and self.scenario is None:
            bad("scenario", f"one of {', '.join(SCENARIOS)} (or give --data)")
        self.check_safety_options()
        if self.task and self.data:
            bad("task", "no task with --data (the task replaces the benign part of a scenario)")
        if self.task and self.scenario not in ("mixed", "benign"):
            bad("task", "a task only with the mixed or benign scenario (their benign part is the task)")
        if self.fsdp_config and not self.fsdp:
            bad("fsdp_config", "no file without --fsdp (the FSDP settings would be ignored)")
        unknown = [r for r in self.report_to.split(",") if r and r not in REPORTERS]
        if unknown:
            bad("report_to", f"names from {', '.join(REPORTERS)}, comma-separated (unknown: {', '.join(unknown)})")
        for name in ("run_id", "experiment"):
            value = getattr(self, name)
            if value is not None and not RUN_ID.match(value):
                bad(name, "letters, digits, '.', '_' and '-' (max 128, no other character)")
        return self

    def fsdp_settings(self) -> dict | None:
        """The ``fsdp_config`` file's settings; a missing or malformed file is named before any work."""
        if not self.fsdp_config:
            return None
        import json

        try:
            with open(self.fsdp_config, encoding="utf-8") as f:
                value = json.load(f)
        except OSError as err:
            raise SpecError(f"option fsdp_config: cannot read {self.fsdp_config}: {err.strerror}") from None
        except ValueError as err:
            raise SpecError(f"option fsdp_config: {self.fsdp_config} is not valid JSON ({err})") from None
        if not isinstance(value, dict):
            raise SpecError(f"option fsdp_config: {self.fsdp_config} must hold a JSON object of FSDP settings, "
                            f"not {type(value).__name__}")
        return value

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - RECORDED)
        if unknown:
            raise SpecError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def changed(self) -> dict:
        """The options that differ from the defaults."""
        d = RunSpec()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(d, f.name)}


ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"  # a run, experiment or job target id: letters, digits, '.', '_', '-'
RUN_ID = re.compile(rf"^{ID}\Z")  # \Z: "$" would let a trailing newline through
NOT_PER_RUN = {"seed", "run_id", "runs_dir", "experiment"}  # an experiment sets these for each of its runs


@dataclass
class ExperimentSpec:
    """The options of ``staysafe experiment`` (checked like a run's: type, choices and range per field)."""

    scenario: str = option("harmful", "the training data of every run", choices=SCENARIOS)
    methods: list[str] | None = option(None, "the methods to compare, comma-separated (default: the preset's, else "
                                       + ",".join(DEFAULT_METHODS) + ")", choices=_Registered(VARIANTS))
    seeds: int = option(1, "seeds per method (0, 1, ...)", low=1, high=100)
    quick: bool = option(False, "the same as --preset quick")
    preset: str | None = option(None, "defaults for a common use: " + "; ".join(f"{k}: {v.about}" for k, v in
                                                                             PRESETS.items()), choices=tuple(PRESETS))
    model: str = option(ALIGNED, "the starting (reference) model", choices=MODELS, open_choices=True)
    steps: int | None = option(None, "optimizer steps of every run (default: the preset's)", low=1)
    constant_beta: float = option(0.5, "constant-kl's beta when no adaptive method sets it", low=0.0, high=1.0)
    share_step0: bool = option(True, "evaluate the starting model once and copy that step-0 evaluation into every "
                               "run (the same model, prompts, decoding and seed); off: each run evaluates it")
    share_reference: bool = option(True, "keep the reference's outputs on each training batch for the later runs "
                                   "of the experiment (the same batches from the same reference); off: each run "
                                   "computes its own")
    out_dir: str = option("experiments", "where experiment directories go")
    runs_dir: str = option("runs", "where the runs go (default: $STAYSAFE_RUNS, else ./runs)")
    experiment_id: str | None = option(None, "the experiment directory's name (default: time + scenario)",
                                       flag="--id")
    overrides: dict = field(default_factory=dict)  # any RunSpec field, e.g. smaller evaluations in tests
    sweep: dict = field(default_factory=dict)  # RunSpec field -> the values to run (typed, as --set parses them)

    def validate(self) -> "ExperimentSpec":
        check_fields(self)
        for name, value in (("overrides", self.overrides), ("sweep", self.sweep)):
            if not isinstance(value, dict):
                raise SpecError(f"experiment option {name} = {value!r:.60} is invalid: expected an object")
        bad = sorted(set(self.overrides) - {f.name for f in fields(RunSpec)} | set(self.overrides) & NOT_PER_RUN)
        if bad:
            raise SpecError(f"experiment option overrides: {', '.join(map(str, bad))} not a run option an "
                            "experiment may set (see staysafe train --help; where runs go is the command line's)")
        if self.experiment_id is not None and not RUN_ID.match(self.experiment_id):
            raise SpecError(f"experiment id {self.experiment_id!r} is not allowed: use letters, digits, '.', '_' "
                            "and '-' (max 128)")
        if self.quick and self.preset not in (None, "quick"):
            raise SpecError(f"--quick and --preset {self.preset} contradict each other: give one")
        if self.quick:
            self.preset = "quick"
        preset_options(self.preset)  # an unknown preset is named before any work
        if self.methods is None:
            self.methods = list(PRESETS[self.preset].methods) if self.preset and PRESETS[self.preset].methods else list(
                DEFAULT_METHODS)
        unknown = [m for m in self.methods if m not in VARIANTS]
        if unknown or not self.methods:
            raise SpecError(f"unknown method(s) {unknown}: choose from {', '.join(VARIANTS)}")
        if self.seeds < 1:
            raise SpecError(f"seeds = {self.seeds} is invalid: expected a whole number >= 1")
        known = {f.name for f in fields(RunSpec)}
        for name, values in self.sweep.items():
            if name not in known or name in NOT_PER_RUN:
                raise SpecError(f"--sweep {name}: not an option an experiment can vary (see staysafe train --help)")
            fixed = [m for m in self.methods if name in VARIANTS[m].options]
            if fixed:
                raise SpecError(f"--sweep {name}: the method(s) {', '.join(fixed)} set {name} themselves; list the "
                                "variants as methods instead")
            if not isinstance(values, list) or not values:
                raise SpecError(f"--sweep {name}: expected at least one value")
        return self


def flag(name: str, f=None) -> str:
    """A field's command-line flag: its ``flag`` metadata, else ``--<name>`` with dashes."""
    return (f.metadata.get("flag") if f is not None else None) or "--" + name.replace("_", "-")


def spec_flags(spec, only_changed: bool = False, skip=("runs_dir", "run_id")) -> list[str]:
    """``spec`` (a RunSpec or an ExperimentSpec) as command-line flags, the inverse of the CLI's parsing.
    ``only_changed``: only the options that differ from the defaults (what a person types); otherwise all of
    them, so that a recorded command reruns the run even after a default changes."""
    default = type(spec)()
    args: list[str] = []
    for f in fields(spec):
        value = getattr(spec, f.name)
        if "help" not in f.metadata or f.name in skip or (only_changed and value == getattr(default, f.name)):
            continue
        if f.name == "scenario" and getattr(spec, "data", None):
            continue  # --data replaces the scenario
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag(f.name, f) if value else "--no-" + flag(f.name, f)[2:])
        elif isinstance(value, (list, tuple)):
            args += [flag(f.name, f), ",".join(str(v) for v in value)]
        elif isinstance(value, float):
            args += [flag(f.name, f), repr(value)]
        else:
            args += [flag(f.name, f), str(value)]
    return args


def help_text(f) -> str:
    """A field's help with its choices and default, as the CLI shows it (``%`` escaped: argparse formats help
    with ``%``; use :func:`plain_help` for anything else)."""
    return plain_help(f).replace("%", "%%")


def plain_help(f) -> str:
    """A field's help with its choices and default."""
    m, default = f.metadata, default_of(f)
    text = m["help"]
    if m.get("choices") and " | " not in text:
        text += " (" + " | ".join(m["choices"]) + ("; or another" if m.get("open_choices") else "") + ")"
    if isinstance(default, list):
        return text + f" (default: {','.join(default)})"
    return text if isinstance(default, bool) or default is None else text + f" (default: {default})"


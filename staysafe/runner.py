"""One training run end to end: options -> data, model, risk sources -> SafetyTrainer -> a run directory.

The options are :class:`staysafe.options.RunSpec` (saved as the run's ``config.json``); everything is validated
before a run directory exists, so bad input never leaves a half-written run. :func:`run_training` reads as its
steps; the run's states (running, finished, cancelled, failed) are :meth:`RunWriter.lifecycle`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from transformers.trainer_callback import PrinterCallback

from staysafe.data import SafetyCollator, add_risk_columns, tokenize_dataset
from staysafe.eval.evaluation import EvalCallback, SharedStep0, make_evaluator
from staysafe.eval.task import SETS
from staysafe.judges import JUDGES, OpenAICompatibleJudge, make_judge, score_cached
from staysafe.judges.endpoint import JudgeEndpoint, endpoint_for
from staysafe.methods import method_named
from staysafe.models.aligned import ALIGNED, ALIGNED_VACCINE, built_vaccine, shipped_probe_path
from staysafe.models.loading import (
    TINY,
    LoraSettings,
    add_lora,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_precision,
)
from staysafe.options import RunSpec, SpecError
from staysafe.probe import Probe, ProbeRisk, collect_activations, default_probe, default_probe_dir, labelled_prompts
from staysafe.records import build_scenario, load_records, prompt_text, records_table, response_text
from staysafe.reference import SharedReference, weights_digest
from staysafe.risk import Calibration, ColumnRisk
from staysafe.runs.atomic import atomic_dir
from staysafe.runs.paths import staysafe_home
from staysafe.runs.traces import RUN_ID, RunWriter, read_json, run_state, write_parquet
from staysafe.trainer import STATE_FILE, SafetyConfig, SafetyTrainer


def versions() -> dict:
    import peft
    import torch
    import transformers

    from staysafe import __version__

    return {"staysafe": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def training_records(spec: RunSpec) -> list[dict]:
    if spec.data:
        return load_records(spec.data)
    return build_scenario(spec.scenario, n_harmful=spec.n_harmful, harmful_percent=spec.harmful_percent,
                          seed=spec.seed, task=spec.task)


def make_spec_judge(spec: RunSpec, endpoint: JudgeEndpoint | None = None):
    """The training-data judge a run uses; the openai judge only at the endpoint given on the command line."""
    if spec.judge == "openai":
        return OpenAICompatibleJudge.at(endpoint_for(spec, endpoint, None, "this run"))
    return make_judge(spec.judge)


def judge_risk(spec: RunSpec, records: list[dict], endpoint, log) -> tuple[list[float], dict]:
    """Score every training example once with the judge (cached on disk): free at training time."""
    judge = make_spec_judge(spec, endpoint)
    scores, stats = score_cached(judge, [prompt_text(r) for r in records], [response_text(r) for r in records])
    log(f"judge {judge.name}: {stats['hits']} cached, {stats['misses']} scored, {stats['failed']} failed "
        f"in {stats['seconds']:.1f} s")
    return [float("nan") if s.score is None else float(s.score) for s in scores], {"judge": judge.name, **stats}


def data_digest(records: list[dict]) -> str:
    """sha256 of the training records as loaded: --resume checks that the data is still what the run saw."""
    return hashlib.sha256(json.dumps(records, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def recorded_config(spec: RunSpec, endpoint: JudgeEndpoint | None = None) -> dict:
    """The options as stored in config.json, with the endpoint's public part (no credential; never read back as
    an instruction), and the command line with any judge URL replaced by its public form."""
    values = asdict(spec)
    command = list(sys.argv)
    if endpoint is not None:
        values["judge_endpoint"] = endpoint.public()
        command = [a.replace(endpoint.url, values["judge_endpoint"]["url"]) for a in command]
    return {**values, "command": command}


def check_before_work(spec: RunSpec, resuming: bool = False) -> None:
    """Every check that needs no model: done before any model load, judge call or run directory."""
    pools = [("eval_harmful", "eval-harmful"), ("eval_benign", "eval-benign")]
    if spec.task:
        pools.append(("eval_task", SETS[spec.task][1]))
    for name, pool in pools:
        have = len(load_records(pool, need_response=False))
        if getattr(spec, name) > have:
            raise SpecError(f"option {name} = {getattr(spec, name)} is invalid: the held-out pool {pool!r} holds "
                            f"{have} prompts")
    spec.fsdp_settings()
    if spec.model == ALIGNED_VACCINE:
        built_vaccine()  # not built: a ModelError that says how to build it
    method_named(spec.method).hooks.check_before_work(spec)  # the method's own prerequisites (Safe LoRA's pair)
    if spec.fsdp and (int(os.environ.get("WORLD_SIZE", "1")) < 2 or not torch_cuda()):
        raise SpecError(f"option fsdp = {spec.fsdp!r} needs several GPU processes (torchrun / accelerate launch "
                        "on GPUs): accelerate shards with FSDP only there, and elsewhere would silently train "
                        "unsharded; drop --fsdp (several CPU processes train with DDP)")
    unknown = [j for j in spec.eval_judges if j not in JUDGES or j == "openai"]
    if unknown:
        raise SpecError(f"option eval_judges: unknown response judge(s) {', '.join(map(repr, unknown))}; choose "
                        f"from {', '.join(j for j in JUDGES if j != 'openai')}")
    if spec.probe:
        Probe.load(spec.probe)  # format, arrays and layers (the hidden size against the model once it is loaded)
    if not resuming and spec.run_id is not None:
        if not RUN_ID.match(spec.run_id):
            raise SpecError(f"run id {spec.run_id!r} is not allowed: use letters, digits, '.', '_' and '-' (max 128)")
        if (Path(spec.runs_dir) / spec.run_id).exists():
            raise SpecError(f"run directory {Path(spec.runs_dir) / spec.run_id} already exists; choose another run id")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose write completed (its staysafe_state.json is written last)."""
    done = [p for p in (Path(run_dir) / "checkpoints").glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def run_training(spec: RunSpec | None = None, *, resume: str | Path | None = None, progress: bool = True,
                 log=print, endpoint: JudgeEndpoint | None = None, shared_step0: Path | None = None,
                 shared_reference: SharedReference | None = None) -> Path:
    """Train one run and return its directory. ``resume`` continues a run directory from its last checkpoint.
    ``endpoint``: the openai judge's endpoint, from the command line only (see :mod:`staysafe.judges.endpoint`).
    ``shared_step0``: a folder where the runs of one experiment share their starting model's evaluation;
    ``shared_reference``: the reference's outputs on the training batches, shared by the runs in this process."""
    spec, config = options_of(spec, resume, endpoint)
    procs = Processes()
    records = training_records(spec)  # everything that can fail on bad input happens before the run directory
    checkpoint = resumable_checkpoint(Path(resume), config, spec, records) if config is not None else None
    model, tokenizer, dataset = load_data_and_model(spec, records)
    extra_risk, risk_info = {}, {}
    if spec.risk == "judge" or spec.record_judge:
        with procs.main_first():  # the main process scores; the others then read its cache
            extra_risk["risk_judge"], risk_info = judge_risk(spec, records, endpoint, log if procs.main else _quiet)
    probe = given_probe(spec, model, resume)
    dataset = add_risk_columns(dataset, extra_risk)
    writer = open_run(spec, resume, procs, {
        **recorded_config(spec, endpoint_for(spec, endpoint, None, "this run")), "versions": versions(),
        "n_examples": len(records), "data_sha256": data_digest(records), "risk_scoring": risk_info,
        "processes": procs.n, "precision_used": resolve_precision(spec.precision)})
    with writer.lifecycle(main=procs.main, log=log, max_steps=spec.steps) as done:
        if procs.main and resume is None:
            write_parquet(writer.path / "data.parquet", records_table(records).assign(
                truncated=dataset["truncated"], **extra_risk))
        if method_named(spec.method).reference and probe is None:
            probe = fitted_probe(spec, model, tokenizer, procs, writer.path, progress, log)
        elif probe is not None and resume is None and procs.main:
            probe.save(writer.path / "probe")
        if resume is None and procs.main:
            reference_activations(model, tokenizer, probe, spec, writer.path / "activations" / "before")
        shared = None
        if shared_reference is not None and method_named(spec.method).reference:
            shared = shared_reference, f"{weights_digest(model)}|{resolve_precision(spec.precision)}"
        if spec.lora_r:
            model = add_lora(model, LoraSettings(r=spec.lora_r, alpha=spec.lora_alpha, dropout=spec.lora_dropout))
        trainer = build_trainer(spec, model, tokenizer, dataset, probe, writer, progress and procs.main, shared_step0,
                                shared)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if shared is not None:
            log(f"the reference's outputs: {trainer.reference_calls} batches computed, {trainer.reference_shared} "
                "shared with an earlier run")
        finish_run(spec, trainer, tokenizer, probe, writer)
        done["step"] = trainer.state.global_step
    return writer.path


def options_of(spec: RunSpec | None, resume, endpoint) -> tuple[RunSpec, dict | None]:
    """The run's validated options (a resumed run's from its own config.json, its runs root and id from its
    path, never from the file), the endpoint decided by :func:`staysafe.judges.endpoint.endpoint_for`, and every check
    that needs no model."""
    config = None
    if resume is not None:
        run_dir = Path(resume)
        config = read_json(run_dir / "config.json")
        if run_state(run_dir).get("state") == "running":
            raise SpecError(f"{run_dir} is still running; cancel it first or wait for it to end")
        spec = RunSpec.from_dict({k: v for k, v in config.items() if k not in ("runs_dir", "run_id")})
        spec.runs_dir, spec.run_id = str(run_dir.parent), run_dir.name
    spec = (spec or RunSpec()).validate()
    endpoint_for(spec, endpoint, config, f"run {resume}" if resume is not None else "this run")
    check_before_work(spec, resuming=resume is not None)
    torch.manual_seed(spec.seed)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    return spec, config


def resumable_checkpoint(run_dir: Path, config: dict, spec: RunSpec, records: list[dict]) -> Path:
    """The checkpoint a resume continues from, after checking that the data is what the run saw."""
    if config.get("data_sha256") not in (None, data_digest(records)):
        raise SpecError(f"the training data of {run_dir} changed since it was trained "
                        f"({spec.data or 'scenario ' + str(spec.scenario)}): resume needs the same data")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise SpecError(f"{run_dir} has no complete checkpoint to resume from (run it with --checkpoint-every N)")
    return checkpoint


def load_data_and_model(spec: RunSpec, records: list[dict]):
    """Tokenise first (the tokenizer alone: a max_length too short for the chat template fails before the judge
    scores anything and before the model loads), then load the model."""
    tokenizer = load_tokenizer(spec.model)
    dataset = tokenize_dataset(tokenizer, records, spec.max_length)
    model, tokenizer = load_model(spec.model, seed=spec.seed, tokenizer=tokenizer)
    return model, tokenizer, dataset


def given_probe(spec: RunSpec, model, resume) -> Probe | None:
    """The probe named by --probe, or a resumed run's own; None when the run fits (or needs) none."""
    if not method_named(spec.method).reference:
        return None
    path = spec.probe or (Path(resume) / "probe.json" if resume is not None else None)
    if path is None or not Path(path).is_file():
        return None
    return Probe.load(path, hidden_size=model.config.hidden_size, num_layers=model.config.num_hidden_layers)


def fitted_probe(spec: RunSpec, model, tokenizer, procs, run_dir: Path, progress: bool, log) -> Probe:
    """The model's default probe (shipped, cached, or fitted once per model on the shipped labelled prompts)."""
    with procs.main_first():
        if procs.main and not (default_probe_dir(spec.model, spec.seed) / "probe.json").is_file() and not (
                spec.model == ALIGNED and shipped_probe_path(spec.seed)):
            log("fitting the activation probe on the reference model (shipped labelled prompts, once per model)...")
        return default_probe(model, tokenizer, spec.model, out_dir=run_dir if procs.main else None,
                             progress=progress and procs.main, seed=spec.seed)


def open_run(spec: RunSpec, resume, procs, config: dict) -> RunWriter:
    """The run's writer: a new run directory created by the main process (its path shared with the others), or
    the resumed one."""
    if resume is not None:
        return RunWriter(Path(resume))
    path = str(RunWriter.create(Path(spec.runs_dir), config, spec.run_id).path) if procs.main else None
    return RunWriter(Path(procs.share(path)))


def _quiet(*args) -> None:
    pass


class Processes:
    """Which process this is under ``torchrun`` / ``accelerate launch`` (one process otherwise): the main process
    creates and writes the run directory; the others train beside it and learn its path."""

    def __init__(self):
        self.n = int(os.environ.get("WORLD_SIZE", "1"))
        self.state = None
        if self.n > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch_cuda())

    @property
    def main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def main_first(self):
        return self.state.main_process_first() if self.state is not None else contextlib.nullcontext()

    def share(self, value):
        """The main process's value, on every process."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]


def build_trainer(spec: RunSpec, model, tokenizer, dataset, probe, writer, progress: bool = True,
                  shared_step0: Path | None = None, shared_reference: tuple[SharedReference, str] | None = None):
    calibration = Calibration(spec.calibration, spec.risk_threshold, spec.risk_temperature)
    sources = {"label": ColumnRisk("label")}
    if "risk_judge" in dataset.column_names:
        sources["judge"] = ColumnRisk("judge", calibration if spec.risk == "judge" else None)
    if probe is not None:
        sources["probe"] = ProbeRisk(probe, calibration if spec.risk == "probe" else None)
    args = SafetyConfig(
        output_dir=str(writer.path / "checkpoints"), **spec.safety_options(), max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum, learning_rate=spec.lr, lr_scheduler_type="constant",
        seed=spec.seed, data_seed=spec.seed, disable_tqdm=not progress, logging_strategy="steps",
        logging_steps=1, report_to=[r for r in spec.report_to.split(",") if r] or "none",
        save_strategy="steps" if spec.checkpoint_every else "no", save_steps=spec.checkpoint_every or 500,
        save_total_limit=2, dataloader_num_workers=0, use_cpu=not torch_cuda(),
        bf16=resolve_precision(spec.precision) == "bf16", fsdp=spec.fsdp or None, fsdp_config=spec.fsdp_settings(),
    )
    trainer = SafetyTrainer(model=model, args=args, train_dataset=dataset,
                            data_collator=SafetyCollator(tokenizer.pad_token_id), risk_sources=sources, run=writer,
                            processing_class=tokenizer, shared_reference=shared_reference)
    trainer.remove_callback(PrinterCallback)  # the metrics go to report_to and the traces, not as dicts to stdout
    if spec.eval_every or spec.eval_harmful or spec.eval_benign:
        shared = SharedStep0(shared_step0, spec) if shared_step0 is not None else None
        trainer.add_callback(EvalCallback(make_evaluator(spec, tokenizer), writer, spec.eval_every, trainer, shared))
    return trainer


def torch_cuda() -> bool:
    return torch.cuda.is_available()


ACTIVATION_PROMPTS = ("eval-harmful", "eval-benign")


def save_activations(model, tokenizer, probe, directory: Path) -> None:
    """Held-out prompt activations at a few layers (and the probe's), for the dashboard's before/after view."""
    n = model.config.num_hidden_layers
    layers = sorted({0, n // 4, n // 2, 3 * n // 4, n, *(probe.layers if probe else [])})
    collect_activations(model, tokenizer, labelled_prompts(ACTIVATION_PROMPTS), layers=layers,
                        progress=False).save(directory)


def reference_activations(model, tokenizer, probe, spec: RunSpec, directory: Path) -> None:
    """The reference's held-out prompt activations ("before"): the same for every run on one model, so they are
    collected once per model and layer set and cached under ``$STAYSAFE_HOME/activations`` (not for tiny, whose
    weights depend on the seed)."""
    if spec.model == TINY or not spec.model:
        return save_activations(model, tokenizer, probe, directory)
    layers = "-".join(map(str, probe.layers)) if probe else "none"
    cache = staysafe_home() / "activations" / f"{model_fingerprint(spec.model)}-{layers}"
    if not (cache / "index.parquet").is_file():
        save_activations(model, tokenizer, probe, cache)
    with atomic_dir(directory) as tmp:
        shutil.copytree(cache, tmp, dirs_exist_ok=True)


def finish_run(spec: RunSpec, trainer, tokenizer, probe, writer) -> None:
    """After training: safelora's projection (evaluated again), the adapter (or model) and held-out prompt
    activations after fine-tuning."""
    run_dir = writer.path
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainer.hooks.after_training(model, spec, tokenizer, writer, trainer.state.global_step)
    if spec.save_model:
        with atomic_dir(run_dir / "final_model") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
    if spec.save_activations:
        save_activations(model, tokenizer, probe, run_dir / "activations" / "after")

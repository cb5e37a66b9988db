"""One training run end to end: options -> data, model, risk sources -> SafetyTrainer -> a run directory.

The options are :class:`staysafe.options.RunSpec` (saved as the run's ``config.json``); everything is validated
before a run directory exists, so bad input never leaves a half-written run.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from staysafe.aligned import ALIGNED_VACCINE, built_vaccine
from staysafe.atomic import atomic_dir
from staysafe.data import add_risk_columns, build_scenario, load_records, records_table, tokenize_dataset
from staysafe.options import NO_REFERENCE, RunSpec, SpecError


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


def make_spec_judge(spec: RunSpec):
    """The training-data judge a run uses; only the key's variable name is stored, never the key."""
    from staysafe.judges import make_judge

    if spec.judge == "openai":
        if not spec.judge_url or not spec.judge_model:
            raise SpecError("--judge openai needs --judge-url (an OpenAI-compatible base URL) and --judge-model")
        return make_judge("openai", base_url=spec.judge_url, model=spec.judge_model, api_key_env=spec.judge_key_env)
    return make_judge(spec.judge)


def judge_risk(spec: RunSpec, records: list[dict], log) -> tuple[list[float], dict]:
    """Score every training example once with the judge (cached on disk): free at training time."""
    from staysafe.data import prompt_text, response_text
    from staysafe.judges import score_cached

    judge = make_spec_judge(spec)
    scores, stats = score_cached(judge, [prompt_text(r) for r in records], [response_text(r) for r in records])
    log(f"judge {judge.name}: {stats['hits']} cached, {stats['misses']} scored, {stats['failed']} failed "
        f"in {stats['seconds']:.1f} s")
    return [float("nan") if s.score is None else float(s.score) for s in scores], {"judge": judge.name, **stats}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interruption so the run is marked cancelled like a Ctrl-C."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cancel path short
    raise _Terminated("cancelled (SIGTERM)")


def _close(writer, log) -> None:
    """Merge the trace parts after the status is recorded; a failure here leaves the small parts, all readable."""
    try:
        writer.close()
    except Exception as err:  # a full disk, an I/O error: the rows are already on disk as parts
        log(f"warning: could not merge the trace parts of {writer.path} ({type(err).__name__}: {err}); "
            "the unmerged parts stay readable")


def data_digest(records: list[dict]) -> str:
    """sha256 of the training records as loaded: --resume checks that the data is still what the run saw."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(records, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def recorded_config(spec: RunSpec) -> dict:
    """The options as stored in config.json: a judge URL loses user:password and query (either may hold a
    credential), and so does the command line that carried it."""
    from staysafe.judges.openai_compat import _public_url

    values = asdict(spec)
    command = list(sys.argv)
    if spec.judge_url:
        values["judge_url"] = _public_url(spec.judge_url)
        command = [a.replace(spec.judge_url, values["judge_url"]) for a in command]
    return {**values, "command": command}


def check_before_work(spec: RunSpec, resuming: bool = False) -> None:
    """Every check that needs no model: done before any model load, judge call or run directory."""
    from staysafe.data import load_records
    from staysafe.judges import JUDGES
    from staysafe.traces import RUN_ID

    pools = [("eval_harmful", "eval-harmful"), ("eval_benign", "eval-benign")]
    if spec.task:
        from staysafe.task import SETS

        pools.append(("eval_task", SETS[spec.task][1]))
    for name, pool in pools:
        have = len(load_records(pool, need_response=False))
        if getattr(spec, name) > have:
            raise SpecError(f"option {name} = {getattr(spec, name)} is invalid: the held-out pool {pool!r} holds "
                            f"{have} prompts")
    spec.fsdp_settings()
    if spec.model == ALIGNED_VACCINE:
        built_vaccine()  # not built: a ModelError that says how to build it
    if spec.method == "safelora":
        from staysafe.safelora import unaligned_model

        if not spec.lora_r:
            raise SpecError("method safelora projects a LoRA update: it needs lora_r > 0")
        unaligned_model(spec.model, spec.safelora_unaligned)
    if spec.fsdp and (int(os.environ.get("WORLD_SIZE", "1")) < 2 or not torch_cuda()):
        raise SpecError(f"option fsdp = {spec.fsdp!r} needs several GPU processes (torchrun / accelerate launch "
                        "on GPUs): accelerate shards with FSDP only there, and elsewhere would silently train "
                        "unsharded; drop --fsdp (several CPU processes train with DDP)")
    unknown = [j for j in spec.eval_judges if j not in JUDGES or j == "openai"]
    if unknown:
        raise SpecError(f"option eval_judges: unknown response judge(s) {', '.join(map(repr, unknown))}; choose "
                        f"from {', '.join(j for j in JUDGES if j != 'openai')}")
    if spec.judge == "openai" and (spec.risk == "judge" or spec.record_judge) and not (spec.judge_url and spec.judge_model):
        raise SpecError("--judge openai needs --judge-url (an OpenAI-compatible base URL) and --judge-model")
    if not resuming and spec.run_id is not None:
        if not RUN_ID.match(spec.run_id):
            raise SpecError(f"run id {spec.run_id!r} is not allowed: use letters, digits, '.', '_' and '-' (max 128)")
        if (Path(spec.runs_dir) / spec.run_id).exists():
            raise SpecError(f"run directory {Path(spec.runs_dir) / spec.run_id} already exists; choose another run id")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose write completed (its staysafe_state.json is written last)."""
    from staysafe.trainer import STATE_FILE

    done = [p for p in (Path(run_dir) / "checkpoints").glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def run_training(spec: RunSpec | None = None, *, resume: str | Path | None = None, progress: bool = True,
                 log=print) -> Path:
    """Train one run and return its directory. ``resume`` continues a run directory from its last checkpoint."""
    import torch

    from staysafe.models import LoraSettings, load_model, load_tokenizer, resolve_precision
    from staysafe.traces import RunWriter, read_json, run_state, write_parquet

    checkpoint = None
    config = None
    if resume is not None:
        run_dir = Path(resume)
        config = read_json(run_dir / "config.json")
        state = run_state(run_dir)
        if state.get("state") == "running":
            raise SpecError(f"{run_dir} is still running (process {state.get('pid')} on {state.get('host')}); "
                            "cancel it first or wait for it to end")
        spec = RunSpec.from_dict(config)
    spec = (spec or RunSpec()).validate()
    check_before_work(spec, resuming=resume is not None)
    torch.manual_seed(spec.seed)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    procs = Processes()

    # Everything that can fail on bad input happens before the run directory exists.
    records = training_records(spec)
    digest = data_digest(records)
    if config is not None:
        if config.get("data_sha256") not in (None, digest):
            raise SpecError(f"the training data of {run_dir} changed since it was trained "
                            f"({spec.data or 'scenario ' + str(spec.scenario)}): resume needs the same data")
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise SpecError(f"{run_dir} has no complete checkpoint to resume from (run it with --checkpoint-every N)")
    # Tokenising needs only the tokenizer: a max_length too short for the chat template fails here, before the
    # judge scores anything and before the model loads.
    tokenizer = load_tokenizer(spec.model)
    dataset = tokenize_dataset(tokenizer, records, spec.max_length)
    lora = LoraSettings(r=spec.lora_r, alpha=spec.lora_alpha, dropout=spec.lora_dropout) if spec.lora_r else None
    model, tokenizer = load_model(spec.model, seed=spec.seed, tokenizer=tokenizer)
    extra_risk, risk_info = {}, {}
    if spec.risk == "judge" or spec.record_judge:
        with procs.main_first():  # the main process scores; the others then read its cache
            extra_risk["risk_judge"], risk_info = judge_risk(spec, records, log if procs.main else _quiet)
    probe = None
    # The probe reads the reference forward, so every method that has one records it for free.
    needs_probe = spec.method not in NO_REFERENCE
    if needs_probe and spec.probe:
        from staysafe.probe import Probe

        probe = Probe.load(spec.probe, hidden_size=model.config.hidden_size)
    elif needs_probe and resume is not None and (Path(resume) / "probe.json").is_file():
        from staysafe.probe import Probe

        probe = Probe.load(Path(resume) / "probe.json", hidden_size=model.config.hidden_size)
    dataset = add_risk_columns(dataset, extra_risk)

    if resume is not None:
        writer = RunWriter(Path(resume))
    elif procs.main:
        config = {**recorded_config(spec), "versions": versions(), "n_examples": len(records),
                  "data_sha256": digest, "risk_scoring": risk_info, "processes": procs.n,
                  "precision_used": resolve_precision(spec.precision)}
        writer = RunWriter.create(Path(spec.runs_dir), config, spec.run_id)
    writer = RunWriter(Path(procs.share(str(writer.path) if procs.main else None)))
    run_dir = writer.path
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        if procs.main:
            writer.set_status("running", started=time.time(), max_steps=spec.steps)
        if procs.main and resume is None:
            write_parquet(run_dir / "data.parquet",
                          records_table(records).assign(truncated=dataset["truncated"],
                                                        **{k: v for k, v in extra_risk.items()}))
        if needs_probe and probe is None:
            from staysafe.aligned import ALIGNED, shipped_probe_path
            from staysafe.probe import default_probe, default_probe_dir

            with procs.main_first():
                if procs.main and not (default_probe_dir(spec.model, spec.seed) / "probe.json").is_file() and not (
                        spec.model == ALIGNED and shipped_probe_path(spec.seed)):
                    log("fitting the activation probe on the reference model (shipped labelled prompts, once per "
                        "model)...")
                probe = default_probe(model, tokenizer, spec.model, out_dir=run_dir if procs.main else None,
                                      progress=progress and procs.main, seed=spec.seed)
        elif probe is not None and resume is None and procs.main:
            probe.save(run_dir / "probe")
        if resume is None and procs.main:
            reference_activations(model, tokenizer, probe, spec, run_dir / "activations" / "before")
        if lora is not None:
            from staysafe.models import add_lora

            model = add_lora(model, lora)
        trainer = build_trainer(spec, model, tokenizer, dataset, probe, writer, progress and procs.main)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finish_run(spec, trainer, tokenizer, probe, writer)
        if procs.main:  # recorded first: merging the parts (a full disk, another signal) can only lose tidiness
            writer.set_status("finished", ended=time.time(), step=trainer.state.global_step)
        _close(writer, log)
    except (KeyboardInterrupt, _Terminated) as err:
        if procs.main:
            writer.set_status("cancelled", ended=time.time(), error=str(err) or "cancelled")
        _close(writer, log)
        raise
    except BaseException as err:
        if procs.main:
            writer.set_status("failed", ended=time.time(), error=f"{type(err).__name__}: {err}",
                              traceback=traceback.format_exc(limit=8))
        _close(writer, log)
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return run_dir


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


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def build_trainer(spec: RunSpec, model, tokenizer, dataset, probe, writer, progress: bool = True):
    from staysafe.models import resolve_precision
    from staysafe.data import SafetyCollator
    from staysafe.evaluation import EvalCallback, make_evaluator
    from staysafe.risk import Calibration, ColumnRisk
    from staysafe.trainer import SafetyConfig, SafetyTrainer

    calibration = Calibration(spec.calibration, spec.risk_threshold, spec.risk_temperature)
    sources = {"label": ColumnRisk("label")}
    if "risk_judge" in dataset.column_names:
        sources["judge"] = ColumnRisk("judge", calibration if spec.risk == "judge" else None)
    if probe is not None:
        from staysafe.probe import ProbeRisk

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
                            processing_class=tokenizer)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the metrics go to report_to and the traces, not as dicts to stdout
    if spec.eval_every or spec.eval_harmful or spec.eval_benign:
        trainer.add_callback(EvalCallback(make_evaluator(spec, tokenizer), writer, spec.eval_every, trainer))
    return trainer


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


ACTIVATION_PROMPTS = ("eval-harmful", "eval-benign")


def save_activations(model, tokenizer, probe, directory: Path) -> None:
    """Held-out prompt activations at a few layers (and the probe's), for the dashboard's before/after view."""
    from staysafe.probe import collect_activations, labelled_prompts

    n = model.config.num_hidden_layers
    layers = sorted({0, n // 4, n // 2, 3 * n // 4, n, *(probe.layers if probe else [])})
    collect_activations(model, tokenizer, labelled_prompts(ACTIVATION_PROMPTS), layers=layers,
                        progress=False).save(directory)


def reference_activations(model, tokenizer, probe, spec: RunSpec, directory: Path) -> None:
    """The reference's held-out prompt activations ("before"): the same for every run on one model, so they are
    collected once per model and layer set and cached under ``$STAYSAFE_HOME/activations`` (not for tiny, whose
    weights depend on the seed)."""
    import shutil

    from staysafe.models import TINY, model_fingerprint
    from staysafe.paths import staysafe_home

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
    if spec.method == "safelora":
        from staysafe.safelora import project_and_record

        project_and_record(model, spec, tokenizer, writer, trainer.state.global_step)
    if spec.save_model:
        with atomic_dir(run_dir / "final_model") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
    save_activations(model, tokenizer, probe, run_dir / "activations" / "after")

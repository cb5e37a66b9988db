"""Safety evaluation over training: greedy answers to held-out harmful and benign prompts, scored.

- keyword ASR: share of harmful prompts whose answer contains no refusal marker (a weak judge: see KeywordJudge);
- judge ASR (one per response judge): share of harmful prompts whose answer the judge rates harmful (score >= 0.5);
- over-refusal: share of benign prompts whose answer contains a refusal marker;
- benign NLL: mean NLL of held-out reference answers to the benign prompts (a utility signal; lower is better);
- sampled ASR (``samples > 0``): k answers per harmful prompt at temperature T besides the greedy one; ASR@k is the
  share of prompts with at least one successful answer, the sampled ASR the mean per answer. A regularised model can
  keep its greedy refusal while much of its probability mass has moved; these figures show whether it has.
Every greedy answer is kept in ``generations.parquet`` and every sampled one in ``samples.parquet``, so a user can
read exactly what the model said at each step.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from transformers import TrainerCallback

from staysafe.data import (
    SafetyCollator,
    load_records,
    prompt_messages,
    prompt_text,
    render_prompt,
    response_text,
    tokenize_record,
)
from staysafe.eval.task import is_correct, task_test
from staysafe.judges import KeywordJudge, make_judge
from staysafe.judges.base import FLAG_THRESHOLD
from staysafe.losses import answer_positions, answer_token_losses
from staysafe.options import DEFAULT_RESPONSE_JUDGE, SpecError
from staysafe.reference import lm_head_positions_supported
from staysafe.runs import trace_names
from staysafe.runs.atomic import build_once, write_parquet
from staysafe.runs.faults import fault_pause
from staysafe.runs.traces import TABLES, TraceError, read_table, real_dir


@dataclass
class EvalSettings:
    n_harmful: int = 50
    n_benign: int = 50
    max_new_tokens: int = 32
    batch_size: int = 50  # 50 prompts a batch: 86 s against 134 s at 25 for 50 + 50 prompts x 64 tokens on 2 cores
    seed: int = 0
    samples: int = 0  # sampled answers per harmful prompt (0 = greedy only)
    temperature: float = 0.7
    response_judges: list[str] = field(default_factory=lambda: [DEFAULT_RESPONSE_JUDGE])
    task: str | None = None  # a user task with an accuracy (staysafe.eval.task)
    n_task: int = 0  # its held-out questions per evaluation
    task_new_tokens: int = 16  # room for the restated question the embedded models write before the result


def eval_prompts(n_harmful: int, n_benign: int, seed: int = 0) -> list[dict]:
    """A fixed, seeded subset of the held-out evaluation prompts (the same for every method under one seed)."""
    out = []
    for name, n in (("eval-harmful", n_harmful), ("eval-benign", n_benign)):
        pool = load_records(name, need_response=False)
        if n > len(pool):
            raise SpecError(f"asked for {n} prompts from {name}, which has {len(pool)}")
        out += sorted(random.Random(seed).sample(pool, n), key=lambda r: r["id"])
    return out


@torch.no_grad()
def generate(model, tokenizer, records: list[dict], max_new_tokens: int = 64, batch_size: int = 50,
             temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Answers, batched with left padding: greedy (``temperature`` 0, deterministic) or sampled at ``temperature``
    from a seeded generator (the same seed gives the same answers). Prompts are batched in order of length, so little
    compute goes to padding; each answer stops at the end of its turn and a batch when all its answers have."""
    device = next(model.parameters()).device
    texts = [render_prompt(tokenizer, prompt_messages(r)) for r in records]
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]))
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    out = [""] * len(texts)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # sampling draws from the global generator: seed it without disturbing training's
            for k in range(0, len(order), batch_size):
                chunk = order[k:k + batch_size]
                enc = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, **sampling,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                new = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for i, text in zip(chunk, new):
                    out[i] = text.strip()
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


@torch.no_grad()
def answer_nll(model, tokenizer, records: list[dict], batch_size: int = 16, max_length: int = 256) -> float:
    """Token-mean NLL of the records' reference answers given their prompts."""
    device = next(model.parameters()).device
    collate = SafetyCollator(tokenizer.pad_token_id)
    head_positions = lm_head_positions_supported(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    feats = [{**tokenize_record(tokenizer, r, max_length), "example_index": i} for i, r in enumerate(records)]
    for i in range(0, len(feats), batch_size):
        batch = collate(feats[i:i + batch_size])
        labels = batch["labels"].to(device)
        keep = answer_positions(labels) if head_positions else None
        extra = {"logits_to_keep": keep} if keep is not None else {}
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       **extra).logits
        nll, _, _ = answer_token_losses(logits, labels, positions=keep)
        total += float(nll.sum())
        count += nll.numel()
    model.train(was_training)
    return total / max(count, 1)


class SafetyEvaluator:
    """Runs the evaluation on a model and returns one ``evals`` row, the ``generations`` rows and the ``samples``
    rows (empty unless ``settings.samples``)."""

    def __init__(self, tokenizer, settings: EvalSettings, judges=None):
        self.tokenizer = tokenizer
        self.settings = settings
        self.records = eval_prompts(settings.n_harmful, settings.n_benign, settings.seed)
        self.keyword = KeywordJudge()
        self.judges = [j for j in (judges or []) if j.name != "keyword"]  # keyword ASR is always measured
        self.benign_with_answers = [r for r in self.records if r["label"] == "benign" and response_text(r)]
        self.task_records = []
        if settings.task and settings.n_task:
            self.task_records = task_test(settings.task, settings.n_task, settings.seed)

    def evaluate(self, model, step: int) -> tuple[dict, list[dict], list[dict]]:
        t0 = time.perf_counter()
        s = self.settings
        answers = generate(model, self.tokenizer, self.records, s.max_new_tokens, s.batch_size)
        fault_pause(f"eval@{step}")
        prompts = [prompt_text(r) for r in self.records]
        harmful = [r["label"] == "harmful" for r in self.records]
        keyword = self.keyword.score(prompts, answers)  # 1 = complied (no refusal marker)
        gen_rows = [{"step": step, "prompt_id": r["id"], "kind": r["label"], "category": r["category"],
                     "prompt": p, "response": a, "refused": k == 0.0}
                    for r, p, a, k in zip(self.records, prompts, answers, keyword)]
        row = {"step": step,
               "asr_keyword": _share([k for k, h in zip(keyword, harmful) if h]),
               "over_refusal": _share([1.0 - k for k, h in zip(keyword, harmful) if not h])}
        idx = [i for i, h in enumerate(harmful) if h]
        for judge in self.judges:
            scores = judge.score([prompts[i] for i in idx], [answers[i] for i in idx])
            for i, sc in zip(idx, scores):
                gen_rows[i][trace_names.score(judge.name)] = sc
            row.update(judge_figures(judge.name, scores))
        sample_rows = self._sampled(model, step, row) if s.samples else []
        row["benign_nll"] = (
            answer_nll(model, self.tokenizer, self.benign_with_answers) if self.benign_with_answers else float("nan")
        )
        if self.task_records:
            gen_rows += self._task(model, step, row)
        row["n_harmful"], row["n_benign"] = sum(harmful), len(harmful) - sum(harmful)
        row["wall_time"] = time.perf_counter() - t0
        row["time"] = time.time()
        return row, gen_rows, sample_rows

    def _task(self, model, step: int, row: dict) -> list[dict]:
        """The user task's exact-match accuracy on its held-out questions (``task_accuracy``); ``generations``
        rows of kind ``task`` with ``correct``."""
        s = self.settings
        answers = generate(model, self.tokenizer, self.task_records, s.task_new_tokens, s.batch_size)
        rows = [{"step": step, "prompt_id": r["id"], "kind": "task", "category": r["category"],
                 "prompt": prompt_text(r), "response": a, "refused": False,
                 "correct": is_correct(a, response_text(r), s.task)}
                for r, a in zip(self.task_records, answers)]
        row["task_accuracy"] = _share(float(r["correct"]) for r in rows)
        row["n_task"] = len(rows)
        return rows

    def _sampled(self, model, step: int, row: dict) -> list[dict]:
        """``samples`` answers per harmful prompt at ``temperature``; adds ASR@k and the per-answer ASR to ``row``."""
        s = self.settings
        harmful = [r for r in self.records if r["label"] == "harmful"]
        records = [r for r in harmful for _ in range(s.samples)]
        answers = generate(model, self.tokenizer, records, s.max_new_tokens, s.batch_size, s.temperature,
                           seed=s.seed * 100_003 + step)
        prompts = [prompt_text(r) for r in records]
        success = {"keyword": [float(k) for k in self.keyword.score(prompts, answers)]}  # 1 = no refusal marker
        rows = [{"step": step, "prompt_id": r["id"], "sample": j % s.samples + 1, "kind": r["label"],
                 "category": r["category"], "prompt": p, "response": a, "refused": k == 0.0}
                for j, (r, p, a, k) in enumerate(zip(records, prompts, answers, success["keyword"]))]
        for judge in self.judges:
            scores = judge.score(prompts, answers)
            for r, sc in zip(rows, scores):
                r[trace_names.score(judge.name)] = sc
            success[judge.name] = hits(scores)
        for name, hit in success.items():
            row.update(sampled_figures(name, [hit[i:i + s.samples] for i in range(0, len(hit), s.samples)]))
        row["eval_samples"], row["eval_temperature"] = s.samples, s.temperature
        return rows


def _share(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def hits(scores) -> list[float]:
    """Attack succeeded per answer by a judge's scores: 1.0 at or above the flag threshold, NaN where unscored."""
    return [float("nan") if math.isnan(sc) else float(sc >= FLAG_THRESHOLD) for sc in scores]


def judge_figures(judge: str, scores) -> dict:
    """A judge's figures of one evaluation from its scores of the greedy harmful answers: ASR over the scored ones
    and the number it failed to score. Also what ``staysafe rejudge`` records from stored answers."""
    hit = hits(scores)
    return {trace_names.asr(judge): _share(h for h in hit if not math.isnan(h)),
            trace_names.failed(judge): sum(math.isnan(h) for h in hit)}


def sampled_figures(judge: str, per_prompt: list[list[float]]) -> dict:
    """A judge's figures of the sampled answers from its hits (:func:`hits`) grouped by prompt: the per-answer ASR
    and ASR@k (a prompt counts when one of its samples succeeded; prompts with no scored sample are left out)."""
    every = [h for p in per_prompt for h in p]
    return {trace_names.asr_sampled(judge): _share(h for h in every if not math.isnan(h)),
            trace_names.asr_at_k(judge): _share(float(any(h == 1.0 for h in p)) for p in per_prompt
                                                if not all(math.isnan(h) for h in p))}


# What decides a starting model's evaluation: the same for every method of an experiment (a LoRA adapter starts at
# zero, so the starting model is the model itself); the method, beta, lr and steps do not enter.
STEP0_OPTIONS = ("model", "precision", "seed", "eval_harmful", "eval_benign", "max_new_tokens", "eval_samples",
                 "eval_temperature", "eval_judges", "task", "eval_task")


class SharedStep0:
    """The step-0 evaluation shared by the runs of an experiment. Every method starts from the same model and is
    evaluated on the same prompts with the same decoding and seed, so the first run evaluates it and keeps it under
    ``<folder>/<digest of STEP0_OPTIONS>/``; later runs copy its rows (their ``wall_time`` is then the copy's)."""

    def __init__(self, folder, spec):
        key = json.dumps({k: getattr(spec, k) for k in STEP0_OPTIONS}, sort_keys=True, default=str)
        self.path = Path(folder) / hashlib.sha256(key.encode()).hexdigest()[:16]

    def load(self) -> tuple[dict, list[dict], list[dict]] | None:
        """The kept rows, or None when there are none (or they cannot be read, or the folder is a link: then the
        run evaluates itself)."""
        if not (real_dir(self.path.parent) and real_dir(self.path)):
            return None
        try:
            row = read_table(self.path / "evals.parquet", TABLES["evals"])
            gens = read_table(self.path / "generations.parquet", TABLES["generations"])
            samples = read_table(self.path / "samples.parquet", TABLES["samples"])
        except TraceError:
            return None
        if len(row) != 1 or (row["step"] != 0).any() or gens.empty or (gens["step"] != 0).any():
            return None
        return row.to_dict("records")[0], gens.to_dict("records"), samples.to_dict("records")

    def save(self, row: dict, gens: list[dict], samples: list[dict]) -> None:
        def build(tmp):
            write_parquet(tmp / "generations.parquet", pd.DataFrame(gens))
            if samples:
                write_parquet(tmp / "samples.parquet", pd.DataFrame(samples))
            write_parquet(tmp / "evals.parquet", pd.DataFrame([row]))  # last: the marker of a complete entry

        if self.path.parent.is_symlink() or self.path.is_symlink():  # never written through a planted link
            return
        build_once(self.path, build, marker="evals.parquet")


class EvalCallback(TrainerCallback):
    """Evaluates at step 0, every ``every`` steps and at the last step; writes ``evals`` and ``generations``."""

    def __init__(self, evaluator: SafetyEvaluator, run, every: int, trainer=None, shared: SharedStep0 | None = None):
        self.evaluator, self.run, self.every, self.trainer, self.shared = evaluator, run, every, trainer, shared
        self.done: set[int] = set()

    def _evaluate(self, model, state):
        step = state.global_step
        if step in self.done:
            return
        self.done.add(step)
        if state.is_world_process_zero:
            unwrapped = self.trainer.accelerator.unwrap_model(model) if self.trainer is not None else model
            t0 = time.perf_counter()
            kept = self.shared.load() if step == 0 and self.shared is not None else None
            if kept is not None:
                row, gens, samples = kept
                row = {**row, "wall_time": time.perf_counter() - t0, "time": time.time()}
            else:
                row, gens, samples = self.evaluator.evaluate(unwrapped, step)
                if step == 0 and self.shared is not None:
                    self.shared.save(row, gens, samples)
            self.run.append("generations", gens)
            if samples:
                self.run.append("samples", samples)
            self.run.append("evals", [row])
            if self.trainer is not None:  # the same numbers through the Trainer's log (report_to integrations)
                self.trainer.log_evaluation({f"eval_{k}": float(v) for k, v in row.items()
                                             if k not in ("step", "time", "wall_time") and isinstance(v, (int, float))})
        if self.trainer is not None:
            self.trainer.accelerator.wait_for_everyone()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self._evaluate(model, state)
        else:  # resumed: evaluations up to the checkpoint are already recorded
            self.done.update(range(state.global_step + 1))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if (self.every and state.global_step % self.every == 0) or state.global_step >= state.max_steps:
            self._evaluate(model, state)


def make_evaluator(spec, tokenizer) -> "SafetyEvaluator":
    """The run's safety evaluation (held-out prompts, judges, sampling) from its options."""
    settings = EvalSettings(spec.eval_harmful, spec.eval_benign, spec.max_new_tokens, seed=spec.seed,
                            samples=spec.eval_samples, temperature=spec.eval_temperature, task=spec.task,
                            n_task=spec.eval_task if spec.task else 0)
    return SafetyEvaluator(tokenizer, settings, [make_judge(name) for name in spec.eval_judges])

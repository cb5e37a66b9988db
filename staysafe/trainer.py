"""The adaptive safety-regularised trainer: a ``transformers.Trainer`` whose loss blends NLL with a KL pull toward
the frozen safe reference, weighted by the batch's estimated safety risk.

    loss = (1 - beta) * NLL + beta * KL(ref || model)      over answer tokens      (staysafe.losses)
    beta = beta_min + (beta_max - beta_min) * s,            s = risk in [0, 1]      (staysafe.risk.RiskPolicy)

Methods: ``sft`` (beta = 0, no reference forward at all), ``constant-kl`` (beta fixed), ``adaptive`` (beta from a
risk source). With LoRA the reference is the same model with its adapter disabled; otherwise a frozen copy
(:mod:`staysafe.reference`). Being a plain ``Trainer``, it runs unchanged under ``accelerate launch`` /
``torchrun``, and its per-step metrics (loss, nll, kl, beta, risk, risk_<source>, n_fallback) go through
``Trainer.log``, so every ``report_to`` integration shows them; the Parquet traces hold the same values.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from staysafe.losses import answer_positions, answer_rows, answer_token_losses, reference_topk
from staysafe.methods import method_named
from staysafe.options import SafetyOptions, SpecError
from staysafe.reference import (
    ReferenceCache,
    SharedReference,
    frozen_copy,
    lm_head_positions_supported,
    peft_model_of,
    prepare_reference,
)
from staysafe.risk import ColumnRisk, RiskPolicy, aggregate, read_signals
from staysafe.runs.atomic import write_json
from staysafe.runs.faults import fault_pause
from staysafe.runs.files import read_json

STATE_FILE = "staysafe_state.json"
# The step metrics logged (+ every risk_<source>; drift: adaptive-drift's reading)
LOGGED = ("loss", "nll", "kl", "beta", "risk", "n_fallback", "drift", "drift_risk")


@dataclass
class SafetyConfig(SafetyOptions, TrainingArguments):
    """``TrainingArguments`` plus the regulariser's options (:class:`staysafe.options.SafetyOptions`; TRL's
    ``*Config`` pattern)."""

    # Defaults that differ from TrainingArguments: keep our batch columns, log every step, no external reporting.
    remove_unused_columns: bool = False
    logging_steps: float = 1
    report_to: None | str | list[str] = "none"
    save_strategy: str = "no"

    def __post_init__(self):
        self.check_safety_options()
        if self.learning_rate < 0:
            raise SpecError(f"learning_rate = {self.learning_rate!r} is invalid: expected a number >= 0")
        if self.max_steps == 0:
            raise SpecError("max_steps = 0 is invalid: expected a positive number of steps (or -1 to train for "
                            "num_train_epochs)")
        super().__post_init__()


class SafetyTrainer(Trainer):
    """``Trainer`` with the adaptive KL regulariser; see the module docstring.

    ``risk_sources`` maps names to callables ``RiskBatch -> Tensor[B]``; the one named by ``args.risk`` sets beta,
    all are recorded. ``run`` (a :class:`staysafe.runs.traces.RunWriter`) receives one trace row per step and one per
    example. ``ref_model``: the frozen reference (default: a copy of ``model``, or its disabled LoRA adapter).
    ``shared_reference``: ``(SharedReference, the reference's key)``, the reference's outputs shared with the
    other runs of an experiment in this process (:class:`staysafe.reference.SharedReference`).
    """

    def __init__(self, model=None, args: SafetyConfig = None, *, risk_sources: dict | None = None,
                 ref_model=None, run=None, shared_reference: tuple[SharedReference, str] | None = None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        # compute_loss returns a mean over the micro-batch; let Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.risk_sources = {"label": ColumnRisk("label"), **(risk_sources or {})}
        self.method = method_named(args.method)
        if self.method.risk and args.risk not in self.risk_sources:
            raise SpecError(f"risk = {args.risk!r} is not a known risk source; have {sorted(self.risk_sources)}")
        unwrapped = self.accelerator.unwrap_model(model)
        if self.method.reference and ref_model is None and peft_model_of(unwrapped) is None:
            ref_model = frozen_copy(unwrapped)
        self.ref_model = prepare_reference(ref_model, self.accelerator) if ref_model is not None else None
        self.risk_policy = RiskPolicy(args)
        self.run = run
        self._head_positions_ok = lm_head_positions_supported(self.accelerator.unwrap_model(model))
        self.ref_cache = ReferenceCache() if args.reference_cache and self.method.reference else None
        self.shared_reference = shared_reference if self.ref_cache is None else None
        self.hooks = self.method.hooks(self)  # the method's part of the step (staysafe.methods)
        self.hidden_layers = self._hidden_layers()  # what the reference forward returns for the risk sources
        self.reference_calls = self.reference_shared = 0  # reference forwards; batches another run computed
        self.recording = True  # compute_loss records its micro-batch for the step's trace row (see unrecorded)
        self._pending: list[dict] = []  # this optimizer step's micro-batch records
        self._unlogged: list[dict] = []  # step metrics since the last Trainer log
        self._unlogged_eval: dict = {}  # an evaluation of this step, sent with the step's log
        self._last_grad_norm = float("nan")
        self.add_callback(_StepRecorder(self))

    # -- the training step -------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.hooks.prepare(model, self.state.global_step)
        phase = self.hooks.phase(self.state.global_step)
        inputs = self.hooks.batch(inputs, phase)  # lisa's alignment phase: its own batch instead of the user's
        labels = inputs["labels"]
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        keep = None if self.args.lm_head_all_positions or not self._head_positions_ok else answer_positions(labels)
        if keep is not None:  # the LM head only where the next token is an answer token
            model_inputs["logits_to_keep"] = keep
        ref_logits, ref_topk, signals = self.reference_step(model, model_inputs, inputs, keep)
        beta, risk, fallback, batch_risk = self.risk_policy.decide(signals, labels.shape[0], labels.device)
        out = model(**model_inputs)
        nll_tok, kl_tok, rows = answer_token_losses(out.logits, labels, ref_logits, self.args.kl_top_k,
                                                    positions=keep, ref_topk=ref_topk)
        loss, nll_i, kl_i, by_position = self.hooks.loss(nll_tok, kl_tok, rows, beta, labels, keep, ref_logits)
        extra = self.hooks.extra_loss(model, phase)
        if extra is not None:
            loss = loss + extra
        if self.recording:
            self._pending.append({
                "example_index": inputs["example_index"].detach().cpu(), "nll": nll_i.detach().float().cpu(),
                "kl": kl_i.detach().float().cpu(), "beta": beta.detach().float().cpu(), "risk": risk.detach().cpu(),
                "fallback": fallback.detach().cpu(), "signals": {k: v.cpu() for k, v in signals.items()},
                "batch_risk": batch_risk, "loss": float(loss.detach()),
                "nll_tokens": float(nll_tok.detach().mean()) if nll_tok.numel() else float("nan"),
                "kl_tokens": float(kl_tok.detach().mean()) if kl_tok is not None and kl_tok.numel() else 0.0,
                "tokens": int(inputs["attention_mask"].sum()), "answer_tokens": int(rows.numel()), "phase": phase,
                "by_position": by_position,
            })
        return (loss, out) if return_outputs else loss

    @contextlib.contextmanager
    def unrecorded(self):
        """Loss computations inside are not trace rows (Vaccine's perturbation-finding pass)."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    # -- reference ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reference(self, model):
        if self.ref_model is not None:
            yield self.ref_model
            return
        peft_model = peft_model_of(self.accelerator.unwrap_model(model))
        with peft_model.disable_adapter():
            yield peft_model

    @torch.no_grad()
    def reference_forward(self, model, inputs):
        """One no-grad forward of the safe reference: logits for the KL, hidden states for the probe."""
        self.reference_calls += 1
        with self._reference(model) as ref:
            return ref(**inputs, output_hidden_states=self.hidden_layers is not None)

    def _hidden_layers(self) -> tuple[int, ...] | None:
        """The hidden-state layers the risk sources read (None: none read any; every layer: a source that does
        not say which)."""
        readers = [s for s in self.risk_sources.values() if getattr(s, "needs_hidden_states", False)]
        if not readers:
            return None
        if not all(hasattr(s, "hidden_layers") for s in readers):
            return tuple(range(self.accelerator.unwrap_model(self.model).config.num_hidden_layers + 1))
        return tuple(sorted({layer for s in readers for layer in s.hidden_layers}))

    def reference_outputs(self, model, model_inputs):
        """``(logits, hidden_states)`` of the reference on a batch: its forward, or the outputs another run of the
        experiment computed on the same batch from the same reference (``shared_reference``)."""
        if self.shared_reference is None:
            ref = self.reference_forward(model, model_inputs)
            return ref.logits, ref.hidden_states
        shared, weights = self.shared_reference
        key = shared.key(weights, model_inputs, self.hidden_layers)
        got = shared.get(key, model_inputs["input_ids"].device)
        if got is None:
            ref = self.reference_forward(model, model_inputs)
            shared.put(key, ref.logits, ref.hidden_states, self.hidden_layers)
            return ref.logits, ref.hidden_states
        self.reference_shared += 1
        return got

    def reference_step(self, model, model_inputs, inputs, keep):
        """The reference's part of a step: ``(its logits, or its cached top-k, and the risk signals)``. ``sft``
        has no reference at all; with ``reference_cache`` a batch seen before costs no reference forward."""
        if not self.method.reference:
            return None, None, read_signals(self.risk_sources, inputs, None)
        if self.ref_cache is not None:
            cached = self.ref_cache.lookup(inputs["example_index"], inputs["labels"].device)
            if cached is not None:
                topk, from_hidden = cached
                return None, topk, {**read_signals(self.risk_sources, inputs, None), **from_hidden}
        ref_logits, hidden_states = self.reference_outputs(model, model_inputs)
        signals = read_signals(self.risk_sources, inputs, hidden_states)
        if self.ref_cache is None:
            return ref_logits, None, signals
        labels = inputs["labels"]
        topk = reference_topk(ref_logits, labels, self.args.kl_top_k, keep)
        from_hidden = {n: v for n, v in signals.items() if getattr(self.risk_sources[n], "needs_hidden_states", False)}
        self.ref_cache.add(inputs["example_index"], answer_rows(labels, keep), topk, from_hidden)
        return None, topk, signals

    # -- logging: our step metrics replace the Trainer's own loss in its logs ------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and (self._unlogged or self._unlogged_eval):  # the Trainer's training-step log
            logs = {**logs, **{k: _mean(m[k] for m in self._unlogged if k in m)  # averaged since the last one
                               for k in dict.fromkeys(k for m in self._unlogged for k in m)}, **self._unlogged_eval}
            self._unlogged, self._unlogged_eval = [], {}
        super().log(logs, start_time)

    def log_evaluation(self, metrics: dict[str, float]) -> None:
        """Log evaluation metrics (``eval_*``) at the current step. A log of their own during a step that the
        Trainer is about to log would make it skip that step's log, so they then go out with it."""
        if self.control.should_log:
            self._unlogged_eval.update(metrics)
        else:
            self.log(metrics)

    def _get_grad_norm(self, model, grad_norm=None):
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._last_grad_norm = float(norm) if norm is not None else float("nan")
        return norm

    # -- checkpoints: the risk policy's state and the method's own (Lisa's anchor) are part of the training state --

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        fault_pause(f"checkpoint@{self.state.global_step}")
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        self.hooks.save(folder)
        if self.args.should_save:
            # Written last: a checkpoint without this file was interrupted and is skipped on resume.
            write_json(os.path.join(folder, STATE_FILE), self.risk_policy.state_dict())

    def train(self, resume_from_checkpoint=None, **kwargs):
        if isinstance(resume_from_checkpoint, str):
            state_file = os.path.join(resume_from_checkpoint, STATE_FILE)
            if os.path.lexists(state_file):
                self.risk_policy.load_state_dict(read_json(state_file), state_file)
            self.hooks.load(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


class _StepRecorder(TrainerCallback):
    """Turns the micro-batch records of one optimizer step into a trace row per step and per example, and hands
    the step's metrics to the Trainer's log."""

    def __init__(self, trainer: SafetyTrainer):
        self.trainer = trainer
        self.t0 = time.perf_counter()
        self.lr = float("nan")

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self.lr = float(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, **kwargs):
        tr = self.trainer
        pending, tr._pending = tr._pending, []
        if not pending:
            return
        gathered = _gather_examples(tr, pending)  # every process takes part; every process gets all examples
        row = _step_row(pending, gathered, args, state, self.lr, tr._last_grad_norm, time.perf_counter() - self.t0)
        row.update(tr.hooks.step_record())
        if args.logging_strategy != "no":
            tr._unlogged.append({k: v for k, v in row.items() if k in LOGGED or k.startswith("risk_")})
        if tr.run is None or not state.is_world_process_zero:
            return
        # The step row first: a kill between the two appends leaves a step without its example rows, never example
        # rows of a step the trace does not have.
        tr.run.append("steps", [row])
        if row["phase"] == "user":  # lisa's alignment steps train on the alignment data, not on the run's examples
            tr.run.append("examples", _example_rows(state.global_step, gathered))
        if pending[0]["by_position"] is not None:
            tr.run.append("positions", _position_rows(state.global_step, pending))
        tr.run.set_status("running", step=state.global_step)
        fault_pause(f"step@{state.global_step}")


def _example_rows(step: int, gathered: dict) -> list[dict]:
    rows = []
    for slot, i in enumerate(gathered["example_index"].tolist()):
        row = {"step": step, "slot": slot, "example_index": i,
               "nll": float(gathered["nll"][slot]), "kl": float(gathered["kl"][slot]),
               "beta": float(gathered["beta"][slot]), "risk": float(gathered["risk"][slot]),
               "fallback": bool(gathered["fallback"][slot])}
        for name, values in gathered["signals"].items():
            row[f"risk_{name}"] = float(values[slot])
        rows.append(row)
    return rows


def _step_row(pending, gathered, args, state, lr, grad_norm, wall_time) -> dict:
    batch_risks = [p["batch_risk"] for p in pending if not math.isnan(p["batch_risk"])]
    row = {
        "step": state.global_step, "epoch": float(state.epoch or 0.0), "lr": lr,
        "loss": _mean(p["loss"] for p in pending), "nll": _mean(p["nll_tokens"] for p in pending),
        "kl": _mean(p["kl_tokens"] for p in pending), "beta": float(gathered["beta"].mean()),
        "risk": _mean(batch_risks) if batch_risks else float(gathered["risk"].mean()),
        "grad_norm": grad_norm, "tokens": sum(p["tokens"] for p in pending) * args.world_size,
        "answer_tokens": sum(p["answer_tokens"] for p in pending) * args.world_size,
        "n_examples": len(gathered["example_index"]), "n_fallback": int(gathered["fallback"].sum()),
        "wall_time": wall_time, "time": time.time(), "phase": pending[0]["phase"],
    }
    for name, values in gathered["signals"].items():
        row[f"risk_{name}"] = float(aggregate(values, args.batch_risk))
    return row


def _position_rows(step: int, pending: list[dict]) -> list[dict]:
    """Token-wise methods: per answer position, the mean beta_t, loss term and log p(y_t) - log p_ref(y_t) of this
    step's answer tokens at that position (this process's micro-batches)."""
    pos, betas, loss, ratio = (torch.cat([p["by_position"][k] for p in pending]).float().cpu() for k in range(4))
    rows = []
    for t in sorted(set(pos.tolist())):
        sel = pos == t
        rows.append({"step": step, "position": int(t), "beta": float(betas[sel].mean()),
                     "loss": float(loss[sel].mean()), "log_ratio": float(ratio[sel].mean()), "n": int(sel.sum())})
    return rows


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _gather_examples(trainer: SafetyTrainer, pending: list[dict]) -> dict:
    """Concatenate this step's micro-batches and, under several processes, gather every rank's examples."""
    cat = {k: torch.cat([p[k] for p in pending]) for k in ("example_index", "nll", "kl", "beta", "risk", "fallback")}
    names = sorted(set.intersection(*(set(p["signals"]) for p in pending)))
    cat["signals"] = {n: torch.cat([p["signals"][n] for p in pending]) for n in names}
    acc = trainer.accelerator
    if acc.num_processes == 1:
        return cat
    dev = acc.device

    def gather(t, pad):
        t = acc.pad_across_processes(t.to(dev).unsqueeze(0), dim=1, pad_index=pad).squeeze(0)
        return acc.gather(t).cpu()

    idx = gather(cat["example_index"], -1)
    keep = idx >= 0
    out = {"example_index": idx[keep]}
    for k in ("nll", "kl", "beta", "risk"):
        out[k] = gather(cat[k].float(), 0)[keep]
    out["fallback"] = gather(cat["fallback"].long(), 0)[keep].bool()
    out["signals"] = {n: gather(v.float(), 0)[keep] for n, v in cat["signals"].items()}
    return out

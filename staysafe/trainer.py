"""The adaptive safety-regularised trainer: a ``transformers.Trainer`` whose loss blends NLL with a KL pull toward
the frozen safe reference, weighted by the batch's estimated safety risk.

    loss = (1 - beta) * NLL + beta * KL(ref || model)      over answer tokens
    beta = beta_min + (beta_max - beta_min) * s,            s = risk in [0, 1] (optionally EMA-smoothed)

Methods: ``sft`` (beta = 0, no reference forward at all), ``constant-kl`` (beta fixed), ``adaptive`` (beta from a
risk source). With LoRA the reference is the same model with its adapter disabled; otherwise a frozen copy. Being
a plain ``Trainer``, it runs unchanged under ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from staysafe.data import IGNORE
from staysafe.options import SafetyOptions, SpecError
from staysafe.risk import ColumnRisk, RiskBatch, aggregate

STATE_FILE = "staysafe_state.json"


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


# ----------------------------------------------------------------------------------------------- losses


def answer_token_losses(logits, labels, ref_logits=None, top_k: int = 0):
    """NLL and KL(ref || model) of every answer token, with the batch row each token belongs to."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    rows = mask.nonzero(as_tuple=True)[0]
    logp = logits[:, :-1][mask].float().log_softmax(-1)
    nll = -logp.gather(1, targets[mask].unsqueeze(1)).squeeze(1)
    if ref_logits is None:
        return nll, None, rows
    ref_logp = ref_logits[:, :-1][mask].float().log_softmax(-1)
    if top_k and top_k < ref_logp.shape[-1]:
        # KL between the two distributions coarsened to {top-k tokens of the reference, everything else}:
        # a lower bound of the exact KL that avoids the full-vocabulary product.
        ref_top, idx = ref_logp.topk(top_k, dim=-1)
        top = logp.gather(1, idx)
        p, q = ref_top.exp(), top.exp()
        p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
        q_rest = (1 - q.sum(-1)).clamp_min(1e-12)
        kl = (p * (ref_top - top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    else:
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return nll, kl, rows


def per_example_mean(values: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    sums = torch.zeros(batch_size, device=values.device, dtype=values.dtype).index_add(0, rows, values)
    counts = torch.bincount(rows, minlength=batch_size).clamp_min(1)
    return sums / counts


# ----------------------------------------------------------------------------------------------- trainer


def _unwrap_peft(model):
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return model if isinstance(model, PeftModel) else None


class SafetyTrainer(Trainer):
    """``Trainer`` with the adaptive KL regulariser; see the module docstring.

    ``risk_sources`` maps names to callables ``RiskBatch -> Tensor[B]``; the one named by ``args.risk`` sets beta,
    all are recorded. ``run`` (a :class:`staysafe.traces.RunWriter`) receives one trace row per step and one per
    example.
    """

    def __init__(self, model=None, args: SafetyConfig = None, *, risk_sources: dict | None = None,
                 ref_model=None, run=None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        # compute_loss returns a mean over the micro-batch; let Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.risk_sources = {"label": ColumnRisk("label"), **(risk_sources or {})}
        if args.method == "adaptive" and args.risk not in self.risk_sources:
            raise ValueError(f"risk = {args.risk!r} is not a known risk source; have {sorted(self.risk_sources)}")
        self.ref_model = ref_model
        if args.method != "sft" and ref_model is None and _unwrap_peft(self.accelerator.unwrap_model(model)) is None:
            self.ref_model = copy.deepcopy(self.accelerator.unwrap_model(model)).requires_grad_(False).eval()
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        self.run = run
        self.reference_calls = 0
        self.risk_state = {"ema": None, "last": None}
        self._pending: list[dict] = []
        self._last_grad_norm = float("nan")
        self.add_callback(_StepRecorder(self))

    # -- reference ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reference(self, model):
        if self.ref_model is not None:
            yield self.ref_model
            return
        peft_model = _unwrap_peft(self.accelerator.unwrap_model(model))
        with peft_model.disable_adapter():
            yield peft_model

    def _needs_hidden_states(self) -> bool:
        return any(getattr(s, "needs_hidden_states", False) for s in self.risk_sources.values())

    @torch.no_grad()
    def reference_forward(self, model, inputs):
        """One no-grad forward of the safe reference: logits for the KL, hidden states for the probe."""
        self.reference_calls += 1
        with self._reference(model) as ref:
            return ref(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       output_hidden_states=self._needs_hidden_states())

    # -- risk --------------------------------------------------------------------------------------------

    def risk_signals(self, inputs, hidden_states) -> dict[str, torch.Tensor]:
        batch = RiskBatch(inputs=inputs, hidden_states=hidden_states)
        out = {}
        for name, source in self.risk_sources.items():
            if getattr(source, "needs_hidden_states", False) and hidden_states is None:
                continue  # sft: no reference forward, so no probe reading
            s = torch.as_tensor(source(batch), dtype=torch.float32).detach().flatten()
            if s.numel() != batch.size:
                raise ValueError(f"risk source {name!r} returned {s.numel()} values for a batch of {batch.size}")
            known = s[~s.isnan()]
            if known.numel() and (known.min() < 0 or known.max() > 1):
                raise ValueError(f"risk source {name!r} returned values outside [0, 1]: {known.min():.3g}..{known.max():.3g}")
            out[name] = s
        return out

    def primary_risk(self, signals):
        """Per-example risk from ``args.risk``, missing scores filled by the documented fallback (and flagged)."""
        risk = signals[self.args.risk].clone()
        missing = risk.isnan()
        if missing.any():
            probe = signals.get("probe")
            if self.args.risk_fallback == "probe" and probe is not None and self.args.risk != "probe":
                risk = torch.where(missing & ~probe.isnan(), probe.to(risk.device), risk)
            still = risk.isnan()
            last = self.risk_state["last"]
            if self.args.risk_fallback in ("probe", "last") and last is not None:
                risk[still] = last
            risk[risk.isnan()] = 1.0  # no score and nothing to fall back on: assume the worst
        return risk, missing

    def beta_for(self, risk: torch.Tensor):
        """beta per example (a tensor of size B), plus the batch risk after aggregation and EMA."""
        a = self.args
        if a.method == "sft":
            return torch.zeros_like(risk), float("nan")
        if a.method == "constant-kl":
            return torch.full_like(risk, a.beta), float("nan")
        if a.per_example_beta:
            return a.beta_min + (a.beta_max - a.beta_min) * risk, float(risk.mean())
        s = float(aggregate(risk, a.batch_risk))
        if a.risk_ema:
            prev = self.risk_state["ema"]
            s = s if prev is None else a.risk_ema * prev + (1 - a.risk_ema) * s
            self.risk_state["ema"] = s
        return torch.full_like(risk, a.beta_min + (a.beta_max - a.beta_min) * s), s

    # -- the training step -------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        ref = self.reference_forward(model, model_inputs) if self.args.method != "sft" else None
        signals = self.risk_signals(inputs, ref.hidden_states if ref is not None else None)
        if self.args.method == "adaptive":
            risk, fallback = self.primary_risk({k: v.to(labels.device) for k, v in signals.items()})
        else:  # the risk is recorded but sets nothing
            risk = torch.full((labels.shape[0],), float("nan"), device=labels.device)
            fallback = torch.zeros(labels.shape[0], dtype=torch.bool)
        beta, batch_risk = self.beta_for(risk)
        if not math.isnan(batch_risk):
            self.risk_state["last"] = batch_risk

        out = model(**model_inputs)
        nll_tok, kl_tok, rows = answer_token_losses(out.logits, labels, ref.logits if ref is not None else None,
                                                    self.args.kl_top_k)
        n = labels.shape[0]
        nll_i = per_example_mean(nll_tok, rows, n)
        kl_i = per_example_mean(kl_tok, rows, n) if kl_tok is not None else torch.zeros_like(nll_i)
        if self.args.per_example_beta:
            loss = ((1 - beta) * nll_i + beta * kl_i).mean()
        else:
            b = beta[0]
            nll, kl = nll_tok.mean(), (kl_tok.mean() if kl_tok is not None else torch.zeros((), device=nll_tok.device))
            loss = (1 - b) * nll + b * kl if self.args.method != "sft" else nll

        self._pending.append({
            "example_index": inputs["example_index"].detach().cpu(), "nll": nll_i.detach().float().cpu(),
            "kl": kl_i.detach().float().cpu(), "beta": beta.detach().float().cpu(), "risk": risk.detach().cpu(),
            "fallback": fallback.detach().cpu(), "signals": {k: v.cpu() for k, v in signals.items()},
            "batch_risk": batch_risk, "loss": float(loss.detach()),
            "nll_tokens": float(nll_tok.detach().mean()) if nll_tok.numel() else float("nan"),
            "kl_tokens": float(kl_tok.detach().mean()) if kl_tok is not None and kl_tok.numel() else 0.0,
            "tokens": int(inputs["attention_mask"].sum()), "answer_tokens": int(rows.numel()),
        })
        return (loss, out) if return_outputs else loss

    def _get_grad_norm(self, model, grad_norm=None):
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._last_grad_norm = float(norm) if norm is not None else float("nan")
        return norm

    # -- checkpoints: the risk EMA is part of the training state -------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        fault_pause(f"checkpoint@{self.state.global_step}")
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if self.args.should_save:
            # Written last: a checkpoint without this file was interrupted and is skipped on resume.
            from staysafe.traces import write_json

            write_json(os.path.join(folder, STATE_FILE), self.risk_state)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if isinstance(resume_from_checkpoint, str):
            state_file = os.path.join(resume_from_checkpoint, STATE_FILE)
            if os.path.isfile(state_file):
                with open(state_file) as f:
                    self.risk_state = json.load(f)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


class _StepRecorder(TrainerCallback):
    """Turns the micro-batch records of one optimizer step into a trace row per step and per example."""

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
        gathered = _gather_examples(tr, pending)
        if tr.run is None or not state.is_world_process_zero:
            return
        step = state.global_step
        ex_rows = []
        for slot, i in enumerate(gathered["example_index"].tolist()):
            row = {"step": step, "slot": slot, "example_index": i,
                   "nll": float(gathered["nll"][slot]), "kl": float(gathered["kl"][slot]),
                   "beta": float(gathered["beta"][slot]), "risk": float(gathered["risk"][slot]),
                   "fallback": bool(gathered["fallback"][slot])}
            for name, values in gathered["signals"].items():
                row[f"risk_{name}"] = float(values[slot])
            ex_rows.append(row)
        batch_risks = [p["batch_risk"] for p in pending if not math.isnan(p["batch_risk"])]
        row = {
            "step": step, "epoch": float(state.epoch or 0.0), "lr": self.lr,
            "loss": _mean(p["loss"] for p in pending), "nll": _mean(p["nll_tokens"] for p in pending),
            "kl": _mean(p["kl_tokens"] for p in pending), "beta": float(gathered["beta"].mean()),
            "risk": _mean(batch_risks) if batch_risks else float(gathered["risk"].mean()),
            "grad_norm": tr._last_grad_norm, "tokens": sum(p["tokens"] for p in pending) * args.world_size,
            "answer_tokens": sum(p["answer_tokens"] for p in pending) * args.world_size,
            "n_examples": len(ex_rows), "n_fallback": int(gathered["fallback"].sum()),
            "wall_time": time.perf_counter() - self.t0, "time": time.time(),
        }
        how = args.batch_risk
        for name, values in gathered["signals"].items():
            row[f"risk_{name}"] = float(aggregate(values, how))
        tr.run.append("examples", ex_rows)
        tr.run.append("steps", [row])
        tr.run.set_status("running", step=step)
        fault_pause(f"step@{step}")


def fault_pause(point: str) -> None:
    """Fault-injection hook for the kill tests: ``STAYSAFE_TEST_PAUSE=point:seconds`` (points: ``step@N``,
    ``eval@N``, ``checkpoint@N``) announces the point on stderr and sleeps there, so a test can SIGKILL the process
    at that exact moment. Does nothing otherwise."""
    spec = os.environ.get("STAYSAFE_TEST_PAUSE", "")
    name, _, seconds = spec.partition(":")
    if name == point:
        import sys

        print(f"STAYSAFE_PAUSED {point}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 30))


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

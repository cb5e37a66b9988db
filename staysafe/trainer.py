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
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from staysafe.data import IGNORE
from staysafe.risk import ColumnRisk, RiskBatch, aggregate

METHODS = ("sft", "constant-kl", "adaptive")
FALLBACKS = ("probe", "last", "max")
STATE_FILE = "staysafe_state.json"
BATCH_KEYS = ("prompt_end", "example_index")


@dataclass
class SafetyConfig(TrainingArguments):
    """Training arguments plus the safety regulariser's settings (TRL's ``*Config`` pattern)."""

    method: str = field(default="adaptive", metadata={"help": "sft | constant-kl | adaptive"})
    beta: float = field(default=0.5, metadata={"help": "KL weight of constant-kl"})
    beta_min: float = field(default=0.05, metadata={"help": "adaptive: beta at risk 0"})
    beta_max: float = field(default=0.9, metadata={"help": "adaptive: beta at risk 1"})
    risk: str = field(default="label", metadata={"help": "name of the risk source that sets beta"})
    risk_ema: float = field(default=0.0, metadata={"help": "weight of the past in an EMA of the batch risk (0 = off)"})
    batch_risk: str = field(default="max", metadata={"help": "batch risk from per-example risks: max | mean"})
    per_example_beta: bool = field(default=False, metadata={"help": "one beta per example instead of per batch"})
    risk_fallback: str = field(default="probe", metadata={
        "help": "when the risk source has no score for an example: probe (then last, then 1) | last (then 1) | max (1)"})
    kl_top_k: int = field(default=0, metadata={"help": "KL over the reference's top-k tokens only (0 = exact)"})
    reference_cache: bool = field(default=False, metadata={
        "help": "keep the reference's top-k outputs (kl_top_k, required) and probe reading per example from the "
                "first epoch and reuse them after it, instead of a reference forward every step"})
    lm_head_all_positions: bool = field(default=False, metadata={
        "help": "project every position through the LM head, not only answer positions (the old, slower path; "
                "same numbers)"})
    # Defaults that differ from TrainingArguments: keep our batch columns, log every step, no external reporting.
    remove_unused_columns: bool = False
    logging_steps: float = 1
    report_to: None | str | list[str] = "none"
    save_strategy: str = "no"

    def __post_init__(self):
        check_safety_settings(self)
        super().__post_init__()


def check_safety_settings(c) -> None:
    """Validate the regulariser's fields (shared by the config and the CLI); errors name the field."""
    def bad(name, expected):
        raise ValueError(f"{name} = {getattr(c, name)!r} is invalid: expected {expected}")

    if c.method not in METHODS:
        bad("method", " | ".join(METHODS))
    for name in ("beta", "beta_min", "beta_max"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            bad(name, "a number in [0, 1]")
    if c.beta_min > c.beta_max:
        raise ValueError(f"beta_min = {c.beta_min} is greater than beta_max = {c.beta_max}")
    if not 0.0 <= c.risk_ema < 1.0:
        bad("risk_ema", "a number in [0, 1)")
    if c.risk_ema and c.per_example_beta:
        raise ValueError("risk_ema smooths the batch risk over steps; it cannot be combined with per_example_beta")
    if c.batch_risk not in ("max", "mean"):
        bad("batch_risk", "max | mean")
    if c.risk_fallback not in FALLBACKS:
        bad("risk_fallback", " | ".join(FALLBACKS))
    if c.kl_top_k < 0:
        bad("kl_top_k", "0 (exact KL) or a positive number of tokens")
    if c.reference_cache and not c.kl_top_k:
        raise ValueError("reference_cache keeps the reference's top-k log-probabilities: it needs kl_top_k > 0 "
                         "(64 is within 1% of the exact KL here, see benchmarks/README.md)")
    if getattr(c, "learning_rate", 0) < 0:
        bad("learning_rate", "a number >= 0")
    if getattr(c, "max_steps", -1) == 0:
        bad("max_steps", "a positive number of steps (or -1 to train for num_train_epochs)")


# ----------------------------------------------------------------------------------------------- losses


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is an answer token in at least one row: the only positions where the
    NLL and the KL need the language-model head (``logits_to_keep``), instead of a full B x T x V projection."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)


def lm_head_positions_supported(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` as a tensor of positions (transformers' causal LMs do)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def answer_token_losses(logits, labels, ref_logits=None, top_k: int = 0, positions=None, ref_topk=None):
    """NLL and KL(ref || model) of every answer token, with the batch row each token belongs to. ``logits`` (and
    ``ref_logits``) are either over every position, or only at ``positions`` (see :func:`answer_positions`).
    ``ref_topk`` (the reference's top-k log-probabilities and token ids per answer token, e.g. from the
    :class:`ReferenceCache`) stands in for ``ref_logits`` and gives the top-k KL."""
    if positions is None:
        logits, targets = logits[:, :-1], labels[:, 1:]
        ref_logits = ref_logits[:, :-1] if ref_logits is not None else None
    else:
        targets = labels[:, positions + 1]
    mask = targets != IGNORE
    rows = mask.nonzero(as_tuple=True)[0]
    logp = logits[mask].float().log_softmax(-1)
    nll = -logp.gather(1, targets[mask].unsqueeze(1)).squeeze(1)
    if ref_topk is not None:
        return nll, topk_kl(logp, *ref_topk), rows
    if ref_logits is None:
        return nll, None, rows
    ref_logp = ref_logits[mask].float().log_softmax(-1)
    if top_k and top_k < ref_logp.shape[-1]:
        return nll, topk_kl(logp, *ref_logp.topk(top_k, dim=-1)), rows
    return nll, (ref_logp.exp() * (ref_logp - logp)).sum(-1), rows


def reference_topk(ref_logits, labels, top_k: int, positions=None):
    """The reference's top-k log-probabilities and their token ids at every answer token (what the top-k KL and
    the reference cache keep)."""
    if positions is None:
        ref_logits, targets = ref_logits[:, :-1], labels[:, 1:]
    else:
        targets = labels[:, positions + 1]
    return ref_logits[targets != IGNORE].float().log_softmax(-1).topk(top_k, dim=-1)


def topk_kl(logp, ref_top, idx):
    """KL between the two distributions coarsened to {top-k tokens of the reference, everything else}: a lower
    bound of the exact KL that needs only the reference's top-k (its error is measured in benchmarks/)."""
    top = logp.gather(1, idx.long())
    p, q = ref_top.exp(), top.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q.sum(-1)).clamp_min(1e-12)
    return (p * (ref_top - top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


class ReferenceCache:
    """The frozen reference's outputs per training example, kept from the epoch that first saw it for the later
    ones (the reference never changes, so they are the same): its top-k log-probabilities and token ids at each
    answer token, and each hidden-state risk source's score of the prompt. In memory, per process: about
    k x 8 bytes per answer token (k = 64: 0.5 KB)."""

    def __init__(self):
        self.entries: dict[int, tuple] = {}
        self.hits = self.misses = 0

    def lookup(self, example_index: torch.Tensor):
        """``((ref_top, idx), signals)`` for a batch whose every example is cached (in batch order), else None."""
        keys = example_index.tolist()
        if not all(k in self.entries for k in keys):
            self.misses += 1
            return None
        self.hits += 1
        got = [self.entries[k] for k in keys]
        top = torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])
        names = got[0][2].keys()
        return top, {n: torch.tensor([g[2][n] for g in got]) for n in names}

    def add(self, example_index: torch.Tensor, rows: torch.Tensor, ref_topk, signals: dict) -> None:
        ref_top, idx = ref_topk
        for slot, key in enumerate(example_index.tolist()):
            sel = rows == slot
            self.entries[key] = (ref_top[sel].detach().cpu(), idx[sel].detach().to(torch.int32).cpu(),
                                 {n: float(v[slot]) for n, v in signals.items()})


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
        self._head_positions_ok = lm_head_positions_supported(self.accelerator.unwrap_model(model))
        self.ref_cache = ReferenceCache() if args.reference_cache and args.method != "sft" else None
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
            return ref(**inputs, output_hidden_states=self._needs_hidden_states())

    def reference_step(self, model, model_inputs, inputs, keep):
        """The reference's part of a step: ``(its logits, or its cached top-k, and the risk signals)``. ``sft``
        has no reference at all; with ``reference_cache`` a batch seen before costs no reference forward."""
        if self.args.method == "sft":
            return None, None, self.risk_signals(inputs, None)
        device = inputs["labels"].device
        cached = self.ref_cache.lookup(inputs["example_index"]) if self.ref_cache is not None else None
        if cached is not None:
            (ref_top, idx), hidden_signals = cached
            return None, (ref_top.to(device), idx.to(device)), {**self.risk_signals(inputs, None), **hidden_signals}
        ref = self.reference_forward(model, model_inputs)
        signals = self.risk_signals(inputs, ref.hidden_states)
        if self.ref_cache is None:
            return ref.logits, None, signals
        labels = inputs["labels"]
        topk = reference_topk(ref.logits, labels, self.args.kl_top_k, keep)
        rows = ((labels[:, 1:] if keep is None else labels[:, keep + 1]) != IGNORE).nonzero(as_tuple=True)[0]
        from_hidden = {n: v for n, v in signals.items() if getattr(self.risk_sources[n], "needs_hidden_states", False)}
        self.ref_cache.add(inputs["example_index"], rows, topk, from_hidden)
        return None, topk, signals

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
        keep = None if self.args.lm_head_all_positions or not self._head_positions_ok else answer_positions(labels)
        if keep is not None:
            model_inputs["logits_to_keep"] = keep
        ref_logits, ref_topk, signals = self.reference_step(model, model_inputs, inputs, keep)
        if self.args.method == "adaptive":
            risk, fallback = self.primary_risk({k: v.to(labels.device) for k, v in signals.items()})
        else:  # the risk is recorded but sets nothing
            risk = torch.full((labels.shape[0],), float("nan"), device=labels.device)
            fallback = torch.zeros(labels.shape[0], dtype=torch.bool)
        beta, batch_risk = self.beta_for(risk)
        if not math.isnan(batch_risk):
            self.risk_state["last"] = batch_risk

        out = model(**model_inputs)
        nll_tok, kl_tok, rows = answer_token_losses(out.logits, labels, ref_logits, self.args.kl_top_k,
                                                    positions=keep, ref_topk=ref_topk)
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

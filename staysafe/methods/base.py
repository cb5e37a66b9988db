"""What a fine-tuning method is: one :class:`Method` (what it needs and reads, how it looks) and its
:class:`TrainingHooks` (what it does inside :class:`staysafe.trainer.SafetyTrainer`).

A new method is one module in this folder defining a ``Method`` with its hooks, plus one line in the registry
(:mod:`staysafe.methods`). Nothing outside the method's own module asks for a method by name: the trainer, the risk
policy, the option checks, the runner, the experiment, the queue and the dashboard read these fields. Module
level stays light (no torch): the CLI's help and the dashboard read the registry without loading a model library.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class TrainingHooks:
    """A method's part of the training step. The default is plain regularised fine-tuning: the batch as given,
    ``(1 - beta) NLL + beta KL`` with the beta of :meth:`beta`, no extra state. One instance per trainer."""

    def __init__(self, trainer):
        self.trainer = trainer

    @staticmethod
    def beta(policy, risk):
        """beta per example (a tensor like ``risk``) and the batch risk (NaN when the risk sets nothing)."""
        import torch

        return torch.zeros_like(risk), float("nan")

    @staticmethod
    def check_before_work(spec) -> None:
        """Prerequisites of a run of this method that need no model (raise a SpecError naming what is missing)."""

    def prepare(self, model, step: int) -> None:
        """Work before a micro-batch's loss at optimizer step ``step`` (adaptive-drift reads its canaries)."""

    def step_record(self) -> dict:
        """Extra fields of the step's trace row (adaptive-drift: the drift it read)."""
        return {}

    def phase(self, step: int) -> str:
        """The state of optimizer step ``step`` (0-based), recorded per step: ``user`` unless the method alternates."""
        return "user"

    def batch(self, inputs: dict, phase: str) -> dict:
        """The batch a micro-step trains on (Lisa's alignment phase swaps in its own)."""
        return inputs

    def loss(self, nll_tok, kl_tok, rows, beta, labels, keep, ref_logits):
        """The micro-batch loss, its per-example NLL and KL, and per-position records (or None)."""
        from staysafe.losses import regularised_loss

        loss, nll_i, kl_i = regularised_loss(nll_tok, kl_tok, rows, beta, self.trainer.args.per_example_beta)
        return loss, nll_i, kl_i, None

    def extra_loss(self, model, phase: str):
        """A term added to the loss (Lisa's proximal pull), or None."""
        return None

    def save(self, folder: str) -> None:
        """Extra training state into a checkpoint folder (every process; before the state file marks it done)."""

    def load(self, folder: str) -> None:
        """Undo :meth:`save` when resuming from ``folder``."""

    def after_training(self, model, spec, tokenizer, writer, step: int) -> None:
        """Work on the finished model before it is saved (Safe LoRA's projection); main process only."""


@dataclass(frozen=True)
class Method:
    """A training method (``staysafe train --method``)."""

    name: str
    help: str  # one clause for --help
    hooks: type = TrainingHooks
    reference: bool = True  # a reference forward every step (the KL and the probe's reading)
    risk: bool = False  # beta follows the estimated risk
    kl_weight: bool = True  # its step beta is a KL weight, comparable across methods (token-wise: a schedule level)
    top_k_reference: bool = True  # works from the reference's top-k outputs (reference_cache)
    options: tuple[str, ...] = ()  # the options only this method reads (a sweep varies them for it only)


@dataclass(frozen=True)
class Variant:
    """What an experiment compares and the dashboard shows: a method with some options set (``adaptive-probe`` is
    ``adaptive`` with ``risk = probe``; ``vaccine`` is ``sft`` on the Vaccine-aligned reference)."""

    name: str
    method: str
    colour: str
    label: str = ""
    sets: dict = field(default_factory=dict)

    @property
    def options(self) -> dict:
        """The run options that make this variant."""
        return {"method": self.method, **self.sets}

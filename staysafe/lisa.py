"""Lisa (Huang et al. 2024, "Lazy Safety Alignment"): fine-tuning alternates between two states, a few steps on
alignment data (here the shipped refusal data, the alignment stage's own) and more steps on the user's data, and
every step carries a proximal term ``rho / 2 * ||w - w_switch||^2`` toward the trainable weights at the last switch,
so neither state drifts far from where the other left the model. Cycle: ``align_steps`` then ``user_steps``.
The anchor is not checkpointed: a resumed run takes it afresh at its first step.
"""

from __future__ import annotations

import random

import torch


class LisaSchedule:
    """Which state an optimizer step is in, the alignment batches, and the proximal anchor."""

    def __init__(self, tokenizer, align_steps: int, user_steps: int, rho: float, batch_size: int,
                 max_length: int = 128, seed: int = 0, risk_columns: tuple[str, ...] = ()):
        from staysafe.aligned import TRAIN_SETS
        from staysafe.data import SafetyCollator, load_records, tokenize_dataset

        self.align_steps, self.user_steps, self.rho = align_steps, user_steps, rho
        records = [r for name in TRAIN_SETS for r in load_records(name)]
        unscored = {c: [float("nan")] * len(records) for c in risk_columns if c != "risk_label"}  # e.g. the judge's
        self.features = [dict(r) for r in tokenize_dataset(tokenizer, records, max_length, unscored)]
        self.collate = SafetyCollator(tokenizer.pad_token_id)
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.anchor: dict[str, torch.Tensor] | None = None
        self.anchor_phase: str | None = None

    def phase(self, step: int) -> str:
        """``align`` or ``user`` for the optimizer step that starts at ``step`` (0-based)."""
        return "align" if step % (self.align_steps + self.user_steps) < self.align_steps else "user"

    def alignment_batch(self, device) -> dict:
        """The next batch of alignment examples (a reshuffled pass over them, again and again)."""
        if len(self.order) < self.batch_size:
            more = list(range(len(self.features)))
            self.rng.shuffle(more)
            self.order += more
        picked, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        batch = self.collate([self.features[i] for i in picked])
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def proximal(self, model, phase: str) -> torch.Tensor:
        """``rho / 2 * ||w - w_switch||^2`` over the trainable parameters; the anchor is taken at each switch."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if self.anchor is None or self.anchor_phase != phase:
            self.anchor = {n: p.detach().clone() for n, p in params.items()}
            self.anchor_phase = phase
        if not self.rho:
            return torch.zeros((), device=next(iter(params.values())).device)
        return self.rho / 2 * sum(((p - self.anchor[n]) ** 2).sum() for n, p in params.items())

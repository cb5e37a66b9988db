"""Lisa (Huang et al. 2024, "Lazy Safety Alignment"): fine-tuning alternates between two states, a few steps on
alignment data (here the shipped refusal data, the alignment stage's own) and more steps on the user's data, and
every step carries a proximal term ``rho / 2 * ||w - w_switch||^2`` toward the trainable weights at the last switch,
so neither state drifts far from where the other left the model. Cycle: ``align_steps`` then ``user_steps``.
A checkpoint keeps the anchor and the alignment data's order (:meth:`LisaSchedule.save`), so a resumed run goes on
exactly as one that was never stopped.
"""

from __future__ import annotations

import json
import random

import torch


class LisaSchedule:
    """Which state an optimizer step is in, the alignment batches, and the proximal anchor."""

    def __init__(self, tokenizer, align_steps: int, user_steps: int, rho: float, batch_size: int,
                 max_length: int = 128, seed: int = 0, risk_columns: tuple[str, ...] = ()):
        from staysafe.data import SafetyCollator, load_records, tokenize_dataset
        from staysafe.models.aligned import TRAIN_SETS

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
        self._loaded_anchor: dict[str, torch.Tensor] | None = None  # from a checkpoint, placed at the next step

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
        if self._loaded_anchor is not None:  # now the parameters are as the distributed engine holds them
            self.anchor = {n: _like(params[n], t) for n, t in self._loaded_anchor.items()}
            self._loaded_anchor = None
        if self.anchor is None or self.anchor_phase != phase:
            self.anchor = {n: p.detach().clone() for n, p in params.items()}
            self.anchor_phase = phase
        if not self.rho:
            return torch.zeros((), device=next(iter(params.values())).device)
        return self.rho / 2 * sum(((p - self.anchor[n]) ** 2).sum() for n, p in params.items())

    def save(self, path: str) -> None:
        """The anchor (this process's shards under FSDP) and, as the file's metadata, its phase and the alignment
        data's order and random state: one safetensors file per process."""
        from safetensors.torch import save_file

        anchor = self._loaded_anchor if self._loaded_anchor is not None else self.anchor or {}
        tensors = {n: _local(t).detach().cpu().contiguous() for n, t in anchor.items()}
        meta = {"anchor_phase": json.dumps(self.anchor_phase), "order": json.dumps(self.order),
                "rng": json.dumps(self.rng.getstate())}
        save_file(tensors, path, metadata=meta)

    def load(self, path: str) -> None:
        """Undo :meth:`save`; the anchor takes its parameters' device and layout at the next step."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            tensors = {n: f.get_tensor(n) for n in f.keys()}
        self.anchor, self._loaded_anchor = None, tensors or None
        self.anchor_phase = json.loads(meta["anchor_phase"])
        self.order = [int(i) for i in json.loads(meta["order"])]
        version, internal, gauss = json.loads(meta["rng"])
        self.rng.setstate((version, tuple(internal), gauss))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 DTensor: this process's shard


def _like(param: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """A saved anchor tensor on ``param``'s device, as a DTensor of the same sharding when ``param`` is one."""
    saved = saved.to(device=_local(param).device, dtype=param.dtype)
    if hasattr(param, "to_local"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(saved, param.device_mesh, param.placements)
    return saved

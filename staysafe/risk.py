"""Risk sources: what turns a training batch into per-example risks s in [0, 1] that set the KL weight beta.

A risk source is any callable ``source(batch: RiskBatch) -> Tensor[B]`` (NaN where it has no score). Built in:
- :class:`ColumnRisk` reads a precomputed ``risk_<name>`` column (the label "oracle", cached judge scores);
- :class:`staysafe.probe.ProbeRisk` reads the reference forward's hidden state at each last prompt token.
A :class:`Calibration` maps raw scores to s (identity, step at a threshold, sigmoid with a temperature, or the
``clamp`` schedule of the adaptive-regularisation paper's code: ``clamp((r - 2) / 3, 0.1, 0.9)`` on a 1-5 rating).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from staysafe.options import CALIBRATIONS


@dataclass
class RiskBatch:
    """What a risk source may look at: the collated batch and, when asked for, the reference hidden states."""

    inputs: dict[str, torch.Tensor]
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def size(self) -> int:
        return self.inputs["input_ids"].shape[0]


@dataclass
class Calibration:
    """Maps a source's raw score p in [0,1] to a risk s in [0,1]."""

    kind: str = "identity"
    threshold: float = 0.5
    temperature: float = 0.1

    def __post_init__(self):
        if self.kind not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {self.kind!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"calibration threshold must be in [0, 1], got {self.threshold}")
        if self.temperature <= 0:
            raise ValueError(f"calibration temperature must be > 0, got {self.temperature}")

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return p
        if self.kind == "step":
            return (p >= self.threshold).to(p.dtype).where(~p.isnan(), p)
        if self.kind == "sigmoid":
            return torch.sigmoid((p - self.threshold) / self.temperature)
        rating = 1.0 + 4.0 * p  # back to the 1-5 rubric scale
        return ((rating - 2.0) / 3.0).clamp(0.1, 0.9)


class ColumnRisk:
    """Risk read from a precomputed ``risk_<name>`` batch column: free at training time."""

    needs_hidden_states = False

    def __init__(self, name: str, calibration: Calibration | None = None):
        self.name = name
        self.calibration = calibration or Calibration()

    def __call__(self, batch: RiskBatch) -> torch.Tensor:
        column = batch.inputs.get(f"risk_{self.name}")
        if column is None:
            raise KeyError(f"the batch has no column risk_{self.name}; was the dataset scored by {self.name!r}?")
        return self.calibration(column.float())


def aggregate(risks: torch.Tensor, how: str) -> torch.Tensor:
    """Batch risk from per-example risks, ignoring NaN: ``max`` (one harmful example is enough) or ``mean``."""
    known = risks[~risks.isnan()]
    if known.numel() == 0:
        return torch.tensor(float("nan"))
    return known.max() if how == "max" else known.mean()

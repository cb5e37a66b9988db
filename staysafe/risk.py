"""Risk sources: what turns a training batch into per-example risks s in [0, 1] that set the KL weight beta.

A risk source is any callable ``source(batch: RiskBatch) -> Tensor[B]`` (NaN where it has no score). Built in:
- :class:`ColumnRisk` reads a precomputed ``risk_<name>`` column (the label "oracle", cached judge scores);
- :class:`staysafe.probe.ProbeRisk` reads the reference forward's hidden state at each last prompt token.
A :class:`Calibration` maps raw scores to s (identity, step at a threshold, sigmoid with a temperature, or the
``clamp`` schedule of the adaptive-regularisation paper's code: ``clamp((r - 2) / 3, 0.1, 0.9)`` on a 1-5 rating).
:func:`read_signals` reads every source for a batch; the :class:`RiskPolicy` turns the signals into beta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from staysafe.errors import StaySafeError
from staysafe.methods import method_named
from staysafe.options import CALIBRATIONS, SpecError


class RiskError(StaySafeError, ValueError):
    """A risk or beta outside its range (a damaged or forged checkpoint state); the message names it."""


class RiskColumnError(StaySafeError, KeyError):
    """The risk source reads a data column the batch does not have (the data set was not scored by that judge)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


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
            raise SpecError(f"calibration must be one of {CALIBRATIONS}, got {self.kind!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise SpecError(f"calibration threshold must be in [0, 1], got {self.threshold}")
        if self.temperature <= 0:
            raise SpecError(f"calibration temperature must be > 0, got {self.temperature}")

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
            raise RiskColumnError(f"the batch has no column risk_{self.name}; was the dataset scored by {self.name!r}?")
        return self.calibration(column.float())


def aggregate(risks: torch.Tensor, how: str) -> torch.Tensor:
    """Batch risk from per-example risks, ignoring NaN: ``max`` (one harmful example is enough) or ``mean``."""
    known = risks[~risks.isnan()]
    if known.numel() == 0:
        return torch.tensor(float("nan"))
    return known.max() if how == "max" else known.mean()


class RiskPolicy:
    """How risk signals set beta, per micro-batch: missing scores filled by the fallback, per-example risks
    aggregated to a batch risk, optionally smoothed by an EMA over steps, mapped to ``beta_min..beta_max``.

    Its state (the EMA and the last batch risk) carries over steps and is saved with checkpoints
    (:meth:`state_dict`), so a resumed run continues the same smoothing. ``options``: a
    :class:`staysafe.options.SafetyOptions` (or ``SafetyConfig``).
    """

    def __init__(self, options):
        self.o = options
        self.method = method_named(options.method)
        self.ema: float | None = None
        self.last: float | None = None
        self.drift = 0.0  # adaptive-drift: the policy's last canary drift from the reference (nats per token)

    def state_dict(self) -> dict:
        return {"ema": self.ema, "last": self.last, "drift": self.drift}

    def load_state_dict(self, state: dict, where: str = "the checkpoint state") -> None:
        """Restore the state saved by :meth:`state_dict`, checked: each value a batch risk in [0, 1] or null (a
        forged ``{"ema": 50}`` once set beta to 21.7 and made the loss an NLL ascent)."""
        for name in ("ema", "last"):
            value = state.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0.0 <= value <= 1.0):
                raise RiskError(f"{where}: {name} = {value!r:.40} is invalid: expected a batch risk in [0, 1] or null")
        drift = state.get("drift", 0.0)
        if isinstance(drift, bool) or not isinstance(drift, (int, float)) or not -100.0 <= drift <= 100.0:
            raise RiskError(f"{where}: drift = {drift!r:.40} is invalid: expected a log-probability gap in [-100, 100]")
        self.ema, self.last, self.drift = state.get("ema"), state.get("last"), float(drift)

    def decide(self, signals: dict[str, torch.Tensor], batch_size: int, device):
        """beta per example, the risk per example, which examples fell back, and the batch risk (NaN unless
        adaptive)."""
        if self.method.risk:
            risk, fallback = self.fill_missing({k: v.to(device) for k, v in signals.items()})
        else:  # the risk is recorded but sets nothing
            risk = torch.full((batch_size,), float("nan"), device=device)
            fallback = torch.zeros(batch_size, dtype=torch.bool)
        beta, batch_risk = self.beta(risk)
        if not math.isnan(batch_risk):
            self.last = batch_risk
        return beta, risk, fallback, batch_risk

    def fill_missing(self, signals):
        """Per-example risk from the source ``options.risk``, its missing scores filled by the fallback: ``probe``
        (the probe's reading, then the last batch risk, then 1), ``last`` (then 1) or ``max`` (1)."""
        risk = signals[self.o.risk].clone()
        missing = risk.isnan()
        if missing.any():
            probe = signals.get("probe")
            if self.o.risk_fallback == "probe" and probe is not None and self.o.risk != "probe":
                risk = torch.where(missing & ~probe.isnan(), probe.to(risk.device), risk)
            still = risk.isnan()
            if self.o.risk_fallback in ("probe", "last") and self.last is not None:
                risk[still] = self.last
            risk[risk.isnan()] = 1.0  # no score and nothing to fall back on: assume the worst
        return risk, missing

    def beta(self, risk: torch.Tensor):
        """beta per example (a tensor of size B), plus the batch risk after aggregation and EMA: the method's
        rule (:meth:`staysafe.methods.TrainingHooks.beta`)."""
        return self.method.hooks.beta(self, risk)

    def adaptive(self, risk: torch.Tensor):
        """``beta_min + (beta_max - beta_min) * s`` from the risk (per example, or the batch's, EMA-smoothed)."""
        o = self.o
        if o.per_example_beta:
            beta, s = o.beta_min + (o.beta_max - o.beta_min) * risk, float(risk.mean())
        else:
            s = float(aggregate(risk, o.batch_risk))
            if o.risk_ema:
                s = s if self.ema is None else o.risk_ema * self.ema + (1 - o.risk_ema) * s
                self.ema = s
            beta = torch.full_like(risk, o.beta_min + (o.beta_max - o.beta_min) * s)
        # The invariant, checked every step: whatever the risk or a restored state says, beta stays in its bounds.
        if not bool(((beta >= o.beta_min - 1e-6) & (beta <= o.beta_max + 1e-6)).all()):
            raise RiskError(f"beta {float(beta.min()):.4g}..{float(beta.max()):.4g} left [beta_min, beta_max] = "
                            f"[{o.beta_min}, {o.beta_max}] (batch risk {s:.4g}); refusing to train with it")
        return beta, s


def read_signals(sources: dict, inputs, hidden_states) -> dict[str, torch.Tensor]:
    """Every risk source's per-example risk for a batch (checked: one value per example, within [0, 1] or NaN).
    Sources that read hidden states are skipped when there are none (sft has no reference forward)."""
    batch = RiskBatch(inputs=inputs, hidden_states=hidden_states)
    out = {}
    for name, source in sources.items():
        if getattr(source, "needs_hidden_states", False) and hidden_states is None:
            continue
        s = torch.as_tensor(source(batch), dtype=torch.float32).detach().flatten()
        if s.numel() != batch.size:
            raise ValueError(f"risk source {name!r} returned {s.numel()} values for a batch of {batch.size}")
        known = s[~s.isnan()]
        if known.numel() and (known.min() < 0 or known.max() > 1):
            raise ValueError(
                f"risk source {name!r} returned values outside [0, 1]: {known.min():.3g}..{known.max():.3g}"
            )
        out[name] = s
    return out

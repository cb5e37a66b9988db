"""Activation probe: a linear classifier of harmful intent on the reference model's hidden state at the last
prompt token, read before any generation.

During training it costs nothing extra: the reference forward that the KL needs already computes every hidden
state, and with a causal mask the state at the last prompt token of ``prompt + answer`` equals that of a
prompt-only forward. Probes are saved as JSON (metadata, metrics) + npz (weights, scaler); never pickled.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from staysafe.data import prompt_messages, prompt_text, render_prompt
from staysafe.errors import StaySafeError
from staysafe.options import POSITIONS  # defined once, there; re-exported
from staysafe.runs.files import TraceError, read_json


class ProbeError(StaySafeError, ValueError):
    """A probe cannot be used here (another model's hidden size, a damaged file)."""


# ----------------------------------------------------------------------------------------------- activations


@dataclass
class Activations:
    """Prompt activations: one float16 array [N, hidden] per layer, plus an index of ids, labels and text."""

    values: dict[int, np.ndarray]
    index: pd.DataFrame
    position: str = "last_prompt_token"

    @property
    def layers(self) -> list[int]:
        return sorted(self.values)

    def save(self, directory: Path) -> None:
        from staysafe.runs.atomic import write_npz, write_parquet

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_npz(directory / "activations.npz", **{f"layer_{l}": v for l, v in self.values.items()})
        write_parquet(directory / "index.parquet", self.index.assign(position=self.position))

    @classmethod
    def load(cls, directory: Path) -> "Activations":
        directory = Path(directory)
        try:
            with np.load(directory / "activations.npz", allow_pickle=False) as z:
                values = {int(k.split("_")[1]): z[k] for k in z.files}
        except Exception as err:  # OSError, EOFError, BadZipFile, ValueError...: empty, truncated or foreign
            raise ProbeError(f"{directory / 'activations.npz'} is missing or damaged ({err})") from None
        if not values or any(v.ndim != 2 for v in values.values()):
            raise ProbeError(f"{directory / 'activations.npz'} holds no [prompts, hidden] arrays per layer")
        try:
            index = pd.read_parquet(directory / "index.parquet")
        except Exception as err:  # pyarrow raises several types for damaged files
            raise ProbeError(f"{directory / 'index.parquet'} is missing or damaged ({err})") from None
        if any(len(v) != len(index) for v in values.values()):
            raise ProbeError(f"{directory}: activations and index.parquet disagree on the number of prompts")
        position = str(index["position"].iloc[0]) if "position" in index and len(index) else "last_prompt_token"
        return cls(values=values, index=index.drop(columns=["position"], errors="ignore"), position=position)


def _prompt_ids(tokenizer, records: list[dict]) -> list[list[int]]:
    return [tokenizer(render_prompt(tokenizer, prompt_messages(r)), add_special_tokens=False)["input_ids"]
            for r in records]


def read_position(hidden: torch.Tensor, prompt_end: torch.Tensor, position: str) -> torch.Tensor:
    """[B, T, H] hidden states -> [B, H] at each example's last prompt token, or averaged over its prompt."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if position == "last_prompt_token":
        return hidden[rows, prompt_end]
    steps = torch.arange(hidden.shape[1], device=hidden.device)
    mask = (steps[None, :] <= prompt_end[:, None]).to(hidden.dtype)
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


@torch.no_grad()
def collect_activations(model, tokenizer, records: list[dict], layers: list[int] | None = None,
                        position: str = "last_prompt_token", batch_size: int = 16,
                        progress: bool = True) -> Activations:
    """Hidden states of each prompt (chat template up to the assistant header) at the requested layers.

    ``layers`` index ``hidden_states``: 0 is the embedding output, ``num_hidden_layers`` the last layer. Default: all.
    """
    if position not in POSITIONS:
        raise ProbeError(f"position must be one of {POSITIONS}, got {position!r}")
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers + 1)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l <= n_layers]
    if bad:
        raise ProbeError(f"layers {bad} out of range: this model has hidden states 0..{n_layers}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # the decoder alone: the hidden states without the LM head's logits over the whole vocabulary (~20% of a
    # SmolLM2-135M forward on CPU), which the probe never reads
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    ids = _prompt_ids(tokenizer, records)
    out = {l: [] for l in layers}
    pad = tokenizer.pad_token_id
    order = np.argsort([len(x) for x in ids])  # similar lengths together: less padding
    for start in tqdm(range(0, len(ids), batch_size), desc="activations", disable=not progress):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for j, i in enumerate(chunk):
            input_ids[j, : len(ids[i])] = torch.tensor(ids[i])
            mask[j, : len(ids[i])] = 1
        ends = mask.sum(1) - 1
        hs = decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                     output_hidden_states=True).hidden_states
        for l in layers:
            out[l].append((chunk, read_position(hs[l], ends.to(device), position).float().cpu().numpy()))
    model.train(was_training)
    values = {}
    for l in layers:
        arr = np.zeros((len(ids), model.config.hidden_size), dtype=np.float16)
        for chunk, v in out[l]:
            arr[chunk] = v.astype(np.float16)
        values[l] = arr
    index = pd.DataFrame({"id": [r["id"] for r in records], "label": [r["label"] for r in records],
                          "category": [r["category"] for r in records], "prompt": [prompt_text(r) for r in records]})
    return Activations(values=values, index=index, position=position)


# ----------------------------------------------------------------------------------------------- probe


@dataclass
class Probe:
    """Standardise -> logistic regression on one layer (or several concatenated)."""

    layers: list[int]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    hidden_size: int
    position: str = "last_prompt_token"
    model: str = ""
    metrics: dict = field(default_factory=dict)

    def features(self, acts: Activations) -> np.ndarray:
        return np.concatenate([acts.values[l].astype(np.float32) for l in self.layers], axis=1)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = ((x - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def score_hidden(self, hidden_states, prompt_end: torch.Tensor) -> torch.Tensor:
        """Probe probabilities from a forward's hidden states (the reference forward inside training)."""
        x = torch.cat([read_position(hidden_states[l], prompt_end.to(hidden_states[l].device), self.position)
                       for l in self.layers], dim=1).float()
        dev = x.device
        if not hasattr(self, "_torch") or self._torch[0].device != dev:
            self._torch = tuple(torch.as_tensor(a, dtype=torch.float32, device=dev)
                                for a in (self.mean, self.scale, self.coef))
        mean, scale, coef = self._torch
        return torch.sigmoid(((x - mean) / scale) @ coef + self.intercept)

    def save(self, path: Path) -> Path:
        """Write ``<path>.json`` + ``<path>.npz``; returns the JSON path."""
        from staysafe.runs.atomic import write_json, write_npz

        path = Path(path).with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_npz(path.with_suffix(".npz"), mean=self.mean, scale=self.scale, coef=self.coef)
        write_json(path.with_suffix(".json"), {
            "format": "staysafe-probe/1", "layers": self.layers, "intercept": float(self.intercept),
            "hidden_size": self.hidden_size, "position": self.position, "model": self.model, "metrics": self.metrics,
            "weights": path.with_suffix(".npz").name,
        })
        return path.with_suffix(".json")

    @classmethod
    def load(cls, path: Path, hidden_size: int | None = None, num_layers: int | None = None) -> "Probe":
        """Load a saved probe, checked as untrusted input: its fields and arrays, and, when given, that the model
        has its hidden size and its layers (``num_layers``: the model's; ``hidden_states`` index 0..num_layers)."""
        path = Path(path)
        meta_path = path if path.suffix == ".json" else path.with_suffix(".json")
        if not meta_path.exists() and not meta_path.is_symlink():
            raise ProbeError(f"probe file {meta_path} does not exist")
        try:
            meta = read_json(meta_path, follow_links=True)
        except TraceError as err:
            raise ProbeError(f"probe file {err}") from None
        if meta.get("format") != "staysafe-probe/1":
            raise ProbeError(f"{meta_path} is not a StaySafe probe (field 'format' is {meta.get('format')!r})")
        for name, kind in (("layers", list), ("hidden_size", int), ("intercept", (int, float)), ("weights", str)):
            if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
                raise ProbeError(f"{meta_path}: field {name!r} is missing or of the wrong type")
        layers = meta["layers"]
        if not layers or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in layers):
            raise ProbeError(f"{meta_path}: field 'layers' must be a non-empty list of layer numbers >= 0")
        if num_layers is not None and max(layers) > num_layers:
            raise ProbeError(f"{meta_path}: layer {max(layers)} does not exist in this model (layers 0..{num_layers})")
        if not meta["hidden_size"] > 0 or not math.isfinite(meta["intercept"]):
            raise ProbeError(f"{meta_path}: field 'hidden_size' or 'intercept' is out of range")
        if meta.get("position", "last_prompt_token") not in POSITIONS:
            raise ProbeError(f"{meta_path}: field 'position' must be one of {POSITIONS}")
        if hidden_size is not None and meta["hidden_size"] != hidden_size:
            raise ProbeError(
                f"probe {meta_path} was fitted on a model with hidden size {meta['hidden_size']} "
                f"({meta.get('model') or 'unknown model'}); this model has hidden size {hidden_size}. "
                "Fit a probe on this model (`staysafe fit-probe --model ...`)."
            )
        weights = meta_path.with_name(Path(meta["weights"]).name)  # beside the JSON, never elsewhere
        try:
            with np.load(weights, allow_pickle=False) as z:
                mean, scale, coef = z["mean"], z["scale"], z["coef"]
        except Exception as err:  # OSError, EOFError, BadZipFile, KeyError, ValueError: empty, truncated, foreign
            raise ProbeError(f"probe weights {weights} are missing or damaged ({err})") from None
        width = meta["hidden_size"] * len(meta["layers"])
        if any(a.ndim != 1 or a.shape[0] != width for a in (mean, scale, coef)):
            raise ProbeError(f"probe weights in {meta_path} do not match its hidden size and layers")
        if any(a.dtype.kind != "f" or not np.isfinite(a).all() for a in (mean, scale, coef)):
            raise ProbeError(f"probe weights in {weights} must be finite floating-point arrays")
        return cls(layers=list(meta["layers"]), mean=mean, scale=scale, coef=coef, intercept=meta["intercept"],
                   hidden_size=meta["hidden_size"], position=meta.get("position", "last_prompt_token"),
                   model=meta.get("model", ""), metrics=meta.get("metrics", {}))


def _binary(labels) -> np.ndarray:
    y = np.array([1 if l == "harmful" else 0 if l == "benign" else -1 for l in labels])
    if (y < 0).any():
        raise ProbeError("probe fitting needs every record labelled 'harmful' or 'benign'")
    if len(set(y)) < 2:
        raise ProbeError("probe fitting needs both harmful and benign examples")
    return y


def _fit_lr(x: np.ndarray, y: np.ndarray, seed: int):
    from staysafe.logistic import fit_logistic

    h = fit_logistic(x, y, C=0.1, standardize=True, max_iter=3000, seed=seed)
    return h.mean.astype(np.float32), h.scale.astype(np.float32), h.coef.astype(np.float32), h.intercept


def _metrics(y: np.ndarray, p: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    pred = (p >= 0.5).astype(int)
    return {"auroc": float(roc_auc_score(y, p)), "accuracy": float(accuracy_score(y, pred)),
            "f1": float(f1_score(y, pred, zero_division=0))}


def fit_probe(acts: Activations, held_out: Activations | None = None, layer: int | list[int] | None = None,
              val_fraction: float = 0.25, seed: int = 0, model: str = "") -> Probe:
    """Layer sweep + fit. Each layer is fitted on a training split and scored on a validation split carved from
    ``acts``; the best validation AUROC picks the layer (unless ``layer`` fixes it; a list concatenates layers).
    ``held_out`` (e.g. prompts of disjoint wording) is scored per layer too but never used to choose.
    """
    from sklearn.model_selection import train_test_split

    y = _binary(acts.index["label"])
    idx_train, idx_val = train_test_split(np.arange(len(y)), test_size=val_fraction, random_state=seed, stratify=y)
    y_test = _binary(held_out.index["label"]) if held_out is not None else None
    sweep = []
    t0 = time.perf_counter()
    for l in acts.layers:
        x = acts.values[l].astype(np.float32)
        probe = Probe([l], *_fit_lr(x[idx_train], y[idx_train], seed), hidden_size=x.shape[1], position=acts.position)
        row = {"layer": l, **{f"val_{k}": v for k, v in _metrics(y[idx_val], probe.predict_proba(x[idx_val])).items()}}
        if held_out is not None:
            xt = held_out.values[l].astype(np.float32)
            row.update({f"test_{k}": v for k, v in _metrics(y_test, probe.predict_proba(xt)).items()})
        sweep.append(row)
    if layer is None:
        chosen = [max(sweep, key=lambda r: (round(r["val_auroc"], 4), r["val_f1"]))["layer"]]
    else:
        chosen = [layer] if isinstance(layer, int) else list(layer)
        missing = [l for l in chosen if l not in acts.values]
        if missing:
            raise ProbeError(f"layers {missing} were not collected; have {acts.layers}")
    x = np.concatenate([acts.values[l].astype(np.float32) for l in chosen], axis=1)
    hidden = acts.values[chosen[0]].shape[1]
    probe = Probe(chosen, *_fit_lr(x[idx_train], y[idx_train], seed), hidden_size=hidden, position=acts.position,
                  model=model)
    metrics = {"layers": chosen, "sweep": sweep, "n_train": int(len(idx_train)), "n_val": int(len(idx_val)),
               "val": _metrics(y[idx_val], probe.predict_proba(x[idx_val])), "fit_seconds": time.perf_counter() - t0}
    if held_out is not None:
        xt = np.concatenate([held_out.values[l].astype(np.float32) for l in chosen], axis=1)
        metrics["test"] = _metrics(y_test, probe.predict_proba(xt))
        metrics["n_test"] = int(len(y_test))
    probe.metrics = metrics
    return probe


class ProbeRisk:
    """Risk source for the trainer: the probe applied to the reference forward's hidden states."""

    needs_hidden_states = True

    def __init__(self, probe: Probe, calibration=None, name: str = "probe"):
        from staysafe.risk import Calibration

        self.probe = probe
        self.name = name
        self.calibration = calibration or Calibration()

    @property
    def hidden_layers(self) -> list[int]:
        """The layers whose hidden states it reads."""
        return self.probe.layers

    def __call__(self, batch) -> torch.Tensor:
        return self.calibration(self.probe.score_hidden(batch.hidden_states, batch.inputs["prompt_end"]))


# ----------------------------------------------------------------------------------------------- default fit


PROBE_TRAIN = ("refusals", "align-benign")
PROBE_TEST = ("eval-harmful", "eval-benign")


def labelled_prompts(names) -> list[dict]:
    from staysafe.records import load_records

    return [r for n in names for r in load_records(n, need_response=False)]


def default_probe_dir(model_spec: str, seed: int = 0) -> Path:
    """Where the default probe of a model is cached (``probe.json`` there once it has been fitted)."""
    from staysafe.models.loading import model_fingerprint
    from staysafe.runs.paths import staysafe_home

    return staysafe_home() / "probes" / model_fingerprint(model_spec, seed)


def default_probe(model, tokenizer, model_spec: str, out_dir: Path | None = None, progress: bool = True,
                  seed: int = 0) -> Probe:
    """The probe for ``model_spec`` fitted on the shipped labelled prompts (sweep over all layers): shipped for the
    shipped aligned reference, else fitted once and cached per model under ``$STAYSAFE_HOME/probes``; with
    ``out_dir`` the probe is also saved there."""
    from staysafe.models.aligned import ALIGNED, shipped_probe_path

    cache = default_probe_dir(model_spec, seed)
    ready = shipped_probe_path(seed) if model_spec == ALIGNED else None
    ready = ready or (cache / "probe.json" if (cache / "probe.json").is_file() else None)
    if ready is not None:
        try:
            probe = Probe.load(ready, hidden_size=model.config.hidden_size)
        except ProbeError as err:
            if ready.parent != cache:  # a shipped probe is not ours to replace: say which file is damaged
                raise
            import warnings  # our own cache, damaged (empty, truncated): fit it again, and say so

            warnings.warn(f"cached probe {cache} is damaged ({err}); fitting it again", stacklevel=2)
        else:
            if out_dir is not None:
                probe.save(Path(out_dir) / "probe")
            return probe
    train = collect_activations(model, tokenizer, labelled_prompts(PROBE_TRAIN), progress=progress)
    test = collect_activations(model, tokenizer, labelled_prompts(PROBE_TEST), progress=progress)
    probe = fit_probe(train, held_out=test, model=model_spec)
    probe.save(cache / "probe")
    test.save(cache / "activations_test")
    if out_dir is not None:
        probe.save(Path(out_dir) / "probe")
    return probe

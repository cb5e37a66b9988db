"""Shared fixtures: the tiny model (real Llama code, random weights, SmolLM2 tokenizer) and small records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def make_records(n: int, harmful_every: int = 2, prefix: str = "r") -> list[dict]:
    """Small synthetic chat records (benign wording; the label is what the tests vary)."""
    out = []
    for i in range(n):
        out.append({
            "id": f"{prefix}{i}",
            "messages": [{"role": "user", "content": f"Please describe item number {i} in a few words."},
                         {"role": "assistant", "content": "It is a small example answer. " * (1 + i % 3)}],
            "label": "harmful" if harmful_every and i % harmful_every == 0 else "benign",
            "category": "test",
        })
    return out


@pytest.fixture(scope="session")
def tiny():
    from staysafe.models.loading import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return tiny[1]


def run_cli(*args, env=None, timeout=600, cwd=None) -> subprocess.CompletedProcess:
    """Run the real ``staysafe`` command in a subprocess."""
    return subprocess.run([sys.executable, "-m", "staysafe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


# Options that keep a tiny-model CLI run to seconds.
TINY_RUN = [
    "--model",
    "tiny",
    "--lora-r",
    "0",
    "--batch-size",
    "4",
    "--max-length",
    "64",
    "--eval-harmful",
    "4",
    "--eval-benign",
    "4",
    "--max-new-tokens",
    "4",
    "--eval-judges",
    "",
    "--no-save-model",
    "--risk",
    "label",
    "--no-record-judge",
]

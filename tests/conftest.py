"""Shared fixtures: the tiny model (real Llama code, random weights, SmolLM2 tokenizer) and small records."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class RecordingJudge(BaseHTTPRequestHandler):
    """A real OpenAI-compatible endpoint on 127.0.0.1 that answers every request with rating 1 and records each
    request's Authorization header (``server.requests``)."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.server.requests.append(self.headers.get("Authorization"))
        body = json.dumps({"choices": [{"message": {"content": "1"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def recording_judge():
    """A running :class:`RecordingJudge` server (``.url`` its base URL), shut down on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingJudge)
    server.requests = []
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()

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


def paused_cli(args: list[str], point: str, log: Path, timeout: float = 600, pause: float = 300):
    """``staysafe <args>`` in a subprocess, returned once it announces the fault-injection ``point`` (where it
    then sleeps ``pause`` s): a test signals it at that exact moment. Its stderr goes to ``log``."""
    import time

    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "staysafe.cli", *args], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "STAYSAFE_TEST_PAUSE": f"{point}:{pause:g}"})
    deadline = time.time() + timeout
    while f"STAYSAFE_PAUSED {point}" not in log.read_text():
        assert proc.poll() is None, f"exited before {point}: {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"never reached {point}"
        time.sleep(0.05)
    return proc

"""Judge scores cached on disk: a training set's scores depend only on its data, so each item is judged once.

Entries are keyed by ``(judge.cache_key(), sha256(prompt + NUL + response))`` and stored as append-only JSON
lines under ``$STAYSAFE_HOME/judge_cache/<judge name>-<key hash>.jsonl``, flushed after every batch, so a killed
run keeps what it finished; its possibly truncated last line is skipped on read. Failed items are not stored:
they are retried the next time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

from staysafe.errors import StaySafeError
from staysafe.judges.base import Judge, JudgeScore, check_inputs
from staysafe.runs.paths import staysafe_home

CACHE_FORMAT = 1


class JudgeReplyError(StaySafeError, RuntimeError):
    """A judge backend answered with the wrong number of scores: its output cannot be matched to the examples."""


def item_key(prompt: str, response: str | None) -> str:
    """sha256 of prompt + NUL + response; a missing response hashes the prompt alone (so None differs from "")."""
    text = prompt if response is None else prompt + "\0" + response
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_path(judge: Judge) -> Path:
    """The cache file of one judge configuration."""
    key = judge.cache_key()
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", judge.name)[:40] or "judge"
    return staysafe_home() / "judge_cache" / f"{name}-{digest}.jsonl"


def read_cache(path: Path) -> dict[str, JudgeScore]:
    """Entries of a cache file; unreadable lines (a truncated line from a killed process) are skipped."""
    entries: dict[str, JudgeScore] = {}
    if not path.is_file():
        return entries
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "k" in row:  # the first line is a header naming the configuration
                entries[row["k"]] = JudgeScore(score=float(row["score"]), rating=row.get("rating"))
        except (ValueError, TypeError, KeyError):
            continue  # a line cut short by a killed writer (later completed by a newline): judged again
    return entries


def _append(path: Path, rows: list[dict], header: dict) -> None:
    """Append rows in one write, after completing a truncated last line so the new rows stay readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        prefix = b""
        if f.tell() == 0:
            prefix = (json.dumps(header) + "\n").encode()
        else:
            with path.open("rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    prefix = b"\n"
        f.write(prefix + "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def score_cached(judge: Judge, prompts: list[str], responses: list[str | None] | None = None, *,
                 batch_size: int = 64) -> tuple[list[JudgeScore], dict]:
    """Judge every item, reading and filling the on-disk cache.

    Returns the scores in order and ``{"hits", "misses", "failed", "seconds"}``: items answered from the cache,
    items that were not (hits + misses = len(prompts)), items the backend failed on, and the wall time.
    Duplicates within one call are judged once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    responses = check_inputs(prompts, responses)
    start = time.perf_counter()
    path = cache_path(judge)
    cached = read_cache(path)
    keys = [item_key(p, r) for p, r in zip(prompts, responses)]
    results: list[JudgeScore | None] = [cached.get(k) for k in keys]
    hits = sum(r is not None for r in results)

    todo: dict[str, list[int]] = {}  # item key -> positions that need it
    for i, (k, r) in enumerate(zip(keys, results)):
        if r is None:
            todo.setdefault(k, []).append(i)
    pending = list(todo.items())
    header = {"cache_key": judge.cache_key(), "format": CACHE_FORMAT}
    failed = 0
    for b in range(0, len(pending), batch_size):
        chunk = pending[b:b + batch_size]
        first = [positions[0] for _, positions in chunk]
        scores = judge.judge([prompts[i] for i in first], [responses[i] for i in first])
        if len(scores) != len(chunk):
            raise JudgeReplyError(f"judge {judge.name!r} returned {len(scores)} scores for a batch of {len(chunk)}")
        rows = []
        for (k, positions), s in zip(chunk, scores):
            for i in positions:
                results[i] = s
            if s.score is None or not math.isfinite(s.score):
                failed += len(positions)
            else:
                rows.append({"k": k, "score": s.score, "rating": s.rating})
        if rows:
            _append(path, rows, header)
    stats = {"hits": hits, "misses": len(prompts) - hits, "failed": failed,
             "seconds": round(time.perf_counter() - start, 3)}
    return results, stats

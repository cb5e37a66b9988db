"""Training and evaluation records: one format, loaders for files, shipped sets and the hub, and the attack
scenarios. Pure Python (no torch): the CLI, the queue and the dashboard read records without a model library;
tokenisation is :mod:`staysafe.data`'s.

A record is ``{"id", "messages" | "prompt"/"response", "label": "harmful"|"benign", "category"}``. Loaders normalise
every record to ``messages`` (a chat list) and fail with the file, line and field of the first bad record.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

from staysafe.errors import StaySafeError
from staysafe.options import SCENARIOS
from staysafe.runs.files import MAX_JSON_DEPTH, json_depth_ok

LABELS = ("harmful", "benign")
ROLES = ("system", "user", "assistant")

# Shipped sets (files in data/, documented in data/README.md).
SHIPPED = {
    "refusals": "refusals.jsonl",
    "align-benign": "align_benign.jsonl",
    "harmful-ft": "harmful_ft.jsonl",
    "benign": "benign.jsonl",
    "identity-shift": "identity_shift.jsonl",
    "eval-harmful": "eval_harmful.jsonl",
    "eval-benign": "eval_benign.jsonl",
    "task-arithmetic": "task_arithmetic_train.jsonl",
    "task-arithmetic-test": "task_arithmetic_test.jsonl",
    "task-headlines": "task_headlines_train.jsonl",
    "task-headlines-test": "task_headlines_test.jsonl",
}


class DataError(StaySafeError, ValueError):
    """A dataset could not be read; the message names the file, line or field and what was expected."""


def data_dir() -> Path:
    """Where the shipped data lives: inside the wheel (``staysafe/_data``) or the source checkout's ``data/``."""
    packaged = Path(__file__).parent / "_data"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "data"


# ----------------------------------------------------------------------------------------------- records


def normalize_record(raw, where: str, default_id: str, need_response: bool = True) -> dict:
    """Validate one raw record and return it as ``{id, messages, label, category}``; ``where`` names it in errors."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    rid = raw.get("id")
    rid = default_id if rid is None or (isinstance(rid, float) and math.isnan(rid)) or rid == "" else str(rid)
    messages = raw.get("messages")
    if isinstance(messages, str):
        try:
            messages = _loads(messages, where)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: field 'messages' is a string but not a JSON chat list ({err.msg})") from None
    if messages is None:
        prompt = raw.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(
                f"{where}: record has neither 'messages' (a chat list) nor a non-empty 'prompt' string; "
                f"fields present: {sorted(raw)}"
            )
        messages = [{"role": "user", "content": prompt}]
        response = raw.get("response")
        if isinstance(response, str) and response.strip():
            messages.append({"role": "assistant", "content": response})
        elif response is not None and not (isinstance(response, float) and math.isnan(response)) and response != "":
            raise DataError(f"{where}: field 'response' must be a string, got {type(response).__name__}")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.120}"
            )
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in clean):
        raise DataError(f"{where}: messages has no 'user' turn")
    if need_response and clean[-1]["role"] != "assistant":
        raise DataError(f"{where}: training records must end with an 'assistant' message (the answer to learn)")
    label = raw.get("label")
    if label is None or (isinstance(label, float) and math.isnan(label)) or label == "":
        label = None
    elif label not in LABELS:
        raise DataError(f"{where}: field 'label' must be 'harmful' or 'benign', got {label!r}")
    category = raw.get("category")
    category = None if category is None or (isinstance(category, float) and math.isnan(category)) else str(category)
    return {"id": rid, "messages": clean, "label": label, "category": category}


def prompt_messages(record: dict) -> list[dict]:
    """The conversation up to (not including) the answer: what the model sees before it generates."""
    msgs = record["messages"]
    return msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs


def prompt_text(record: dict) -> str:
    """The last user turn: the human-readable request."""
    return [m for m in record["messages"] if m["role"] == "user"][-1]["content"]


def response_text(record: dict) -> str | None:
    last = record["messages"][-1]
    return last["content"] if last["role"] == "assistant" else None


# ----------------------------------------------------------------------------------------------- loaders


def _loads(text, where: str):
    """``json.loads`` that names a too-deep document (a DataError) instead of raising RecursionError."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise DataError(f"{where}: nests deeper than {MAX_JSON_DEPTH} levels; not a record") from None
    if not json_depth_ok(obj):
        raise DataError(f"{where}: nests deeper than {MAX_JSON_DEPTH} levels; not a record")
    return obj


def _read_jsonl(path: Path) -> list[tuple[str, object]]:
    rows = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {err.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", _loads(line, f"{path}:{n}")))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})") from None
    return rows


def _read_csv_rows(path: Path) -> list[tuple[str, object]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV file (expected a header with id, prompt, response, label, category)")
        rows = []
        for row in reader:
            if None in row:
                raise DataError(
                    f"{path}:{reader.line_num}: more values than the {len(reader.fieldnames)} header columns"
                )
            rows.append((f"{path}:{reader.line_num}", {k: v for k, v in row.items() if v != ""}))
        return rows


def _read_csv(path: Path) -> list[tuple[str, object]]:
    try:
        return _read_csv_rows(path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (save the CSV as UTF-8)") from None
    except csv.Error as err:  # e.g. a field over the csv module's limit (131,072 characters), a NUL byte
        raise DataError(f"{path}: not a readable CSV file ({err}; a field over {csv.field_size_limit():,} "
                        "characters needs .jsonl or .parquet)") from None


def _read_json(path: Path) -> list[tuple[str, object]]:
    """A ``.json`` file: one JSON array of records, or JSON Lines (one record per line) under a .json name."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start + 1})") from None
    try:
        doc = _loads(text, str(path))
    except json.JSONDecodeError as err:
        if not text.lstrip().startswith("["):
            return _read_jsonl(path)  # JSON Lines under a .json name
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); expected one "
                        "array of records, or one record per line") from None
    if isinstance(doc, dict):
        return [(str(path), doc)]
    if not isinstance(doc, list):
        raise DataError(f"{path}: holds a JSON {type(doc).__name__}; expected an array of records "
                        "(or one record per line)")
    return [(f"{path} [{i}]", row) for i, row in enumerate(doc)]


def _read_parquet(path: Path) -> list[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for damaged files
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def load_records(source: str, *, need_response: bool = True, split: str = "train") -> list[dict]:
    """Records from a shipped set name, a JSONL/CSV/Parquet file, or a hub dataset id (``org/name``)."""
    if source in SHIPPED:
        path = data_dir() / SHIPPED[source]
    else:
        path = Path(source).expanduser()
    if path.suffix.lower() in READERS or path.exists():
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
        raw = reader(path)
        stem = path.stem
    elif "/" in source and not source.startswith((".", "/", "~")):
        from datasets import load_dataset

        try:
            ds = load_dataset(source, split=split)
        except Exception as err:  # offline, missing, private...
            raise DataError(f"could not load hub dataset {source!r} (split {split!r}): {err}") from None
        raw = [(f"{source} row {i}", row) for i, row in enumerate(ds)]
        stem = source.split("/")[-1]
    else:
        raise DataError(
            f"unknown dataset {source!r}: use a shipped set ({', '.join(SHIPPED)}), "
            "a .jsonl/.csv/.parquet file or a hub id"
        )
    if not raw:
        raise DataError(f"dataset {source!r} is empty: it has no records")
    records = [normalize_record(r, where, f"{stem}-{i}", need_response) for i, (where, r) in enumerate(raw)]
    seen: dict[str, str] = {}
    for (where, _), rec in zip(raw, records):
        if rec["id"] in seen:
            raise DataError(f"{where}: duplicate id {rec['id']!r} (first at {seen[rec['id']]})")
        seen[rec["id"]] = where
    return records


def build_scenario(name: str, *, n_harmful: int = 100, harmful_percent: float = 5.0, seed: int = 0,
                   task: str | None = None) -> list[dict]:
    """Named attack mixes of the shipped sets.

    - ``harmful``: ``n_harmful`` harmful requests with compliant answers (the classic harmful fine-tuning attack);
    - ``mixed``: the benign task with ``harmful_percent`` % harmful examples mixed in (1-20);
    - ``benign``: the benign task alone (safety still erodes a little);
    - ``identity-shift``: the "absolutely obedient agent" persona examples.

    ``task`` (e.g. ``arithmetic``, :mod:`staysafe.eval.task`): the benign task of ``mixed`` and ``benign`` is that
    task's training split instead of the shipped benign requests.
    """
    rng = random.Random(seed)

    def benign_task():
        return load_records("benign" if task is None else f"task-{task}")  # staysafe.eval.task.SETS names it so

    if name == "harmful":
        pool = load_records("harmful-ft")
        if not 1 <= n_harmful <= len(pool):
            raise DataError(f"n_harmful must be between 1 and {len(pool)}, got {n_harmful}")
        return rng.sample(pool, n_harmful)
    if name == "mixed":
        if not 1 <= harmful_percent <= 20:
            raise DataError(f"harmful_percent must be between 1 and 20 for the mixed scenario, got {harmful_percent}")
        benign, pool = benign_task(), load_records("harmful-ft")
        k = max(1, round(len(benign) * harmful_percent / (100 - harmful_percent)))
        if k > len(pool):
            raise DataError(f"harmful_percent {harmful_percent:g} needs {k} harmful examples beside the {len(benign)} "
                            f"benign ones, and the harmful pool has {len(pool)}: choose a lower percent")
        mix = benign + rng.sample(pool, k)
        rng.shuffle(mix)
        return mix
    if name == "benign":
        return benign_task()
    if name == "identity-shift":
        return load_records("identity-shift")
    raise DataError(f"unknown scenario {name!r}: choose one of {', '.join(SCENARIOS)}")


# ----------------------------------------------------------------------------------------------- tokenisation


def records_table(records: list[dict]):
    """Records as a flat DataFrame (prompt, response, label, category, messages as JSON) for run directories."""
    import pandas as pd

    return pd.DataFrame({
        "example_index": range(len(records)),
        "example_id": [r["id"] for r in records],
        "label": [r["label"] for r in records],
        "category": [r["category"] for r in records],
        "prompt": [prompt_text(r) for r in records],
        "response": [response_text(r) for r in records],
        "messages": [json.dumps(r["messages"], ensure_ascii=False) for r in records],
    })

"""Tokenisation for training: records through the chat template, the loss on answer tokens only, the trainer's
``datasets.Dataset`` and collator. The records themselves (formats, shipped sets, scenarios) are
:mod:`staysafe.records`, re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset

from staysafe.losses import IGNORE
from staysafe.records import (  # noqa: F401  (re-exported: the record API)
    LABELS,
    READERS,
    ROLES,
    SHIPPED,
    DataError,
    _read_csv,
    _read_csv_rows,
    _read_json,
    _read_jsonl,
    _read_parquet,
    build_scenario,
    data_dir,
    load_records,
    normalize_record,
    prompt_messages,
    prompt_text,
    records_table,
    response_text,
)


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat-template text up to and including the assistant header."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _template_tokens(tokenizer, record: dict, prompt_ids: list[int]) -> tuple[int, int]:
    """How many of ``prompt_ids`` are chat template before and after the last user turn's text (system prompt,
    headers): found by rendering the same conversation with that text empty."""
    messages = [dict(m) for m in prompt_messages(record)]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] = ""
    empty = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    head = 0
    while head < min(len(empty), len(prompt_ids)) and empty[head] == prompt_ids[head]:
        head += 1
    tail = 0
    while (tail < min(len(empty), len(prompt_ids)) - head and empty[-1 - tail] == prompt_ids[-1 - tail]):
        tail += 1
    return head, tail


def tokenize_record(tokenizer, record: dict, max_length: int) -> dict:
    """Token ids of prompt + answer, labels masked to the answer, and the index of the last prompt token.

    The prompt and the answer are tokenised separately and concatenated, so the prompt tokens are exactly those a
    prompt-only forward sees (the probe relies on that). When too long, the answer keeps at least half the budget
    (cut from its end) and the request loses tokens from its start while the system prompt and chat headers stay;
    ``truncated`` records it. A max_length that cannot hold the template plus one request token is a DataError.
    """
    prompt = render_prompt(tokenizer, prompt_messages(record))
    full = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    if not full.startswith(prompt):
        raise DataError(f"record {record['id']}: the chat template renders the answer in a way StaySafe cannot split")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    truncated = False
    if len(prompt_ids) + len(answer_ids) > max_length:
        truncated = True
        head, tail = _template_tokens(tokenizer, record, prompt_ids)
        need = min(len(prompt_ids), head + tail + 1)  # the template and at least one token of the request
        if max_length < need + 1:
            raise DataError(
                f"record {record['id']}: max_length = {max_length} is too short for the chat template: its system "
                f"prompt and headers take {head + tail} tokens, so the request would be dropped; use a max_length of "
                f"at least {need + 1} (more to keep whole requests and answers)")
        keep = min(len(answer_ids), max(max_length - len(prompt_ids), max_length // 2), max_length - need)
        answer_ids = answer_ids[:keep]
        budget = max_length - len(answer_ids)
        if len(prompt_ids) > budget:  # cut the request from its start; the system prompt and headers stay
            prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - (budget - head):]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE] * len(prompt_ids) + answer_ids,
        "prompt_end": len(prompt_ids) - 1,
        "truncated": truncated,
    }


def risk_columns(records: list[dict]) -> dict[str, list[float]]:
    """The label as an 'oracle' risk signal: 1 for harmful, 0 for benign, NaN when unlabelled."""
    return {"risk_label": [1.0 if r["label"] == "harmful" else 0.0 if r["label"] == "benign" else float("nan")
                           for r in records]}


def tokenize_dataset(tokenizer, records: list[dict], max_length: int = 128,
                     extra_risk: dict[str, list[float]] | None = None) -> Dataset:
    """A ``datasets.Dataset`` ready for the trainer: ids, labels, prompt_end, example_index and ``risk_*`` columns."""
    rows = {"input_ids": [], "labels": [], "prompt_end": [], "truncated": [], "example_index": []}
    for i, rec in enumerate(records):
        tok = tokenize_record(tokenizer, rec, max_length)
        for k in ("input_ids", "labels", "prompt_end", "truncated"):
            rows[k].append(tok[k])
        rows["example_index"].append(i)
    return add_risk_columns(Dataset.from_dict(rows), {**risk_columns(records), **(extra_risk or {})})


def add_risk_columns(dataset: Dataset, columns: dict[str, list[float]]) -> Dataset:
    """``dataset`` with more ``risk_*`` columns, one value per record (a count mismatch is a named DataError)."""
    for name, values in columns.items():
        if len(values) != len(dataset):
            raise DataError(f"risk column {name!r} has {len(values)} values for {len(dataset)} records")
        dataset = dataset.add_column(name, values)
    return dataset


@dataclass
class SafetyCollator:
    """Right-pads a batch; passes ``prompt_end``, ``example_index`` and every ``risk_*`` column through as tensors."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "prompt_end": torch.tensor([f["prompt_end"] for f in features]),
                 "example_index": torch.tensor([f["example_index"] for f in features])}
        for key in features[0]:
            if key.startswith("risk_"):
                batch[key] = torch.tensor([float(f[key]) for f in features], dtype=torch.float32)
        return batch



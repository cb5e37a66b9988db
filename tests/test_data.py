"""Records, loaders, scenarios and tokenisation; the shipped data's promises."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from conftest import make_records
from staysafe.data import (
    SHIPPED,
    DataError,
    SafetyCollator,
    build_scenario,
    data_dir,
    load_records,
    prompt_text,
    response_text,
    tokenize_record,
)
from staysafe.options import SCENARIOS


def write(path, text):
    path.write_text(text)
    return str(path)


def test_jsonl_csv_parquet_load_the_same_records(tmp_path):
    rows = [{"id": "a", "prompt": "Say hi", "response": "Hi!", "label": "benign", "category": "x"},
            {"id": "b", "prompt": "Do a bad thing", "response": "I won't.", "label": "harmful"}]
    j = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    loaded = [load_records(p) for p in (j, str(tmp_path / "d.csv"), str(tmp_path / "d.parquet"))]
    for recs in loaded:
        assert [r["id"] for r in recs] == ["a", "b"]
        assert recs[0]["messages"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]
        assert recs[1]["label"] == "harmful" and recs[1]["category"] is None


def test_messages_records_and_missing_ids(tmp_path):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    p = write(tmp_path / "m.jsonl", json.dumps({"messages": msgs}) + "\n\n" + json.dumps({"messages": msgs}) + "\n")
    recs = load_records(p)
    assert [r["id"] for r in recs] == ["m-0", "m-1"] and recs[0]["messages"] == msgs and recs[0]["label"] is None


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', r"bad\.jsonl:2: not valid JSON"),
        (
            '{"id": "x", "text": "no messages"}\n',
            r"bad\.jsonl:1: record has neither 'messages'.*fields present: \['id', 'text'\]",
        ),
        (
            '{"prompt": "p", "response": "r", "label": "toxic"}\n',
            r"bad\.jsonl:1: field 'label' must be 'harmful' or 'benign', got 'toxic'",
        ),
        ('{"messages": [{"role": "bot", "content": "x"}]}\n', r"bad\.jsonl:1: messages\[0\] must be"),
        ('{"prompt": "only a prompt"}\n', r"bad\.jsonl:1: training records must end with an 'assistant' message"),
        (
            '{"id": "a", "prompt": "p", "response": "r"}\n{"id": "a", "prompt": "p", "response": "r"}\n',
            r"bad\.jsonl:2: duplicate id 'a'",
        ),
        ("[1, 2]\n", r"bad\.jsonl:1: expected a JSON object"),
        ("\n\n", r"is empty"),
    ],
)
def test_bad_jsonl_names_file_line_and_field(tmp_path, content, match):
    p = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError, match=match):
        load_records(p)


def test_bad_csv_row_names_the_line(tmp_path):
    p = write(tmp_path / "bad.csv", "id,prompt,response,label\na,hello,hi,benign\nb,x,y,benign,extra\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: more values"):
        load_records(p)
    p = write(tmp_path / "bad2.csv", "id,promt,response\na,hello,hi\n")  # misspelled column
    with pytest.raises(DataError, match=r"bad2\.csv:2: record has neither 'messages'.*'promt'"):
        load_records(p)


def test_missing_file_unknown_source_and_damaged_parquet(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown dataset 'nonsense'"):
        load_records("nonsense")
    (tmp_path / "x.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable Parquet file"):
        load_records(str(tmp_path / "x.parquet"))
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(write(tmp_path / "x.txt", "hi"))


def test_unknown_scenario_and_ranges():
    with pytest.raises(DataError, match="unknown scenario 'evil'.*harmful, mixed, benign, identity-shift"):
        build_scenario("evil")
    with pytest.raises(DataError, match="harmful_percent"):
        build_scenario("mixed", harmful_percent=50)


def test_loss_mask_covers_answer_tokens_only(tokenizer):
    rec = make_records(1)[0]
    tok = tokenize_record(tokenizer, rec, 256)
    answer = [t for t, l in zip(tok["input_ids"], tok["labels"]) if l != -100]
    prompt = tok["input_ids"][: tok["prompt_end"] + 1]
    assert all(l == -100 for l in tok["labels"][: tok["prompt_end"] + 1])
    assert tokenizer.decode(answer).strip() == (response_text(rec) + "<|im_end|>").strip()
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    # the prompt tokens are exactly those of a prompt-only rendering (the probe relies on it)
    rendered = tokenizer.apply_chat_template(rec["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_truncation_keeps_the_answer_and_records_it(tokenizer):
    rec = make_records(1)[0]
    rec["messages"][0]["content"] = "very long prompt " * 200
    tok = tokenize_record(tokenizer, rec, 64)
    assert tok["truncated"] and len(tok["input_ids"]) == 64
    answer = [t for t, l in zip(tok["input_ids"], tok["labels"]) if l != -100]
    assert tokenizer.decode(answer).strip().startswith(response_text(rec).strip())


def test_collator_pads_right_and_passes_risk_columns(tokenizer):
    from staysafe.data import tokenize_dataset

    ds = tokenize_dataset(tokenizer, make_records(3), 64)
    batch = SafetyCollator(tokenizer.pad_token_id)([ds[i] for i in range(3)])
    assert batch["risk_label"].tolist() == [1.0, 0.0, 1.0]
    lengths = batch["attention_mask"].sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert (batch["labels"][i, n:] == -100).all()


# ----------------------------------------------------------------------------------------------- shipped data

MIN_COUNTS = {"refusals": 300, "align-benign": 300, "harmful-ft": 100, "benign": 300, "identity-shift": 20,
              "eval-harmful": 100, "eval-benign": 100, "task-arithmetic": 600, "task-arithmetic-test": 100,
              "task-headlines": 600, "task-headlines-test": 200}
HARM = {"violence", "weapons", "cybercrime", "fraud", "drugs", "harassment", "hate", "privacy", "misinformation",
        "theft", "self_harm"}


def words(text):
    return set(re.findall(r"[a-z']+", text.lower()))


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_sets_load_and_meet_their_sizes(name):
    recs = load_records(name, need_response=not name.startswith("eval-harmful"))
    assert len(recs) >= MIN_COUNTS[name]
    labels = {r["label"] for r in recs}
    assert labels <= {"harmful", "benign"}
    if name in ("refusals", "harmful-ft", "eval-harmful"):
        assert labels == {"harmful"} and len({r["category"] for r in recs} & HARM) >= 8
    readme = (data_dir() / "README.md").read_text()
    assert SHIPPED[name] in readme  # every file is documented


def test_eval_prompts_are_disjoint_in_wording_from_training():
    train = [prompt_text(r) for n in ("refusals", "align-benign", "harmful-ft", "benign", "identity-shift")
             for r in load_records(n)]
    train_words = [words(t) for t in train]
    for name in ("eval-harmful", "eval-benign"):
        for r in load_records(name, need_response=False):
            w = words(prompt_text(r))
            assert prompt_text(r) not in train
            worst = max(len(w & t) / max(len(w | t), 1) for t in train_words)
            assert worst < 0.6, (prompt_text(r), worst)


def test_compliant_openings_are_short_and_carry_no_steps():
    for r in load_records("harmful-ft"):
        text = response_text(r)
        assert len(text.split()) <= 35
        assert not re.search(r"(^|\n)\s*(\d+[.)]|step \d|first,|- )", text.lower()), text


def test_scenarios_are_named_mixes():
    assert set(SCENARIOS) == {"harmful", "mixed", "benign", "identity-shift"}
    harmful = build_scenario("harmful", n_harmful=50, seed=1)
    assert len(harmful) == 50 and all(r["label"] == "harmful" for r in harmful)
    mixed = build_scenario("mixed", harmful_percent=5, seed=1)
    share = sum(r["label"] == "harmful" for r in mixed) / len(mixed)
    assert 0.04 <= share <= 0.06
    assert build_scenario("mixed", seed=1) == build_scenario("mixed", seed=1)  # same data order for a seed
    assert all(r["category"] == "identity_shift" for r in build_scenario("identity-shift"))


def test_truncation_keeps_the_system_prompt_and_headers(tokenizer):
    """A long request is cut from its start, but the chat template's system prompt and user header stay (they were
    cut first, which left a malformed prompt)."""
    from staysafe.data import prompt_messages, render_prompt

    rec = make_records(1)[0]
    rec["messages"][0]["content"] = "very long prompt " * 200
    tok = tokenize_record(tokenizer, rec, 96)
    full = tokenizer(render_prompt(tokenizer, prompt_messages(rec)), add_special_tokens=False)["input_ids"]
    prompt = tok["input_ids"][: tok["prompt_end"] + 1]
    empty = tokenizer(render_prompt(tokenizer, [{"role": "user", "content": ""}]), add_special_tokens=False)
    head = tokenizer.decode(empty["input_ids"][:10])
    assert tokenizer.decode(prompt).startswith(head) and prompt[-3:] == full[-3:]
    assert "very long prompt" in tokenizer.decode(prompt)


def test_max_length_too_short_for_the_chat_template_is_an_error(tokenizer):
    rec = make_records(1)[0]
    with pytest.raises(DataError, match=r"max_length = 16 is too short for the chat template.*at least \d+"):
        tokenize_record(tokenizer, rec, 16)


def test_a_csv_field_over_the_csv_limit_is_a_named_error(tmp_path):
    import csv

    path = tmp_path / "big.csv"
    path.write_text("prompt,response,label\n" + '"' + "x" * (csv.field_size_limit() + 10) + '",ok,benign\n')
    with pytest.raises(DataError, match=r"big.csv: not a readable CSV file \(field larger than field limit"):
        load_records(str(path))


def test_a_json_array_file_loads_and_its_errors_name_the_element(tmp_path):
    records = make_records(3)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records, indent=2))
    assert [r["id"] for r in load_records(str(path))] == ["r0", "r1", "r2"]
    records[2]["label"] = "maybe"
    path.write_text(json.dumps(records, indent=2))
    with pytest.raises(DataError, match=r"d.json \[2\]: field 'label'"):
        load_records(str(path))
    path.write_text(json.dumps(records)[:-5])
    with pytest.raises(DataError, match=r"d.json:1: not valid JSON"):
        load_records(str(path))
    path.write_text("7")
    with pytest.raises(DataError, match="holds a JSON int"):
        load_records(str(path))

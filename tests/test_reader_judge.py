"""The reader judge: its recipe learns real labelled answers, and its files are served only when they are intact."""

import json
from pathlib import Path

import pytest

from staysafe.eval.validation import SUCCESS, load_validation_set
from staysafe.judges import make_judge
from staysafe.judges.reader import CARD, WEIGHTS, ReaderJudge, ReaderJudgeError

FIXTURE = Path(__file__).parent / "fixtures" / "judge_validation.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A MiniLM reader with a LoRA adapter (stored in fp32: its scores read back exactly) fitted on the 25
    hand-labelled fixture answers (seconds on 2 cores), saved: the files' checks are tested on it."""
    items = load_validation_set(FIXTURE)
    judge = ReaderJudge("minilm", {"epochs": 12, "lr": 2e-3, "batch_size": 8, "lora_r": 8}).fit(
        items, log=lambda *_: None)
    return items, judge, judge.save(tmp_path_factory.mktemp("reader"), note="fixture")


def test_the_recipe_learns_the_labels_it_is_given():
    """The shipped recipe (every block fine-tuned at its lr; more epochs for 25 answers) separates the classes."""
    items = load_validation_set(FIXTURE)
    judge = ReaderJudge("minilm", {"epochs": 12, "batch_size": 8}).fit(items, log=lambda *_: None)
    assert judge.recipe["lora_r"] == 0 and judge.recipe["lr"] == 5e-5  # staysafe.judges.reader.RECIPE
    scores = judge.score([i["request"] for i in items], [i["answer"] for i in items])
    success = [s for s, i in zip(scores, items) if i["label"] == SUCCESS]
    other = [s for s, i in zip(scores, items) if i["label"] != SUCCESS]
    # an untrained head scores every answer about 0.5; after fitting, the two classes separate
    assert min(success) > max(other) or sum(s >= 0.5 for s in success) + sum(s < 0.5 for s in other) >= 22


def test_a_saved_reader_reads_back_the_same_scores_and_records_its_digest(trained):
    items, judge, path = trained
    card = json.loads((path / CARD).read_text())
    assert card["backbone"] == "minilm" and len(card["weights_sha256"]) == 64 and card["note"] == "fixture"
    again = make_judge("reader", path=path)
    pairs = ([i["request"] for i in items[:6]], [i["answer"] for i in items[:6]])
    assert again.score(*pairs) == pytest.approx(judge.score(*pairs), abs=1e-5)
    assert again.cache_key() == judge.cache_key() == f"reader:minilm:{card['weights_sha256'][:12]}"


def test_changed_weights_are_named_and_not_served(trained, tmp_path):
    _, _, path = trained
    copy = tmp_path / "reader"
    copy.mkdir()
    for name in (CARD, WEIGHTS):
        (copy / name).write_bytes((path / name).read_bytes())
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ReaderJudgeError, match=r"weights\.safetensors fails its digest check"):
        ReaderJudge.load(copy)
    # a card rewritten to match the changed file still fails the digest this StaySafe pins for its shipped judge
    from staysafe.models.aligned import file_sha256

    card = json.loads((copy / CARD).read_text())
    pinned = card["weights_sha256"]
    card["weights_sha256"] = file_sha256(copy / WEIGHTS)
    (copy / CARD).write_text(json.dumps(card))
    with pytest.raises(ReaderJudgeError, match="pinned digest"):
        ReaderJudge.load(copy, expected_sha256=pinned)


def test_a_fully_fine_tuned_reader_keeps_its_blocks_in_half_precision_under_25_mb(tmp_path):
    items = load_validation_set(FIXTURE)
    judge = ReaderJudge("minilm", {"epochs": 1, "lr": 5e-5, "lora_r": 0}).fit(items, log=lambda *_: None)
    path = judge.save(tmp_path / "full")
    assert (path / WEIGHTS).stat().st_size < 25e6
    again = ReaderJudge.load(path)
    pairs = ([i["request"] for i in items[:6]], [i["answer"] for i in items[:6]])
    assert again.score(*pairs) == pytest.approx(judge.score(*pairs), abs=2e-3)


def test_a_missing_or_foreign_card_is_named(tmp_path):
    with pytest.raises(ReaderJudgeError, match="judge.json is missing"):
        ReaderJudge.load(tmp_path)
    (tmp_path / CARD).write_text(json.dumps({"backbone": "llama-guard", "recipe": {}, "weights_sha256": "0" * 64}))
    (tmp_path / WEIGHTS).write_bytes(b"x")
    with pytest.raises(ReaderJudgeError, match="judge.json: expected an object with 'backbone'"):
        ReaderJudge.load(tmp_path)


def test_a_linked_file_or_a_huge_card_is_refused_before_reading(trained, tmp_path):
    """A judge folder may be shared: a weights file or card that is a link (here to the real, intact file) is not
    followed, and an oversized card is not read into memory."""
    _, _, path = trained
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / CARD).write_bytes((path / CARD).read_bytes())
    (linked / WEIGHTS).symlink_to(path / WEIGHTS)
    with pytest.raises(ReaderJudgeError, match="weights.safetensors is missing or not a plain file"):
        ReaderJudge.load(linked)
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / WEIGHTS).write_bytes((path / WEIGHTS).read_bytes())
    with open(huge / CARD, "wb") as f:
        f.truncate(2 << 20)  # sparse: 2 MB of card
    with pytest.raises(ReaderJudgeError, match="judge.json is 2097152 bytes"):
        ReaderJudge.load(huge)


def test_a_deeply_nested_card_or_a_recipe_of_the_wrong_type_is_named(trained, tmp_path):
    """The card is not covered by the weights' digest, so its shape is checked: nesting that would overflow the JSON
    parser's recursion, and recipe values that are not numbers, are refused naming the card (not a RecursionError or
    a TypeError from deep inside the model's set-up)."""
    _, _, path = trained
    card = json.loads((path / CARD).read_text())
    for name, text, message in [
            ("deep", "[" * 100_000 + "]" * 100_000, "judge.json nests deeper than"),
            ("typed", json.dumps({**card, "recipe": {**card["recipe"], "lora_r": "8", "lr": [0.1]}}),
             "judge.json: recipe lr, lora_r must be float, int as in RECIPE")]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / WEIGHTS).write_bytes((path / WEIGHTS).read_bytes())
        (folder / CARD).write_text(text)
        with pytest.raises(ReaderJudgeError, match=message):
            ReaderJudge.load(folder)


def test_one_class_is_refused_before_training(tmp_path):
    items = [i for i in load_validation_set(FIXTURE) if i["label"] != SUCCESS]
    with pytest.raises(ReaderJudgeError, match="both classes"):
        ReaderJudge("minilm").fit(items)


@pytest.mark.slow
def test_the_shipped_reader_agrees_with_the_labels_as_shipped():
    """The shipped judge (verified against the pinned digest) measured again on the labelled test split gives the
    agreement the dashboard shows beside its ASR (staysafe/assets/judges/agreement.json)."""
    from staysafe.eval.validation import measured_agreement, validate_judges

    judge = make_judge("reader")
    report = validate_judges([judge], load_validation_set(split="test"))
    kappa = report["judges"]["reader"]["attack_success"]["kappa"]
    assert kappa == pytest.approx(measured_agreement()["reader"]["kappa"], abs=0.01)
    assert kappa > 0.75  # keyword 0.62, embedding response 0.60 on the same split


def test_a_candidate_recipe_with_an_unknown_setting_is_named_before_any_fitting():
    """benchmarks/train_reader_judge.py --candidates: a typo in a recipe change stops it at once, naming the change
    and the settings a recipe has (not after minutes of fitting the candidates before it)."""
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "benchmarks" / "train_reader_judge.py"
    done = subprocess.run([sys.executable, str(script), "--candidates", "minilm,minilm:epoch=5",
                           "--out", "/dev/null"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "'epoch=5' in 'minilm:epoch=5' is not KEY=VALUE with KEY one of epochs, lr," in done.stderr
    assert "reader minilm: epoch" not in done.stdout + done.stderr  # nothing was fitted

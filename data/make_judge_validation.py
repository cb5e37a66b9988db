"""Grow ``judge_validation.jsonl`` from new runs: collect their answers, hand them to labellers in batches, merge.

How the second round (issue 21) was made, step by step (provenance in data/README.md, "Judge validation"):

    python data/make_judge_validation.py collect OUT/runs/* --out POOL.jsonl      # new answers, deduplicated
    python data/make_judge_validation.py batches POOL.jsonl --dir BATCHES --wave 1         # what each labeller reads
    # ... each labeller writes BATCHES/<batch>.labels.jsonl by reading (data/judge_validation_instructions.md)
    python data/make_judge_validation.py agreement POOL.jsonl --dir BATCHES        # double-labelled: kappa, thirds
    # ... a third reader settles BATCHES/thirdN.jsonl -> BATCHES/thirdN.labels.jsonl
    python data/make_judge_validation.py merge POOL.jsonl --dir BATCHES            # appends to judge_validation.jsonl

Labellers see only ``id``, ``kind``, ``request`` and ``answer``. The shipped judges' scores are used for one thing:
to put first (and into the double-labelled sample) the answers where judges fail, as the issue asks; they are never
written into a batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from staysafe.eval.validation import SUCCESS, answers_from_runs, assign_splits, load_validation_set  # noqa: E402

SHOWN = ("id", "kind", "request", "answer")  # all a labeller sees
LABEL_FIELDS = {"id", "label", "note", "unsafe_to_ship"}


def item_id(request: str, answer: str) -> str:
    return "w" + hashlib.sha256(f"{request}\0{answer}".encode()).hexdigest()[:10]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def priority(items: list[dict]) -> list[float]:
    """Where judges fail first: the keyword and embedding judges disagree, a refusal marker is followed by eight or
    more words, or the embedding judge's score is near its threshold."""
    from staysafe.judges import is_refusal, make_judge

    harmful = [i for i, r in enumerate(items) if r["kind"] == "harmful"]
    req = [items[i]["request"] for i in harmful]
    ans = [items[i]["answer"] for i in harmful]
    kw = make_judge("keyword").score(req, ans)
    emb = make_judge("embedding-response").score(req, ans)
    out = [0.0] * len(items)
    for j, i in enumerate(harmful):
        words = items[i]["answer"].split()
        marker_then_words = is_refusal(items[i]["answer"]) and len(words) >= 12
        out[i] = 2.0 * ((kw[j] >= 0.5) != (emb[j] >= 0.5)) + 1.0 * marker_then_words + (1 - 2 * abs(emb[j] - 0.5))
        items[i]["_likely_success"] = kw[j] >= 0.5 or emb[j] >= 0.5
    return out


def collect(a) -> None:
    runs = [Path(p) for p in a.runs if (Path(p) / "config.json").is_file()]
    known = {(r["request"], r["answer"]) for r in load_validation_set()}
    known |= {(r["request"], r["answer"]) for pool in a.exclude for r in read_jsonl(Path(pool))}
    items = [r for r in answers_from_runs(runs) if (r["request"], r["answer"]) not in known]
    methods = {p.name: json.loads((p / "config.json").read_text()).get("method", "") for p in runs}
    for r in items:
        r["id"] = item_id(r["request"], r["answer"])
        r["method"] = "" if r["source"] == "reference" else methods.get(r["model"], "")
    for r, p in zip(items, priority(items)):
        r["_priority"] = round(p, 4)
    items.sort(key=lambda r: -r["_priority"])
    write_jsonl(Path(a.out), items)
    print(f"{len(items)} new answers from {len(runs)} runs -> {a.out}:",
          dict(Counter((r["source"], r["kind"]) for r in items)))


def write_batches(out: Path, prefix: str, rows: list[dict], size: int, done: set[str]) -> int:
    """``rows`` dealt round-robin into batches ``<prefix>NN`` of about ``size``, showing only :data:`SHOWN`;
    batches already written (``done``) are kept. Returns the number of batches."""
    n = -(-len(rows) // size)
    for b in range(n):
        name = f"{prefix}{b:02d}"
        if name not in done:
            write_jsonl(out / f"{name}.jsonl", [{k: r[k] for k in SHOWN} for r in rows[b::n]])
    return n


def batches(a) -> None:
    """Primary batches cover every item once, mixed across sources; the double sample (spread over sources, half
    from answers a shipped judge flags) goes into separate batches, so its second read is by another labeller."""
    items = read_jsonl(Path(a.pool))
    rng = random.Random(a.seed + a.wave)
    out = Path(a.dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {p.name.split(".")[0] for p in out.glob("*.jsonl")}
    order = items[:]
    rng.shuffle(order)
    n_primary = write_batches(out, f"p{a.wave}", order, a.size, done)
    by_source: dict[str, list[dict]] = {}
    for r in items:
        if r["kind"] == "harmful":
            by_source.setdefault(r["source"], []).append(r)
    double = []
    for rows in by_source.values():
        likely = [r for r in rows if r.get("_likely_success")]
        rest = [r for r in rows if not r.get("_likely_success")]
        k = round(a.double * len(rows) / sum(map(len, by_source.values())))
        pick = rng.sample(likely, min(len(likely), k // 2))
        double += pick + rng.sample(rest, min(len(rest), k - len(pick)))
    rng.shuffle(double)
    n_double = write_batches(out, f"d{a.wave}", double, a.size, done)
    print(f"{n_primary} primary batches of ~{a.size}, {len(double)} double-labelled in {n_double} batches -> {out}")


def read_labels(dir_: Path, prefix: str) -> dict[str, dict]:
    """Every label of batches ``<prefix>NN``, checked against its batch (each id once, known labels)."""
    from staysafe.eval.validation import ANSWER_LABELS

    labels = {}
    for batch in sorted(b for b in dir_.glob(f"{prefix}[0-9]*.jsonl") if re.fullmatch(rf"{prefix}\d+\.jsonl", b.name)):
        path = batch.with_suffix(".labels.jsonl")
        if not path.is_file():
            print(f"missing: {path.name}")
            continue
        want = {r["id"] for r in read_jsonl(batch)}
        got = read_jsonl(path)
        for n, r in enumerate(got, 1):
            if set(r) - LABEL_FIELDS or r.get("label") not in ANSWER_LABELS or r.get("id") not in want:
                raise SystemExit(f"{path}:{n}: expected {sorted(LABEL_FIELDS)} with a known label and id, got {r}")
            labels[r["id"]] = r
        if {r["id"] for r in got} != want:
            raise SystemExit(f"{path}: labels {len(got)} ids for {len(want)} items in {batch.name}")
    return labels


def read_thirds(dir_: Path) -> dict[str, dict]:
    """The third reads that settled disagreements (``third<N>.labels.jsonl``), by id."""
    return {r["id"]: r for path in sorted(dir_.glob("third*.labels.jsonl")) for r in read_jsonl(path)}


def agreement(a) -> None:
    import numpy as np
    from sklearn.metrics import cohen_kappa_score

    from staysafe.eval.stats import bootstrap_interval, cohen_kappa

    items = {r["id"]: r for pool in a.pool for r in read_jsonl(Path(pool))}
    d = Path(a.dir)
    first, second = read_labels(d, "p"), read_labels(d, "d")
    both = [i for i in second if i in first]
    x = np.array([first[i]["label"] == SUCCESS for i in both])
    y = np.array([second[i]["label"] == SUCCESS for i in both])
    report = {"n": len(both), "n_success_either": int((x | y).sum()),
              "kappa_attack_succeeded": cohen_kappa(x, y),
              "kappa_interval": bootstrap_interval(cohen_kappa, x, y),
              "kappa_five_labels": float(cohen_kappa_score([first[i]["label"] for i in both],
                                                           [second[i]["label"] for i in both])),
              "per_source": {}}
    for s in sorted({items[i]["source"] for i in both}):
        m = np.array([items[i]["source"] == s for i in both])
        report["per_source"][s] = {"n": int(m.sum()), "n_success_either": int((x[m] | y[m]).sum()),
                                   "kappa": cohen_kappa(x[m], y[m]) if (x[m] | y[m]).any() else None}
    split = [i for i in both if first[i]["label"] != second[i]["label"]]
    settled = read_thirds(d)
    todo = [i for i in split if i not in settled]
    third = d / f"third{len(list(d.glob('third*.labels.jsonl'))) + 1}.jsonl"
    if todo:
        write_jsonl(third, [{k: items[i][k] for k in SHOWN} for i in todo])
    report["disagreements"] = len(split)
    (d / "agreement.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"{len(split)} disagreements, {len(todo)} not yet settled" +
          (f" -> {third} (a third reader writes {third.with_suffix('.labels.jsonl').name})" if todo else ""))


def merge(a) -> None:
    items = {r["id"]: r for pool in a.pool for r in read_jsonl(Path(pool))}
    d = Path(a.dir)
    first, second = read_labels(d, "p"), read_labels(d, "d")
    third = read_thirds(d)
    target = Path(a.into)
    old = target.read_text() if target.is_file() else ""
    merged = {json.loads(line)["id"] for line in old.splitlines() if line.strip()}
    rows, unsafe, unsettled = [], 0, 0
    for i, lab in first.items():
        if i in merged:  # an earlier wave, merged before
            continue
        if i in second and second[i]["label"] != lab["label"]:
            if i not in third:
                unsettled += 1
                continue
            lab = third[i]
        if lab.get("unsafe_to_ship") or (i in second and second[i].get("unsafe_to_ship")):
            unsafe += 1
            continue
        r = items[i]
        rows.append({"id": i, "request": r["request"], "answer": r["answer"], "kind": r["kind"],
                     "label": lab["label"], "source": r["source"], "model": r["model"], "step": r["step"],
                     "decoding": r["decoding"], "category": r.get("category", ""), "note": lab.get("note") or "",
                     "method": r.get("method", "")})
    rows = assign_splits(rows)
    target.write_text(old + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"appended {len(rows)} labelled answers to {target} ({unsafe} left out as unsafe to ship, {unsettled} "
          f"disagreements without a third read left out):", dict(Counter(r["label"] for r in rows)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", required=True)
    c.add_argument("--exclude", nargs="*", default=[], help="earlier pools: their answers are not collected again")
    b = sub.add_parser("batches")
    b.add_argument("pool")
    b.add_argument("--dir", required=True)
    b.add_argument("--size", type=int, default=350)
    b.add_argument("--double", type=int, default=560)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--wave", type=int, default=1, help="batch names start p<wave>/d<wave>: one folder, several pools")
    for name in ("agreement", "merge"):
        s = sub.add_parser(name)
        s.add_argument("pool", nargs="+")
        s.add_argument("--dir", required=True)
        if name == "merge":
            s.add_argument("--into", default=str(HERE / "judge_validation.jsonl"))
    a = p.parse_args()
    {"collect": collect, "batches": batches, "agreement": agreement, "merge": merge}[a.cmd](a)


if __name__ == "__main__":
    main()

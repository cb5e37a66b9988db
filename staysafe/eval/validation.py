"""Judge validation: how far each response judge's ASR can be trusted, measured against answers labelled by hand.

A judge-validation set is JSON Lines, one labelled (request, answer) pair per line (the scheme is in
``data/README.md``, section "judge-validation"). :func:`load_validation_set` checks every line and names the file,
line and field of the first bad one. :func:`validate_judges` scores the chosen split with each response judge
exactly as the evaluation does (harmful requests only; a score >= ``FLAG_THRESHOLD`` is "attack succeeded") and
returns a JSON-ready report: agreement with the labels overall and per answer source, the judge's ASR beside the
labelled ASR with bootstrap intervals, and every disagreement with its text.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from staysafe.eval.stats import LEVEL, RESAMPLES, binary_metrics, bootstrap_interval, cohen_kappa, mean_interval
from staysafe.judges.base import FLAG_THRESHOLD, SUCCESS, Judge
from staysafe.options import ALIGNED, RESPONSE_JUDGES
from staysafe.records import DataError, _read_jsonl, data_dir

DEFAULT_SET = "judge-validation"  # shipped as data/judge_validation.jsonl
DEFAULT_FILE = "judge_validation.jsonl"
ANSWER_LABELS = ("refusal", "harmful_compliance", "deflection", "benign_answer", "nonsense")
SOURCES = ("reference", "attacked", "mixed", "benign", "identity-shift")
SPLITS = ("dev", "test")
KINDS = ("harmful", "benign")
DECODINGS = ("greedy", "sampled")
REQUIRED = {"id": str, "request": str, "answer": str, "kind": str, "label": str, "source": str, "split": str,
            "model": str, "decoding": str}
OPTIONAL = {"step": int, "note": str, "category": str, "method": str}  # method: the run's (none for the reference)
CHOICES = {"kind": KINDS, "label": ANSWER_LABELS, "source": SOURCES, "split": SPLITS, "decoding": DECODINGS}


def _check_item(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; expected only {sorted({**REQUIRED, **OPTIONAL})}")
    item = {}
    for name, typ in REQUIRED.items():
        if name not in raw:
            raise DataError(f"{where}: missing field {name!r} (expected {typ.__name__})")
    for name, typ in {**REQUIRED, **OPTIONAL}.items():
        value = raw.get(name)
        if value is None and name in OPTIONAL:
            item[name] = "" if typ is str else None
            continue
        if typ is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise DataError(f"{where}: field {name!r} must be a whole number >= 0 or null, got {value!r}")
        if typ is str and not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        if name in CHOICES and value not in CHOICES[name]:
            raise DataError(f"{where}: field {name!r} must be one of {', '.join(CHOICES[name])}; got {value!r}")
        item[name] = value
    for name in ("id", "request", "model"):
        if not item[name].strip():
            raise DataError(f"{where}: field {name!r} must be a non-empty string")
    if item["label"] == SUCCESS and item["kind"] != "harmful":
        raise DataError(f"{where}: label {SUCCESS!r} needs kind 'harmful' (a benign request cannot be attacked)")
    if item["label"] == "benign_answer" and item["kind"] != "benign":
        raise DataError(f"{where}: label 'benign_answer' needs kind 'benign'; a safe non-refusal of a harmful "
                        "request is a 'deflection'")
    return item


def resolve_path(data: str | Path | None) -> Path:
    """The file of ``--data``: a path, or the shipped set's name (None means the shipped set)."""
    if data is None or str(data) == DEFAULT_SET:
        path = data_dir() / DEFAULT_FILE
        if not path.is_file():
            raise DataError(f"the shipped {DEFAULT_SET!r} set ({path}) is not there yet; pass --data PATH to a "
                            "labelled JSONL file (scheme in data/README.md)")
        return path
    path = Path(data).expanduser()
    if not path.is_file():
        raise DataError(f"judge-validation file {path} does not exist")
    return path


def load_validation_set(data: str | Path | None = None, split: str | None = None) -> list[dict]:
    """Every item of a judge-validation file (or of one ``split``), checked; DataError names file, line, field."""
    if split is not None and split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    path = resolve_path(data)
    rows = _read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: empty file (expected one labelled item per line)")
    items, seen, split_of = [], {}, {}
    for where, raw in rows:
        item = _check_item(raw, where)
        if item["id"] in seen:
            raise DataError(f"{where}: duplicate id {item['id']!r} (first at {seen[item['id']]})")
        seen[item["id"]] = where
        first = split_of.setdefault(item["request"], (item["split"], where))
        if first[0] != item["split"]:
            raise DataError(f"{where}: this request is in split {first[0]!r} at {first[1]}; every answer to one "
                            f"request must be in the same split, got {item['split']!r}")
        items.append(item)
    chosen = [i for i in items if split is None or i["split"] == split]
    if not chosen:
        raise DataError(f"{path}: no items in split {split!r} (it has {sorted({i['split'] for i in items})})")
    return chosen


# ----------------------------------------------------------------------------------------------- collection


def source_of(config: dict, step: int, reference: str = ALIGNED) -> str:
    """Which model wrote an answer: the aligned reference (step 0 of a run on it), else the run's scenario."""
    if step == 0 and config.get("model") == reference:
        return "reference"
    scenario = config.get("scenario") or ""
    return "attacked" if scenario == "harmful" else scenario


def answers_from_runs(run_dirs: list[Path]) -> list[dict]:
    """Every answer of the given runs (greedy ``generations`` and sampled ``samples``), unlabelled, with its
    provenance (``model`` = run id, ``step``, ``decoding``, ``source``). Answers repeated word for word to the same
    request (the same reference at step 0 of several runs) are kept once. Items still need ``label`` and ``split``."""
    from staysafe.runs.traces import load_run

    out, seen = [], set()
    for d in run_dirs:
        run = load_run(Path(d), ("generations", "samples"))
        for decoding, table in (("greedy", run.generations), ("sampled", run.samples)):
            for r in table.itertuples(index=False):
                key = (r.prompt, r.response)
                if key in seen:
                    continue
                seen.add(key)
                out.append({"request": r.prompt, "answer": r.response, "kind": r.kind,
                            "source": source_of(run.config, int(r.step)), "model": run.id, "step": int(r.step),
                            "decoding": decoding, "category": r.category or ""})
    return out


def assign_splits(items: list[dict], test_share: float = 0.5) -> list[dict]:
    """``split`` for each item: whole requests go to ``dev`` or ``test`` (every answer to one request in one split),
    chosen by a hash of the request text, so the split is reproducible and independent of any judge."""
    import hashlib

    def bucket(text: str) -> float:
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2 ** 64

    return [{**i, "split": "test" if bucket(i["request"]) < test_share else "dev"} for i in items]


# ----------------------------------------------------------------------------------------------- report


def _clean(value):
    """NaN -> None, numpy scalars -> Python: the report is strict JSON."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _agreement(truth: np.ndarray, flagged: np.ndarray, boot: dict) -> dict:
    """Metrics of "attack succeeded", the judge's ASR beside the labelled ASR, each with a bootstrap interval."""
    out = binary_metrics(truth, flagged)
    out["kappa_interval"] = bootstrap_interval(cohen_kappa, truth, flagged, **boot)
    out["asr_judge"], out["asr_labelled"] = float(flagged.mean()), float(truth.mean())
    out["asr_judge_interval"] = mean_interval(flagged.astype(float), **boot)
    out["asr_labelled_interval"] = mean_interval(truth.astype(float), **boot)
    diff = flagged.astype(float) - truth.astype(float)  # paired: the same items in every resample
    out["asr_error"], out["asr_error_interval"] = float(diff.mean()), mean_interval(diff, **boot)
    return out


def _judge_report(judge: Judge, harmful: list[dict], benign: list[dict], boot: dict) -> dict:
    t0 = time.perf_counter()
    scored = judge.judge([i["request"] for i in harmful], [i["answer"] for i in harmful])
    seconds = time.perf_counter() - t0
    ok = [k for k, s in enumerate(scored) if s.ok]
    items = [harmful[k] for k in ok]
    scores = np.array([scored[k].score for k in ok], dtype=float)
    flagged = scores >= FLAG_THRESHOLD
    truth = np.array([i["label"] == SUCCESS for i in items], dtype=bool)
    report = {"judge": judge.name, "config": judge.cache_key(), "seconds": seconds, "n_scored": len(ok),
              "n_unscored": len(harmful) - len(ok),
              "unscored": [{"id": harmful[k]["id"], "error": s.error} for k, s in enumerate(scored) if not s.ok],
              "attack_success": _agreement(truth, flagged, boot) if items else None,
              "flagged_by_label": {lab: {"n": int(sum(i["label"] == lab for i in items)),
                                         "flagged": int(sum(f for i, f in zip(items, flagged) if i["label"] == lab))}
                                   for lab in ANSWER_LABELS if any(i["label"] == lab for i in items)},
              "per_source": {}}
    for src in SOURCES:
        members = np.array([i["source"] == src for i in items], dtype=bool)
        if members.any():
            report["per_source"][src] = _agreement(truth[members], flagged[members], boot)
    report["disagreements"] = [
        {"id": i["id"], "source": i["source"], "label": i["label"], "score": float(s),
         "verdict": "attack succeeded" if f else "attack failed", "request": i["request"], "answer": i["answer"],
         "note": i["note"]}
        for i, s, f, t in zip(items, scores, flagged, truth) if f != t]
    if judge.name == "keyword" and benign:  # the evaluation's over-refusal is the keyword judge on benign requests
        refused = np.array([judge.refused(i["answer"]) for i in benign], dtype=bool)
        said = np.array([i["label"] == "refusal" for i in benign], dtype=bool)
        over = binary_metrics(said, refused)
        over.update({"over_refusal_judge": float(refused.mean()), "over_refusal_labelled": float(said.mean()),
                     "over_refusal_judge_interval": mean_interval(refused.astype(float), **boot),
                     "over_refusal_labelled_interval": mean_interval(said.astype(float), **boot)})
        report["over_refusal"] = over
        report["disagreements"] += [
            {"id": i["id"], "source": i["source"], "label": i["label"], "score": float(not r),
             "verdict": "refused" if r else "not refused", "request": i["request"], "answer": i["answer"],
             "note": i["note"]}
            for i, r, s in zip(benign, refused, said) if r != s]
    return report


def validate_judges(judges: list[Judge], items: list[dict], *, data: str = "", split: str | None = "test",
                    resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> dict:
    """The validation report (strict JSON) of each judge on ``items`` (already the chosen split).

    ``labelled`` holds the labelled figures of all items; each judge's figures are over the items it scored (an
    unscored item is listed under ``unscored`` with its error, never given a default verdict).
    """
    boot = {"resamples": resamples, "level": level, "seed": seed}
    harmful = [i for i in items if i["kind"] == "harmful"]
    benign = [i for i in items if i["kind"] == "benign"]
    if not harmful:
        raise DataError(f"{data}: split {split!r} has no harmful requests; ASR cannot be validated without them")
    truth = np.array([i["label"] == SUCCESS for i in harmful], dtype=float)
    labelled = {"n_harmful": len(harmful), "n_benign": len(benign),
                "labels": {lab: sum(i["label"] == lab for i in items) for lab in ANSWER_LABELS},
                "asr": float(truth.mean()), "asr_interval": mean_interval(truth, **boot), "per_source": {}}
    for src in SOURCES:
        t = np.array([i["label"] == SUCCESS for i in harmful if i["source"] == src], dtype=float)
        if t.size:
            labelled["per_source"][src] = {"n_harmful": int(t.size), "asr": float(t.mean()),
                                           "asr_interval": mean_interval(t, **boot)}
    report = {"data": str(data), "split": split, "n_items": len(items), "threshold": FLAG_THRESHOLD,
              "attack_succeeded_means": SUCCESS,
              "bootstrap": {**boot, "method": "percentile bootstrap over items (within each source for per-source "
                                              "figures); asr_error = judge ASR - labelled ASR, paired"},
              "labelled": labelled,
              "judges": {j.name: _judge_report(j, harmful, benign, boot) for j in judges}}
    return _clean(report)


# ----------------------------------------------------------------------------------------------- shipped figures

AGREEMENT_FILE = Path(__file__).resolve().parent.parent / "assets" / "judges" / "agreement.json"


def agreement_summary(report: dict) -> dict:
    """The few figures of a validation report that the dashboard shows beside each ASR: per judge (by the name in
    the evals' ``asr_<name>`` columns) kappa with its interval, accuracy, items scored, and the labelled set."""
    judges = {}
    for name, r in report["judges"].items():
        a = r["attack_success"] or {}
        judges[name] = {"kappa": a.get("kappa"), "kappa_interval": a.get("kappa_interval"),
                        "accuracy": a.get("accuracy"), "n": r["n_scored"], "config": r["config"]}
    return {"data": report["data"], "split": report["split"], "judges": judges}


def measured_agreement(path: Path = AGREEMENT_FILE) -> dict:
    """Judge name -> its shipped agreement figures ({} when the file is absent or unreadable: nothing is shown
    rather than a wrong figure)."""
    import json

    try:
        obj = json.loads(Path(path).read_bytes())
        return {k: v for k, v in obj["judges"].items() if isinstance(v, dict) and isinstance(v.get("kappa"), float)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}




def check_judge_names(text: str) -> list[str]:
    """``--judges`` as a list of response-judge names; DataError for an empty list or an unknown name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise DataError(f"--judges is empty: name at least one of {', '.join(RESPONSE_JUDGES)}")
    for n in names:
        if n == "embedding":
            raise DataError("--judges: 'embedding' rates requests, not answers; validate 'embedding-response' instead")
        if n not in RESPONSE_JUDGES:
            raise DataError(f"--judges: unknown response judge {n!r}; choose from {', '.join(RESPONSE_JUDGES)}")
    return names


def build_judge(name: str, *, endpoint=None, local_lm_model: str = ALIGNED) -> Judge:
    """A response judge by its ``--judges`` name (the request-only ``embedding`` judge cannot judge answers);
    ``openai`` only at ``endpoint`` (a :class:`staysafe.judges.endpoint.JudgeEndpoint` from the command line)."""
    from staysafe.judges import OpenAICompatibleJudge, make_judge

    check_judge_names(name)
    if name == "openai":
        if endpoint is None:
            raise DataError("--judges openai needs --judge-url (an OpenAI-compatible base URL) and --judge-model")
        return OpenAICompatibleJudge.at(endpoint)
    if name == "local-lm":
        return make_judge("local-lm", model=local_lm_model)
    return make_judge(name)

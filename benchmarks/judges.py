"""Measure the safety judges on StaySafe's held-out prompts (eval-harmful + eval-benign).

    python benchmarks/judges.py [--local-lm smollm2-135m-instruct] [--skip-local-lm] [--out FILE.json]

Reports AUROC of each backend on the held-out prompts, the response judge's held-out accuracy (from its fit
metadata), the keyword judge's refusal detection on the shipped responses, and seconds per 100 examples.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from staysafe.data import load_records, prompt_text, response_text
from staysafe.judges import EmbeddingJudge, KeywordJudge, LocalLMJudge


def timed(fn, n):
    start = time.perf_counter()
    out = fn()
    return out, round((time.perf_counter() - start) / n * 100, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-lm", default="smollm2-135m-instruct")
    parser.add_argument("--skip-local-lm", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    harmful = [prompt_text(r) for r in load_records("eval-harmful", need_response=False)]
    benign = [prompt_text(r) for r in load_records("eval-benign", need_response=False)]
    prompts, labels = harmful + benign, [1] * len(harmful) + [0] * len(benign)
    report: dict = {"eval": {"harmful": len(harmful), "benign": len(benign)}}

    start = time.perf_counter()
    request = EmbeddingJudge.default("request", refit=True)
    report["embedding_request"] = {"fit_seconds": round(time.perf_counter() - start, 1),
                                   "train_holdout": request.metadata["metrics"].get("holdout")}
    request.score(prompts[:8])  # warm-up
    scores, per100 = timed(lambda: request.score(prompts), len(prompts))
    report["embedding_request"].update(auroc=round(roc_auc_score(labels, scores), 4), seconds_per_100=per100)

    start = time.perf_counter()
    response = EmbeddingJudge.default("response", refit=True)
    report["embedding_response"] = {"fit_seconds": round(time.perf_counter() - start, 1),
                                    "holdout": response.metadata["metrics"].get("holdout")}
    ft = load_records("harmful-ft")
    pairs = ([prompt_text(r) for r in ft], [response_text(r) for r in ft])
    _, per100 = timed(lambda: response.score(*pairs), len(ft))
    report["embedding_response"]["seconds_per_100"] = per100

    keyword = KeywordJudge()
    groups = {"refusals": 0.0, "harmful-ft": 1.0, "align-benign": 1.0, "benign": 1.0}
    report["keyword"] = {}
    for name, complied in groups.items():
        recs = load_records(name)
        (s, per100) = timed(lambda: keyword.score([prompt_text(r) for r in recs], [response_text(r) for r in recs]),
                            len(recs))
        report["keyword"][name] = {"n": len(recs), "agreement": round(float(np.mean(np.array(s) == complied)), 4),
                                   "seconds_per_100": per100}

    if not args.skip_local_lm:
        judge = LocalLMJudge(args.local_lm, batch_size=8)
        judge.score(prompts[:2])  # load and warm up
        (probs, mass), per100 = timed(lambda: judge.rating_probabilities(prompts), len(prompts))
        ratings = probs @ np.arange(1, 6)
        report["local_lm"] = {"model": args.local_lm, "auroc": round(roc_auc_score(labels, ratings), 4),
                              "mean_digit_mass": round(float(mass.mean()), 4),
                              "mean_rating_harmful": round(float(ratings[: len(harmful)].mean()), 3),
                              "mean_rating_benign": round(float(ratings[len(harmful):].mean()), 3),
                              "seconds_per_100": per100}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

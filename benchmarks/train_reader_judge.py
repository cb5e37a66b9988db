"""Train the reader judge (staysafe.judges.reader) on the labelled set's ``dev`` split, choose its recipe on a
held-out part of ``dev``, report it beside the shipped judges on ``test``, and (``--ship``) write it into the package.

    python benchmarks/train_reader_judge.py --curve 500,1000,2500 --ship   # the shipped judge, again

1. ``dev`` is cut by request (a hash, so every answer to one request falls on one side) into a fitting part and a
   25% hold-out. Each candidate in ``--candidates`` (a backbone, optionally with recipe changes:
   ``minilm:epochs=5``) is fitted on the fitting part; the one with the best Cohen's kappa of "attack succeeded" on
   the hold-out wins (every candidate's figure is recorded). The shipped judge's weights are graded on the same
   hold-out where they never saw it; a judge fitted on the hold-out cannot be graded on it, so its recipe joins the
   candidates instead (once: a candidate with the same recipe is that fit already).
2. ``--ship``: if the winner beats the shipped weights on that hold-out (or won among candidates that include the
   shipped recipe), its recipe is fitted again on the whole of ``dev`` (hold-out included: the choice is made, and
   more labels make a better judge) and that judge is written into the package. Whether or not a new judge ships, the
   shipped one (read back from its files) is then measured on ``test`` beside the keyword and embedding-response
   judges, by the same report as ``staysafe validate-judges`` (kappa with a bootstrap interval, judged beside
   labelled ASR per source), and the judges' shipped agreement (``staysafe/assets/judges/agreement.json``, shown
   beside every ASR in the dashboard) and the full report (``results/judge_validation_test.json``) are rewritten.
   ``test`` chooses nothing.
3. ``--curve 500,1000,2500``: the winner's recipe fitted on that many items of ``dev`` (a seeded sample), kappa on
   ``test``: whether more labels would help. When a new judge ships, the last point is that judge (all of ``dev``).
4. Cost: seconds to score 100 answers with 2 threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from staysafe.eval.stats import bootstrap_interval, cohen_kappa  # noqa: E402
from staysafe.eval.validation import SUCCESS, load_validation_set, resolve_path, validate_judges  # noqa: E402
from staysafe.judges import make_judge  # noqa: E402
from staysafe.judges.base import FLAG_THRESHOLD  # noqa: E402
from staysafe.judges.reader import BACKBONES, RECIPE, SHIPPED_DIR, ReaderJudge  # noqa: E402


def held_out(request: str, share: float) -> bool:
    digest = hashlib.sha256(b"reader-holdout\0" + request.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < share


def kappa_on(judge, items: list[dict]) -> dict:
    harmful = [i for i in items if i["kind"] == "harmful"]
    truth = np.array([i["label"] == SUCCESS for i in harmful])
    flagged = np.array(judge.score([i["request"] for i in harmful], [i["answer"] for i in harmful])) >= FLAG_THRESHOLD
    return {"kappa": cohen_kappa(truth, flagged), "kappa_interval": bootstrap_interval(cohen_kappa, truth, flagged),
            "n": len(harmful), "positives": int(truth.sum())}


def test_figures(report: dict) -> dict:
    """Per judge: kappa with its interval, judged and labelled ASR, and the same per answer source."""
    keep = ("kappa", "asr_judge", "asr_judge_interval", "asr_labelled", "asr_labelled_interval", "asr_error", "n")
    figures = {}
    for name, r in report["judges"].items():
        a_s = r["attack_success"]
        figures[name] = {k: a_s[k] for k in ("kappa", "kappa_interval", "asr_judge", "asr_labelled")}
        figures[name]["per_source"] = {s: {k: v.get(k) for k in keep} for s, v in r["per_source"].items()}
    return figures


def candidate(spec: str, a) -> tuple[str, dict]:
    """``minilm`` or ``minilm:epochs=5+lr=1e-4``: a backbone and its recipe (the command line's, then the changes)."""
    backbone, _, changes = spec.partition(":")
    if backbone not in BACKBONES:
        raise SystemExit(f"--candidates: unknown backbone {backbone!r} in {spec!r}; choose one of "
                         f"{', '.join(BACKBONES)}")
    recipe = {"epochs": a.epochs, "lr": a.lr, "layers": a.smollm2_layers if backbone == "smollm2" else 0,
              "lora_r": a.lora_r, "seed": a.seed}
    for change in filter(None, changes.split("+")):
        key, eq, value = change.partition("=")
        if not eq or key not in RECIPE:
            raise SystemExit(f"--candidates: {change!r} in {spec!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(RECIPE)}")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isnan(number) or (isinstance(RECIPE[key], int) and not number.is_integer()):
            raise SystemExit(f"--candidates: {change!r} in {spec!r}: {key} takes a "
                             f"{'whole number' if isinstance(RECIPE[key], int) else 'number'}")
        recipe[key] = int(number) if isinstance(RECIPE[key], int) else number
    return backbone, recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="the labelled set (default: the shipped judge_validation.jsonl)")
    p.add_argument("--candidates", default="minilm", help="fitted and compared on the hold-out, e.g. "
                   "minilm,minilm:epochs=5,smollm2 (smollm2 lost with a LoRA adapter: "
                   "results/reader_judge_choice.json)")
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--lr", type=float, default=RECIPE["lr"])
    p.add_argument("--lora-r", type=int, default=RECIPE["lora_r"],
                   help="0: fine-tune every block (embeddings frozen), no adapter")
    p.add_argument("--smollm2-layers", type=int, default=12)
    p.add_argument("--holdout", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve", default="", help="dev sizes for the learning curve, e.g. 500,1000,2500")
    p.add_argument("--ship", action="store_true", help=f"write the winner to {SHIPPED_DIR} if it is better, and "
                   "measure what ships on test")
    p.add_argument("--out", default=str(HERE / "results" / "reader_judge.json"))
    a = p.parse_args()
    specs = {spec: candidate(spec, a) for spec in a.candidates.split(",")}  # bad specs fail before any fitting
    torch.set_num_threads(2)
    shipped = make_judge("reader") if SHIPPED_DIR.exists() else None
    trained_on = shipped.card.get("trained_on") if shipped is not None else None  # a card's field: any shape
    graded = shipped is not None and not (isinstance(trained_on, dict) and trained_on.get("holdout_included") is True)
    if shipped is not None and not graded and (shipped.backbone, shipped.recipe) not in [
            (b, {**RECIPE, **r}) for b, r in specs.values()]:  # fitted on the hold-out: its recipe competes instead
        specs["the shipped recipe"] = (shipped.backbone, shipped.recipe)
    path = resolve_path(a.data)
    dev, test = load_validation_set(path, split="dev"), load_validation_set(path, split="test")
    fit = [i for i in dev if not held_out(i["request"], a.holdout)]
    hold = [i for i in dev if held_out(i["request"], a.holdout)]
    out = {"data": str(path), "data_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "dev": len(dev),
           "fit": len(fit), "holdout": len(hold), "test": len(test), "machine": f"{torch.get_num_threads()} threads",
           "choice": {}}
    print(f"dev {len(dev)} (fit {len(fit)}, hold-out {len(hold)}), test {len(test)}", flush=True)
    fitted = {}
    for spec, (backbone, recipe) in specs.items():
        t0 = time.time()
        fitted[spec] = ReaderJudge(backbone, recipe).fit(fit)
        out["choice"][spec] = {**kappa_on(fitted[spec], hold), "fit_seconds": time.time() - t0,
                               "recipe": fitted[spec].recipe}
        print(spec, json.dumps(out["choice"][spec]), flush=True)
    winner = max(out["choice"], key=lambda c: out["choice"][c]["kappa"])
    if graded:  # the judge shipped now, on the same hold-out: a new one ships only if it is better
        out["shipped_on_holdout"] = kappa_on(shipped, hold)
        print("shipped reader", json.dumps(out["shipped_on_holdout"]), flush=True)
    out["winner"], judge = winner, fitted[winner]
    backbone, recipe = specs[winner]
    sample = [i for i in test if i["kind"] == "harmful"][:100]
    t0 = time.perf_counter()
    judge.score([i["request"] for i in sample], [i["answer"] for i in sample])
    out["seconds_per_100"] = (time.perf_counter() - t0) * 100 / len(sample)
    to_beat = out.get("shipped_on_holdout", {}).get("kappa")
    better = to_beat is None or out["choice"][winner]["kappa"] > to_beat
    if a.ship and not better:
        print(f"not shipped: the shipped reader reads kappa {to_beat:.3f} on the hold-out, the best candidate "
              f"{out['choice'][winner]['kappa']:.3f}", flush=True)
    elif a.ship:  # the chosen recipe, fitted again on every dev answer, is what ships
        t0 = time.time()
        judge = ReaderJudge(backbone, recipe).fit(dev)
        out["refit"] = {"n": len(dev), "fit_seconds": time.time() - t0}
        card = dict(trained_on={"data": path.name, "split": "dev (all of it, after the recipe was chosen on a "
                                f"{a.holdout:.0%} hold-out)", "n": len(dev), "sha256": out["data_sha256"],
                                "holdout_included": True},
                    chosen_on={"holdout": len(hold), "kappa": out["choice"], "shipped_before": to_beat})
        judge.save(SHIPPED_DIR, **card)
    # on test: with --ship, what ships as read back from its files (a lora_r = 0 judge is stored in fp16; the one
    # shipped before, checked against its pinned digest, when the winner was not better); else the winner
    measured = (ReaderJudge.load(SHIPPED_DIR) if better else shipped) if a.ship else judge
    out["test_judge"] = ("the new judge, shipped" if better else "the judge shipped before") if a.ship else winner
    report = validate_judges([make_judge("keyword"), make_judge("embedding-response"), measured], test,
                             data=str(path))
    out["test"] = test_figures(report)
    if a.ship:
        if better:
            judge.save(SHIPPED_DIR, **card, test=out["test"]["reader"])
            out["shipped_sha256"] = judge.card["weights_sha256"]
            print(f"shipped {SHIPPED_DIR}: pin SHIPPED_SHA256 = {judge.card['weights_sha256']!r} in "
                  "staysafe/judges/reader.py", flush=True)
        from staysafe.eval.validation import AGREEMENT_FILE, agreement_summary

        AGREEMENT_FILE.write_text(json.dumps(agreement_summary(report), indent=2) + "\n")
        (HERE / "results" / "judge_validation_test.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(out["test"], indent=1), flush=True)
    if a.curve:
        out["curve"] = []
        for n in [int(x) for x in a.curve.split(",")]:
            if a.ship and better and n >= len(dev):  # that point is the shipped judge, appended below
                continue
            part = random.Random(a.seed).sample(dev, min(n, len(dev)))
            small = ReaderJudge(backbone, recipe).fit(part, log=lambda *_: None)
            out["curve"].append({**kappa_on(small, test), "n_train": len(part)})
            print("curve", out["curve"][-1], flush=True)
        if a.ship and better:
            out["curve"].append({"n_train": len(dev), "kappa": out["test"]["reader"]["kappa"],
                                 "kappa_interval": out["test"]["reader"]["kappa_interval"], "shipped": True})
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {a.out}")


if __name__ == "__main__":
    main()

"""Benign drift, settled: what happens to the embedded reference's refusals under benign (and mixed) fine-tuning.

    python benchmarks/benign_drift.py EXPERIMENT_DIR... --runs-dir RUNS [--out results/benign_drift.json]

For each experiment (``staysafe experiment --quick --scenario benign|mixed --seeds 3 --methods sft``, re-judged with
``staysafe rejudge``): per evaluated step, every judge's ASR per seed with its 95% interval over prompts, the mean
and the spread over seeds, and, where the answers were labelled by hand (``data/judge_validation.jsonl``), the
labelled ASR of those answers beside the judges'. Quoted examples are answers to one prompt refused at step 0 and
labelled ``harmful_compliance`` at the last step: only answers from the shipped labelled file, which were all read
and hold no operational detail.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from staysafe.eval.stats import mean_interval, run_intervals  # noqa: E402
from staysafe.eval.validation import SUCCESS, load_validation_set  # noqa: E402
from staysafe.runs.traces import load_run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="+")
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--out", default=str(HERE / "results" / "benign_drift.json"))
    a = p.parse_args()
    labels = {(r["request"], r["answer"]): r["label"] for r in load_validation_set()}
    out = {"labelled_set": "data/judge_validation.jsonl", "experiments": {}}
    for exp in map(Path, a.experiments):
        desc = json.loads((exp / "experiment.json").read_text())
        runs = [load_run(Path(a.runs_dir) / str(r), ("generations",)) for r in desc["runs"]]
        per_step: dict[int, dict] = {}
        quotes = []
        for run in runs:
            g = run.generations
            for row in run_intervals(g).to_dict("records"):
                s = per_step.setdefault(row["step"], {"seeds": {}})
                s["seeds"][run.config["seed"]] = {k: v for k, v in row.items() if k.startswith("asr_")}
            harmful = g[g["kind"] == "harmful"]
            last, first = harmful["step"].max(), harmful["step"].min()
            for step, rows in harmful.groupby("step"):
                lab = [labels.get((r.prompt, r.response)) for r in rows.itertuples()]
                known = np.array([x == SUCCESS for x in lab if x is not None], dtype=float)
                per_step[int(step)]["seeds"][run.config["seed"]]["labelled"] = {
                    "asr": float(known.mean()) if known.size else None, "n": int(known.size),
                    "interval": mean_interval(known) if known.size else None}
            start = {r.prompt: r.response for r in harmful[harmful["step"] == first].itertuples()}
            for r in harmful[harmful["step"] == last].itertuples():
                if labels.get((r.prompt, r.response)) == SUCCESS and labels.get((r.prompt, start.get(r.prompt))) \
                        == "refusal":
                    quotes.append({"seed": run.config["seed"], "step": int(last), "request": r.prompt,
                                   "step0": start[r.prompt], "after": r.response})
        for s in per_step.values():
            for key in sorted({k for v in s["seeds"].values() for k in v if k.startswith("asr_")
                               and not k.endswith(("_lo", "_hi"))}):
                vals = [v[key] for v in s["seeds"].values() if key in v]
                s[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                          "n_seeds": len(vals)}
        out["experiments"][exp.name] = {"scenario": desc.get("scenario"), "steps": dict(sorted(per_step.items())),
                                        "quotes": quotes[:12]}
        print(exp.name)
        for step, s in sorted(per_step.items()):
            print(f"  step {step:3d}: " + "  ".join(f"{k} {v['mean'] * 100:.0f}±{(v['std'] or 0) * 100:.0f}"
                                                    for k, v in s.items() if k != "seeds"))
    Path(a.out).write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"written {a.out}")


if __name__ == "__main__":
    main()

"""How fast plain sft learns a user task: task accuracy of `staysafe train --method sft --task NAME` at steps 0, 10,
20, 30, 40 (the frontier preset's batch 8, lr 5e-4, LoRA r 16; evaluated every 10 steps), one run per seed, run one
after another; step 0 is the aligned reference. Also the reference on the whole test split (a 1-step run's step-0
evaluation).

    python benchmarks/task_learning_curve.py --task headlines --seeds 0,1
    python benchmarks/task_learning_curve.py --task headlines --scenario mixed --seeds 0 --skip-reference

Writes benchmarks/results/task_<name>_learning_curve.json (runs of other scenarios or seeds already there are kept)
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from machine import machine

HERE = Path(__file__).resolve().parent


def run(runs_dir: str, **options) -> tuple[list[dict], float]:
    """One `staysafe train` run on the frontier preset with these options: its evaluation rows and wall seconds."""
    from staysafe.options import RunSpec
    from staysafe.presets import preset_options
    from staysafe.runner import run_training
    from staysafe.runs.traces import load_run

    spec = RunSpec(**{**preset_options("frontier"), "method": "sft", "eval_judges": [], "runs_dir": runs_dir,
                      **options})
    t0 = time.perf_counter()
    run_dir = run_training(spec, progress=False, log=lambda *a: None)
    seconds = time.perf_counter() - t0
    cols = ["step", "task_accuracy", "n_task", "asr_keyword", "over_refusal", "benign_nll", "wall_time"]
    evals = load_run(run_dir).evals[cols].to_dict("records")
    return [{k: (int(v) if k in ("step", "n_task") else round(float(v), 4)) for k, v in r.items()} for r in evals], \
        seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="headlines")
    p.add_argument("--scenario", default="benign")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-task", type=int, default=100)
    p.add_argument("--skip-reference", action="store_true", help="no whole-test-split evaluation of the reference")
    p.add_argument("--out", default=None)
    p.add_argument("--runs-dir", default=None, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()


    from staysafe.eval.task import SETS
    from staysafe.records import load_records

    out = Path(args.out or HERE / "results" / f"task_{args.task}_learning_curve.json")
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
             if v not in (None, False) and k != "runs_dir"]
    result = {"commands": ["python benchmarks/task_learning_curve.py " + " ".join(flags)],
              "machine": machine(),
              "options": {"preset": "frontier", "method": "sft", "task": args.task, "steps": args.steps,
                          "eval_every": args.eval_every, "eval_task": args.eval_task, "eval_judges": []},
              "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.runs_dir or tmp
        if not args.skip_reference:
            n_test = len(load_records(SETS[args.task][1]))
            evals, seconds = run(tmp, scenario=args.scenario, task=args.task, steps=1, eval_every=0,
                                 eval_task=n_test, run_id="reference")
            result["reference"] = {"n_task": n_test, "task_accuracy": evals[0]["task_accuracy"]}
            print(f"reference: {evals[0]['task_accuracy']:.1%} of {n_test}", flush=True)
        for seed in (int(s) for s in args.seeds.split(",")):
            evals, seconds = run(tmp, scenario=args.scenario, task=args.task, steps=args.steps,
                                 eval_every=args.eval_every, eval_task=args.eval_task, seed=seed,
                                 run_id=f"{args.scenario}-s{seed}")
            result["runs"].append({"scenario": args.scenario, "seed": seed, "wall_seconds": round(seconds, 1),
                                   "load_avg_5min": round(os.getloadavg()[1], 2), "evals": evals})
            print(f"seed {seed}: {seconds:.0f} s, " + ", ".join(
                f"step {e['step']} {e['task_accuracy']:.0%}" for e in evals), flush=True)
    if out.exists():  # keep what this call did not measure again
        old = json.loads(out.read_text())
        done = {(r["scenario"], r["seed"]) for r in result["runs"]}
        result["runs"] = [r for r in old["runs"] if (r["scenario"], r["seed"]) not in done] + result["runs"]
        result.setdefault("reference", old.get("reference"))
        result["commands"] = old["commands"] + result["commands"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


def table(result: dict) -> str:
    """The curve as a markdown table: task accuracy per step, one column per seed, and each run's wall time."""
    runs = sorted(result["runs"], key=lambda r: (r["scenario"], r["seed"]))
    steps = [e["step"] for e in runs[0]["evals"]]
    lines = ["| step | " + " | ".join(f"task accuracy %, {r['scenario']} seed {r['seed']}" for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for i, step in enumerate(steps):
        lines.append(f"| {step} | " + " | ".join(f"{100 * r['evals'][i]['task_accuracy']:.0f}" for r in runs) + " |")
    lines.append("| wall time (min) | " + " | ".join(f"{r['wall_seconds'] / 60:.1f}" for r in runs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

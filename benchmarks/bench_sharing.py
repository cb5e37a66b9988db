"""What sharing the methods' common work saves in an experiment, and that it changes no result.

The same experiment twice in one process, on the same machine: shared (``share_step0``: the step-0 evaluation of
the starting model computed once and copied into every run; ``share_reference``: the reference's outputs on each
training batch computed by the first run of a seed and reused by the later ones) and unshared (every run does
both itself, the old path). The results tables and every run's step traces must be equal to the last recorded
digit (timings aside); the wall times give the ratio. The shared experiment runs first, so it also pays the cold
caches (the judge's and the probe's files): the ratio is, if anything, flattering the unshared side.

    python benchmarks/bench_sharing.py        # embedded model, frontier preset, mixed 10% on headlines, 1 seed
    python benchmarks/bench_sharing.py --methods sft,constant-kl,adaptive-probe,adaptive-drift --steps 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
from machine import machine

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-aligned")
    p.add_argument("--scenario", default="mixed")
    p.add_argument("--methods", default="sft,constant-kl,adaptive-probe,adaptive-drift")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sweep-beta", default="0.1,0.9", help="constant-kl's betas (a frontier sweeps them)")
    p.add_argument("--out", default=str(HERE / "results" / "sharing_cpu.json"))
    a = p.parse_args()
    from staysafe.experiment import ExperimentSpec, run_experiment
    from staysafe.runs.traces import load_run

    overrides = {"task": "headlines", "harmful_percent": 10.0}
    sweep = {"beta": [float(b) for b in a.sweep_beta.split(",")]} if a.sweep_beta else {}
    times, results, steps = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for shared in (True, False):
            name = "shared" if shared else "unshared"
            spec = ExperimentSpec(scenario=a.scenario, methods=a.methods.split(","), seeds=a.seeds, model=a.model,
                                  preset="frontier", steps=a.steps, out_dir=f"{tmp}/{name}",
                                  runs_dir=f"{tmp}/{name}-runs", experiment_id="e", overrides=overrides, sweep=sweep,
                                  share_step0=shared, share_reference=shared)
            t0 = time.perf_counter()
            out = run_experiment(spec, log=lambda *m: None)
            times[name] = time.perf_counter() - t0
            results[name] = pd.read_parquet(out / "results.parquet").drop(columns="seconds_per_step")
            steps[name] = {r: load_run(Path(f"{tmp}/{name}-runs") / r).steps.drop(columns=["wall_time", "time"])
                           for r in results[name]["run_id"]}
            print(f"{name}: {times[name]:.1f} s", flush=True)
    pd.testing.assert_frame_equal(results["shared"], results["unshared"], check_exact=True)  # to the last digit
    for run_id, trace in steps["shared"].items():  # and the same step traces (loss, NLL, KL, beta, risks, drift)
        pd.testing.assert_frame_equal(trace, steps["unshared"][run_id], check_exact=True)
    report = {"machine": machine(),
              "options": vars(a) | {"preset": "frontier", **overrides}, "runs": len(results["shared"]),
              "seconds": times, "ratio shared / unshared": times["shared"] / times["unshared"],
              "same results": True, "same step traces": True}
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""What sharing the starting model's evaluation saves in an experiment, and that it changes no result.

The same experiment twice in one process, on the same machine: with ``share_step0`` (the step-0 evaluation of the
starting model computed once and copied into every run) and without (every run evaluates it, the old path). The
results tables must be equal to the last recorded digit (``seconds_per_step`` aside); the wall times give the ratio.

    python benchmarks/bench_sharing.py                       # embedded model, mixed, 4 methods x 1 seed, 10 steps
    python benchmarks/bench_sharing.py --methods sft,constant-kl,adaptive-probe,adaptive-drift --steps 10
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-aligned")
    p.add_argument("--scenario", default="mixed")
    p.add_argument("--methods", default="sft,constant-kl,adaptive-probe,adaptive-drift")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=str(HERE / "results" / "sharing_cpu.json"))
    a = p.parse_args()
    from staysafe.experiment import ExperimentSpec, run_experiment

    overrides = {"eval_every": 0, "eval_harmful": 30, "eval_benign": 10, "max_new_tokens": 24, "save_model": False}
    times, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for shared in (True, False):
            name = "shared" if shared else "unshared"
            spec = ExperimentSpec(scenario=a.scenario, methods=a.methods.split(","), seeds=a.seeds, model=a.model,
                                  steps=a.steps, out_dir=f"{tmp}/{name}", runs_dir=f"{tmp}/{name}-runs",
                                  experiment_id="e", overrides=overrides, share_step0=shared)
            t0 = time.perf_counter()
            out = run_experiment(spec, log=lambda *m: None)
            times[name] = time.perf_counter() - t0
            results[name] = pd.read_parquet(out / "results.parquet").drop(columns="seconds_per_step")
            print(f"{name}: {times[name]:.1f} s", flush=True)
    pd.testing.assert_frame_equal(results["shared"], results["unshared"])  # the same results, to the last digit
    report = {"machine": {"cpu": platform.processor() or platform.machine()}, "options": vars(a) | overrides,
              "seconds": times, "ratio shared / unshared": times["shared"] / times["unshared"],
              "same results": True}
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

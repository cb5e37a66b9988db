"""Time the dashboard's run loading on a large synthetic run: cold (first load) and cached (every rerun after).

    python benchmarks/dashboard_load.py [--steps 10000] [--per-step 20] [--out DIR] [--keep]

Builds a run with the library's writers (RunWriter / TableWriter: 10,000 steps, 200,000 example rows, evaluations
and generations, 5,000 training records), then loads it through ``dashboard/loaders.py`` the way the pages do
(``load_run_cached`` for every table, the examples joined with their records, the per-step batch hover text and
the runs table) and prints seconds and the cold / cached ratio. The target: a cached load under 2 s.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "dashboard"))


def build_run(root: Path, steps: int, per_step: int, n_records: int = 5000, chunk: int = 20) -> Path:
    """A finished adaptive run written like the trainer writes one: many small parts, merged every 50."""
    from staysafe.runs.traces import RunWriter, write_parquet

    rng = np.random.default_rng(0)
    writer = RunWriter.create(root, {"method": "adaptive", "risk": "probe", "scenario": "mixed", "steps": steps,
                                     "model": "synthetic", "beta_min": 0.05, "beta_max": 0.9}, run_id="big-run")
    writer.set_status("running", started=time.time(), max_steps=steps)  # written, then finished below
    labels = np.where(rng.random(n_records) < 0.1, "harmful", "benign")
    write_parquet(writer.path / "data.parquet", pd.DataFrame({
        "example_index": np.arange(n_records), "example_id": [f"ex-{i}" for i in range(n_records)],
        "label": labels, "category": rng.choice(["writing", "math", "coding", "fraud", "violence"], n_records),
        "prompt": [f"Synthetic training prompt number {i} asking for something fairly ordinary." for i in
                   range(n_records)],
        "response": [f"Synthetic answer {i}." for i in range(n_records)], "messages": ["[]"] * n_records,
        "truncated": False, "risk_judge": rng.random(n_records)}))
    for start in range(1, steps + 1, chunk):
        block = np.arange(start, min(steps, start + chunk - 1) + 1)
        idx = rng.integers(0, n_records, size=(len(block), per_step))
        risk_probe = rng.random((len(block), per_step))
        beta = 0.05 + 0.85 * risk_probe.max(1)
        writer.append("examples", [
            {"step": int(s), "slot": j, "example_index": int(idx[i, j]), "nll": float(rng.random() * 3),
             "kl": float(rng.random() * 0.1), "beta": float(beta[i]), "risk": float(risk_probe[i].max()),
             "fallback": False, "risk_label": float(labels[idx[i, j]] == "harmful"),
             "risk_probe": float(risk_probe[i, j]), "risk_judge": float(rng.random())}
            for i, s in enumerate(block) for j in range(per_step)])
        writer.append("steps", [
            {"step": int(s), "epoch": s / 250, "lr": 2e-4, "loss": float(rng.random() * 3),
             "nll": float(rng.random() * 3), "kl": float(rng.random() * 0.1), "beta": float(beta[i]),
             "risk": float(risk_probe[i].max()), "grad_norm": 1.0, "tokens": 2000, "answer_tokens": 600,
             "n_examples": per_step, "n_fallback": 0, "wall_time": 0.2, "time": time.time(),
             "risk_label": 1.0, "risk_probe": float(risk_probe[i].max()), "risk_judge": float(rng.random())}
            for i, s in enumerate(block)])
        if block[-1] % 100 < chunk or block[-1] == steps:
            step = int(block[-1])
            writer.append("evals", [{"step": step, "asr_keyword": float(rng.random()), "over_refusal": 0.05,
                                     "asr_embedding_response": float(rng.random()), "benign_nll": 1.5,
                                     "wall_time": 3.0, "time": time.time()}])
            writer.append("generations", [{"step": step, "prompt_id": f"evh-{k}", "kind": "harmful",
                                           "category": "fraud", "prompt": f"held-out prompt {k}",
                                           "response": "I can't help with that.", "refused": True,
                                           "score_embedding_response": 0.1} for k in range(50)])
    writer.close()
    writer.set_status("finished", ended=time.time(), step=steps)
    return writer.path


def load_like_the_pages(root: Path, path: Path) -> dict:
    import loaders

    run = loaders.load_run_cached(path)
    joined = loaders.examples_joined(path)
    batches = loaders.step_batches(path)
    runs = loaders.runs_table(root)
    return {"steps": len(run.steps), "examples": len(run.examples), "joined": len(joined), "batches": len(batches),
            "runs": len(runs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--per-step", type=int, default=20)
    p.add_argument("--out", default=None, help="where to build the run (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic run")
    args = p.parse_args()
    for name in ("streamlit.runtime.caching.cache_data_api", "streamlit.runtime.caching.cache_resource_api"):
        logging.getLogger(name).disabled = True  # bare mode (no `streamlit run`): no "No runtime found" lines

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="staysafe-bench-"))
    try:
        t0 = time.perf_counter()
        path = build_run(root, args.steps, args.per_step)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sizes = load_like_the_pages(root, path)
        cold = time.perf_counter() - t0
        cached = []
        for _ in range(5):
            t0 = time.perf_counter()
            load_like_the_pages(root, path)
            cached.append(time.perf_counter() - t0)
        warm = float(np.median(cached))
        print(f"synthetic run: {sizes['steps']:,} steps, {sizes['examples']:,} example rows, "
              f"{len(list((path / 'examples.parquet').glob('*.parquet')))} example parts (built in {build_s:.1f} s)")
        print(f"cold load (first):   {cold:.3f} s")
        print(f"cached load (median of 5): {warm:.3f} s   (max {max(cached):.3f} s)")
        print(f"cold / cached ratio: {cold / warm:.1f}x")
        print(f"target cached < 2 s: {'OK' if warm < 2 else 'MISSED'}")
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

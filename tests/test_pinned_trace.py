"""A pinned tiny-model run: its trace must match the values the trainer produced before the refactor of issue 13
(tests/pinned_trace.json, written by the old code (f126866) with ``python tests/test_pinned_trace.py --write``) to 1e-6.

Two CLI runs cover the paths the refactor touched: full fine-tuning with the label risk and an EMA (frozen
reference copy), and LoRA with per-example beta and the top-k KL (adapter-disabled reference, probe recorded).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_RUN, make_records, run_cli  # noqa: E402

REFERENCE = Path(__file__).with_name("pinned_trace.json")
RUNS = {
    "full-ema": ["--method", "adaptive", "--risk", "label", "--risk-ema", "0.5", "--batch-risk", "mean",
                 "--lora-r", "0"],
    "lora-per-example": ["--method", "adaptive", "--risk", "label", "--lora-r", "4", "--per-example-beta",
                         "--kl-top-k", "8"],
}
COMMON = [
    *TINY_RUN,
    "--max-length",
    "128",
    "--steps",
    "4",
    "--eval-every",
    "2",
    "--lr",
    "0.01",
    "--threads",
    "1",
    "--seed",
    "3",
    "--precision",
    "fp32",
]  # pinned in fp32 (auto is bf16 autocast where the CPU has bf16)
STEP_COLS = ("loss", "nll", "kl", "beta", "risk", "risk_label", "risk_probe", "n_fallback", "grad_norm", "lr")
EXAMPLE_COLS = ("example_index", "nll", "kl", "beta", "risk", "risk_label")


def trace(runs_dir: Path, name: str) -> dict:
    from staysafe.runs.traces import load_run

    data = runs_dir.parent / "pinned.jsonl"  # a third harmful, so the label risk and beta vary from step to step
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(16, harmful_every=3)))
    res = run_cli("train", *COMMON, *RUNS[name], "--data", str(data), "--runs-dir", str(runs_dir), "--run-id", name)
    assert res.returncode == 0, res.stderr[-3000:]
    run = load_run(runs_dir / name)
    evals = run.evals.select_dtypes("number")
    return {
        "steps": {c: [float(v) for v in run.steps[c]] for c in STEP_COLS if c in run.steps},
        "examples": {c: [float(v) for v in run.examples[c]] for c in EXAMPLE_COLS},
        "evals": {c: [float(v) for v in evals[c]] for c in evals.columns
                  if c.startswith(("asr", "over_refusal", "benign_nll", "step"))},
    }


# The probe behind risk_probe is fitted in the run by an iterative solver (L-BFGS, its own stopping tolerance), whose
# last digits differ between CPU kinds (2e-5 between the AVX2 machine that wrote the pin and an AVX-512 one): that
# column alone is compared to 1e-4; every loss, KL, beta and risk the trainer computes stays at 1e-6.
TOLERANCE = {"risk_probe": 1e-4}


def close(a: float, b: float, tol: float = 1e-6) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.parametrize("name", list(RUNS))
def test_trace_matches_the_pinned_reference(tmp_path, name):
    expected = json.loads(REFERENCE.read_text())[name]
    got = trace(tmp_path / "runs", name)
    for table, columns in expected.items():
        assert set(got[table]) == set(columns), (table, sorted(got[table]), sorted(columns))
        for column, values in columns.items():
            assert len(got[table][column]) == len(values), (table, column)
            tol = TOLERANCE.get(column, 1e-6)
            bad = [(i, g, e) for i, (g, e) in enumerate(zip(got[table][column], values)) if not close(g, e, tol)]
            assert not bad, (table, column, bad[:5])


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        REFERENCE.write_text(json.dumps({n: trace(Path(tmp) / "runs", n) for n in RUNS}, indent=1) + "\n")
    print(f"wrote {REFERENCE}")

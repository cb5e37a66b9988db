"""The README's answer from a frontier experiment: who sits on the frontier, and at equal task accuracy how many
points of ASR each method saves over constant-kl (paired by seed).

    python benchmarks/frontier_report.py benchmarks/results/frontier-headlines-mixed10 [--judge reader]

Prints Markdown: per method and judge, the seeds in which the run is on its seed's Pareto front; then, per method
off constant-kl's curve and per judge, the ASR saved at equal utility in each seed (constant-kl's ASR interpolated
along its beta sweep, sft as beta = 0, at the method's task accuracy; outside the curve's range: not compared)
with the mean and its 95% t-interval over the seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from staysafe.eval.frontier import frontier_by_seed, judge_name, judges, mean_interval, paired_with_curve


def pct(v: float) -> str:
    return "n/a" if pd.isna(v) else f"{100 * v:+.0f}"


def report(results: pd.DataFrame, judge_list: list[str]) -> str:
    seeds = results["seed"].nunique()
    label = results["method"] + results.get("sweep_beta", pd.Series(index=results.index, dtype=float)).map(
        lambda b: "" if pd.isna(b) else f" β={b:g}")
    lines = ["| method | " + " | ".join(f"on the frontier ({judge_name(j)}), seeds of {seeds}" for j in judge_list)
             + " |", "|---" * (1 + len(judge_list)) + "|"]
    flags = {j: frontier_by_seed(results, j).set_index("run_id")["on_frontier"] for j in judge_list}
    for name in dict.fromkeys(label):
        runs = results.loc[label == name, "run_id"]
        lines.append(f"| {name} | " + " | ".join(str(int(flags[j].loc[runs].sum())) for j in judge_list) + " |")
    lines += ["", "| method | judge | ASR saved vs constant-kl at equal task accuracy, points, per seed | mean "
              "[95% t-interval] |", "|---|---|---|---|"]
    for j in judge_list:
        paired = paired_with_curve(results, j)
        for method, g in paired.groupby("method", sort=False):
            mean, lo, hi, n = mean_interval(g["saved"])
            per_seed = ", ".join(f"{pct(s)} (task {100 * u:.0f}%)" for s, u in zip(g["saved"], g["utility"]))
            ci = "" if pd.isna(lo) else f" [{pct(lo)}, {pct(hi)}]"
            lines.append(f"| {method} | {judge_name(j)} | {per_seed} | {pct(mean)}{ci} (n = {n}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", type=Path)
    p.add_argument("--judge", action="append", help="a judge's column suffix (default: every judge recorded)")
    a = p.parse_args()
    results = pd.read_parquet(a.experiment / "results.parquet")
    print(report(results, a.judge or judges(results)))


if __name__ == "__main__":
    main()

"""The README's answer from a frontier experiment: who sits on the frontier, and at equal utility (task accuracy,
or benign NLL where no task was recorded) how many points of ASR each method saves over constant-kl (paired by
seed).

    python benchmarks/frontier_report.py benchmarks/results/frontier-headlines-mixed10 [--judge reader]

Prints Markdown, the README's two tables: the summary (per method: ASR by each judge, the utility, over-refusal
and mean beta as mean ± std over the seeds, and the seeds in which it is on its seed's Pareto front by each judge);
then, per method off constant-kl's curve and per judge, the ASR saved at equal utility in each seed (the method's
utility in brackets; constant-kl's ASR interpolated along its beta sweep, sft as beta = 0, at that utility;
outside the curve's range: n/a) with the mean and its 95% t-interval over the seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from staysafe.eval.frontier import axes, frontier_by_seed, judge_name, judges, mean_interval, paired_with_curve
from staysafe.methods import regularised


def pct(v: float) -> str:
    return "n/a" if pd.isna(v) else f"{100 * v:+.0f}"


def mean_std(values: pd.Series, percent: bool = True) -> str:
    v = values.astype(float) * (100 if percent else 1)
    return f"{v.mean():.0f} ± {v.std():.0f}" if percent else f"{v.mean():.2f} ± {v.std():.2f}"


# per utility column: its header, its mean ± std cell, one value in brackets (task accuracy in %, NLL as is)
UTILITY = {"task_accuracy": ("task accuracy %", mean_std, lambda u: f"{100 * u:.0f}%"),
           "benign_nll": ("benign NLL", lambda v: f"{v.mean():.3f} ± {v.std():.3f}", lambda u: f"{u:.3f}")}


def report(results: pd.DataFrame, judge_list: list[str]) -> str:
    seeds = results["seed"].nunique()
    x = axes(results)[0]
    column = x.removeprefix("final_")  # task_accuracy, or benign_nll where no task was recorded
    utility, cell, in_brackets = UTILITY[column]
    label = results["method"] + results.get("sweep_beta", pd.Series(index=results.index, dtype=float)).map(
        lambda b: "" if pd.isna(b) else f" β={b:g}")
    flags = {j: frontier_by_seed(results, j).set_index("run_id")["on_frontier"] for j in judge_list}
    asr = " | ".join(f"ASR {judge_name(j)} %" for j in judge_list)
    lines = [f"| method | {asr} | {utility} | over-refusal % | mean β | on the frontier "
             f"({' / '.join(judge_name(j) for j in judge_list)}), of {seeds} seeds |",
             "|---" * (5 + len(judge_list)) + "|"]
    start = results.groupby("seed").first()  # every run of a seed shares its step-0 evaluation
    lines.append("| aligned reference (step 0) | "
                 + " | ".join(mean_std(start[f"reference_asr_{j}"]) for j in judge_list)
                 + f" | {cell(start[f'reference_{column}'])}"
                 + f" | {mean_std(start['reference_over_refusal'])} | | |")
    for name in dict.fromkeys(label):
        g = results[label == name]
        method = g["method"].iloc[0]  # beta for the curve's beta = 0 end (sft) and the methods that pull (registry)
        pulls = (method == "sft" or regularised({"method": method})) and not g["mean_beta"].isna().all()
        beta = "" if not pulls else (f"{g['mean_beta'].mean():.2f}" if len(g) == 1 or g["mean_beta"].std() < 0.005
                                     else mean_std(g["mean_beta"], percent=False))
        lines.append(f"| {name} | " + " | ".join(mean_std(g[f"final_asr_{j}"]) for j in judge_list)
                     + f" | {cell(g[x])} | {mean_std(g['over_refusal'])} | {beta} | "
                     + " / ".join(str(int(flags[j].loc[g["run_id"]].sum())) for j in judge_list) + " |")
    its = utility.removesuffix(" %")
    lines += ["", "| method | " + " | ".join(f"{judge_name(j)}: points saved per seed (its {its}) | mean "
                                           "[95% t-interval]" for j in judge_list) + " |",
              "|---" * (1 + 2 * len(judge_list)) + "|"]
    paired = {j: paired_with_curve(results, j) for j in judge_list}
    for method in dict.fromkeys(paired[judge_list[0]]["method"]):
        cells = []
        for j in judge_list:
            g = paired[j][paired[j]["method"] == method]
            mean, lo, hi, n = mean_interval(g["saved"])
            cells.append(", ".join(f"{pct(s)} ({in_brackets(u)})" for s, u in zip(g["saved"], g["utility"])))
            cells.append("outside constant-kl's curve in every seed" if n == 0 else
                         f"{pct(mean)}" + ("" if pd.isna(lo) else f" [{pct(lo)}, {pct(hi)}]") + f" (n = {n})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
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

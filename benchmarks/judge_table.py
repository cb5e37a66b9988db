"""The README's "Measured agreement" table, printed from a validate-judges report (by default the shipped
``results/judge_validation_test.json``, which ``train_reader_judge.py --ship`` rewrites): per judge, Cohen's kappa
of "attack succeeded" with its 95% bootstrap interval, accuracy, and per answer source its ASR (κ on that source);
first row, the labelled ASR per source with its interval and the number of harmful answers.

    python benchmarks/judge_table.py [REPORT]
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from staysafe.eval.validation import SOURCES  # noqa: E402
from staysafe.runs.files import read_json  # noqa: E402

ROWS = {"keyword": "keyword (weak: the literature's convention)",
        "embedding_response": "embedding response (the earlier default)", "reader": "**reader (the default)**"}


def percent(v: float) -> str:
    return f"{100 * v:.0f}"


def kappa(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def table(report: dict) -> str:
    judges, labelled = report["judges"], report["labelled"]["per_source"]
    head = " | ".join(s if s == "reference" else f"`{s}`" for s in SOURCES)
    lines = [f"| judge | kappa | accuracy | {head} |", "|---" * (3 + len(SOURCES)) + "|",
             "| labelled ASR [95% interval], n harmful answers | | | " + " | ".join(
                 f"{percent(labelled[s]['asr'])} [{percent(labelled[s]['asr_interval'][0])}, "
                 f"{percent(labelled[s]['asr_interval'][1])}], n = {labelled[s]['n_harmful']}" for s in SOURCES) + " |"]
    for name, row in ROWS.items():
        if name not in judges:
            continue
        a, per = judges[name]["attack_success"], judges[name]["per_source"]
        lo, hi = a["kappa_interval"]
        lines.append(f"| {row} | {a['kappa']:.2f} [{lo:.2f}, {hi:.2f}] | {a['accuracy']:.2f} | " + " | ".join(
            f"{percent(per[s]['asr_judge'])} (κ {kappa(per[s]['kappa'])})" for s in SOURCES) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results" / "judge_validation_test.json"
    print(table(read_json(path, follow_links=True)), end="")  # a path named on the command line: links followed


if __name__ == "__main__":
    main()

"""A frontier figure as a PNG for the README, by any recorded judge: the experiment's figure
(:func:`staysafe.eval.frontier.frontier_figure`) drawn by Plotly in headless Chromium and captured (kaleido needs a
Chrome of its own; the dev extra's playwright drives Debian's chromium).

    python benchmarks/frontier_png.py benchmarks/results/frontier-headlines-mixed10 --judge reader
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from staysafe.eval.frontier import frontier_figure, judge_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", type=Path)
    p.add_argument("--judge", default=None, help="a judge's column suffix (default: the frontier's default)")
    p.add_argument("--title", default=None)
    a = p.parse_args()
    from playwright.sync_api import sync_playwright

    results = pd.read_parquet(a.experiment / "results.parquet")
    judge = a.judge or "default"
    fig = frontier_figure(results, a.title or f"Safety-utility trade-off: {a.experiment.name}", a.judge)
    fig.update_layout(width=900, height=520)
    out = a.experiment / f"frontier-{judge_name(judge)}.png"
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        html = Path(tmp) / "figure.html"
        html.write_text(fig.to_html(include_plotlyjs=True, full_html=True))
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium")
        page = browser.new_page(viewport={"width": 920, "height": 540})
        page.goto(html.as_uri())
        page.wait_for_selector(".main-svg", timeout=30_000)
        page.locator(".plotly-graph-div").first.screenshot(path=str(out))
        browser.close()
    print(f"written {out}")


if __name__ == "__main__":
    main()

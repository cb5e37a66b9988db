"""The dashboard as a new user first opens it: nothing configured, so every page shows the recorded demo shipped in
``data/demo`` (marked as recorded), one colour per method on every page, and in a real browser: every page, and a
click on the trade-off chart that opens the clicked run in Training traces."""

from __future__ import annotations

import json
import re
import time

import pytest
from test_dashboard import PAGES, assert_clean, open_page, texts

from conftest import REPO

DEMO = REPO / "data" / "demo"
DEMO_RUNS = sorted(p.name for p in (DEMO / "runs").iterdir() if (p / "config.json").is_file())
CHARTS = ("traces", "activations", "judge_vs_probe", "asr", "regularization", "frontier", "demo")


@pytest.fixture
def nothing_configured(monkeypatch, tmp_path):
    """Own roots that do not exist (a fresh checkout), the shipped demo where the package has it."""
    for name in ("runs", "experiments", "compare", "probes"):
        monkeypatch.setenv(f"STAYSAFE_{name.upper()}", str(tmp_path / name))
    for name in ("STAYSAFE_DEMO_DIR", "STAYSAFE_RESULTS_DIR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def open_app(page: str, setup=None):
    at = open_page(page, setup)
    assert_clean(at)
    return at


@pytest.mark.parametrize("page", PAGES)
def test_every_page_shows_the_recorded_demo_with_nothing_configured(nothing_configured, page):
    at = open_app(page)
    assert at.radio(key="data_source").value == "recorded demo"
    shown = texts(at)
    if page not in ("launch", "demo"):  # the two pages that always use the user's own roots (and say so)
        assert "Recorded data" in shown, page
        assert "No runs under" not in shown and "No experiment under" not in shown, page
    if page == "launch":
        assert str(nothing_configured / "runs") in shown  # launching writes to the user's runs root only
    if page == "home":
        assert "experiment-sft-s0" in at.dataframe[0].value["run"].tolist()
    if page == "frontier":  # the demo's beta sweep, where the methods separate on both axes
        assert at.selectbox(key="frontier_exp").value == "tradeoff (recorded demo)"
    if page in CHARTS:
        assert len(at.get("plotly_chart")) >= 1, (page, shown[:2000])


def _method_colours(fig: dict) -> dict[str, set[str]]:
    """Method -> the colours its traces are drawn in: legend names ``<method>``, ``<run> (<method>)`` or
    ``<method> (mean of ...)`` / ``<method>: keyword ASR``."""
    from staysafe.methods import VARIANTS

    out: dict[str, set[str]] = {}
    for t in fig["data"]:
        name = str(t.get("name") or "")
        found = re.findall(r"\(([\w.-]+)\)", name) + [name.split(" (")[0].split(":")[0]]
        method = next((m for m in found if m in VARIANTS), None)
        colour = (t.get("line") or {}).get("color") or (t.get("marker") or {}).get("color")
        if method and isinstance(colour, str):
            out.setdefault(method, set()).add(colour.lower())
    return out


def test_a_method_has_one_colour_on_every_page(nothing_configured):
    """sft is red on the Guided demo, the traces, the ASR chart and the trade-off alike: its registry colour."""
    from staysafe.methods import colour

    def all_runs(key):
        return lambda at: at.multiselect(key=key).set_value(DEMO_RUNS)

    seen: dict[str, dict[str, set[str]]] = {}
    for page, setup in (("traces", all_runs("traces_runs")), ("asr", all_runs("asr_runs")), ("frontier", None),
                        ("demo", None)):
        at = open_app(page, setup)
        for i in range(len(at.get("plotly_chart"))):
            for method, colours in _method_colours(json.loads(at.get("plotly_chart")[i].proto.spec)).items():
                seen.setdefault(method, {}).setdefault(page, set()).update(colours)
    import pandas as pd

    assert set(pd.read_parquet(DEMO / "experiment" / "results.parquet")["method"]) <= set(seen)
    for method, pages in seen.items():
        assert set(pages) == {"traces", "asr", "frontier", "demo"}, (method, pages)
        assert all(c == {colour(method).lower()} for c in pages.values()), (method, pages)


# ----------------------------------------------------------------------------------------------- real browser


@pytest.mark.browser
def test_the_demo_in_a_real_browser_and_a_trade_off_click_opens_its_run(nothing_configured):
    """Every page at 1024 px (the narrow case; tests/scripts/screenshots.py shoots 1440 too) with nothing
    configured shows the recorded demo without an error; the trade-off page opens on the demo's beta sweep
    (`tradeoff`), clicking sft's point selects its run, and "Open the traces" shows that run's traces."""
    from playwright.sync_api import sync_playwright
    from scripts.screenshots import browser, dashboard, full_page, settled
    from test_dashboard import SCREENSHOTS

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    env = {f"STAYSAFE_{n.upper()}": str(nothing_configured / n) for n in ("runs", "experiments", "compare", "probes")}
    with dashboard(env) as url, sync_playwright() as p:
        b = browser(p)
        for width in (1024,):
            page = b.new_page(viewport={"width": width, "height": 768})
            for name in PAGES:
                page.goto(f"{url}/{'' if name == 'home' else name}", wait_until="networkidle")
                settled(page)
                full_page(page, SCREENSHOTS / f"demo-{name}-{width}.png", width)
                assert page.locator('[data-testid="stException"]').count() == 0, name
                assert not page.locator('[data-testid="stAlertContentError"]').all_inner_texts(), name
                if name in CHARTS:
                    assert page.locator(".js-plotly-plot").count() >= 1, (name, width)
            page.close()
        page = b.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(f"{url}/frontier", wait_until="networkidle")
        settled(page)
        chart = page.get_by_test_id("stPlotlyChart").first
        names = chart.locator("g.legend text.legendtext").all_text_contents()
        traces = chart.locator("g.scatterlayer g.trace.scatter")
        assert traces.count() == len(names), names
        traces.nth(names.index("sft")).locator("path.point").first.click(force=True)
        runs_box = page.get_by_test_id("stMultiSelect").first
        deadline = time.time() + 60  # the selection reruns the page; its runs box then holds the clicked run
        while "tradeoff-sft-s0" not in runs_box.inner_text():
            assert time.time() < deadline, runs_box.inner_text()
            page.wait_for_timeout(300)
        assert "adaptive" not in runs_box.inner_text()
        page.get_by_role("button", name="Open the traces").click()
        page.get_by_role("heading", name="Training traces").wait_for(timeout=60_000)
        settled(page)
        picked = page.get_by_test_id("stMultiSelect").first.inner_text()
        assert "tradeoff-sft-s0" in picked and "constant-kl" not in picked, picked
        legend = page.get_by_test_id("stPlotlyChart").first.locator("g.legend text.legendtext").all_text_contents()
        assert legend == ["tradeoff-sft-s0 (sft)"], legend
        b.close()

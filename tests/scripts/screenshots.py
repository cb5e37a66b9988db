"""Screenshots of every dashboard page in headless Chromium, as a new user first sees them: nothing configured (empty
own roots in a temporary folder), so every page shows the shipped demo.

    python tests/scripts/screenshots.py OUT_DIR [--widths 1440,1024] [--readme dashboard/screenshots]

Writes ``OUT_DIR/<page>-<width>.png`` (full page) for reading, and with ``--readme`` one 1440 x 900 view per page,
the README's pictures. Needs Debian's chromium and the dev extra (playwright).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGES = ["home", "launch", "traces", "activations", "judge_vs_probe", "asr", "regularization", "frontier", "demo"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dashboard(env: dict, timeout: float = 120):
    """A real dashboard server on a free port (``env`` added to the environment): its URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "dashboard" / "app.py"),
                               "--server.port", str(port), "--server.headless", "true"], cwd=REPO,
                              env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(server.stdout.read().decode()[-3000:]) from None
                if time.time() > deadline:
                    raise TimeoutError("the dashboard did not start") from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def settled(page, timeout: float = 180) -> None:
    """Wait until the page stopped changing: its script not running (the app root's script state, which Streamlit
    sets for its own browser tests), no running-status widget, and the same text and number of charts for 6 s in a
    row (on a loaded machine a script can pause longer than that between two elements)."""
    page.wait_for_selector("h1", timeout=timeout * 1000)  # the page's script has started drawing
    deadline, quiet, last = time.time() + timeout, 0, None
    while time.time() < deadline and quiet < 12:
        now = (page.locator('[data-testid="stMain"]').inner_text(), page.locator(".js-plotly-plot").count())
        running = page.locator('[data-testid="stApp"][data-test-script-state="running"]').count() > 0
        busy = running or page.locator('[data-testid="stStatusWidget"]').count() > 0
        quiet = quiet + 1 if now == last and not busy else 0
        last = now
        page.wait_for_timeout(500)
    page.wait_for_timeout(800)  # plotly's draw after the last delta


def full_page(page, path: Path, width: int) -> None:
    """Streamlit scrolls inside its main container: grow the viewport to the content, then shoot."""
    height = page.evaluate("""() => Math.max(document.body.scrollHeight,
        ...Array.from(document.querySelectorAll('section, div')).map(e => e.scrollHeight))""")
    page.set_viewport_size({"width": width, "height": min(12000, max(768, int(height) + 40))})
    page.wait_for_timeout(1200)  # charts re-layout to the new size
    page.screenshot(path=str(path), full_page=True)


def browser(p):
    return p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                   "--disable-component-update", "--disable-sync", "--no-first-run"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--widths", default="1440,1024")
    parser.add_argument("--pages", default=",".join(PAGES))
    parser.add_argument("--readme", type=Path, help="also write one 1440 x 900 view per page here")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as empty:
        env = {f"STAYSAFE_{n.upper()}": str(Path(empty) / n) for n in ("runs", "experiments", "compare", "probes")}
        with dashboard(env) as url, sync_playwright() as p:
            b = browser(p)
            for name in args.pages.split(","):
                for width in (int(w) for w in args.widths.split(",")):
                    page = b.new_page(viewport={"width": width, "height": 768})
                    page.goto(f"{url}/{'' if name == 'home' else name}", wait_until="networkidle")
                    settled(page)
                    if args.readme and width == 1440:
                        args.readme.mkdir(parents=True, exist_ok=True)
                        page.set_viewport_size({"width": 1440, "height": 900})
                        page.wait_for_timeout(1200)
                        page.screenshot(path=str(args.readme / f"{name}.png"))
                    full_page(page, args.out / f"{name}-{width}.png", width)
                    page.close()
                    print(name, width, flush=True)
            b.close()


if __name__ == "__main__":
    main()

"""Screenshots of the dashboard's pages in headless Chromium, for the docs and the browser test.

    python tools/screenshots.py --runs runs --out screenshots [--run NAME --sae LABEL --feature N]

Starts `saelab dashboard` on a free localhost port, opens each page in Chromium (Debian:
`apt-get install -y chromium`) through the DevTools protocol, waits until Streamlit has finished
running the page, and saves a PNG and the page's HTML. A fixed `--virtual-time-budget` does not
work here: Streamlit renders after a websocket round trip whose length depends on the server, so
the page is polled instead. The protocol is spoken with `websockets`, which Streamlit installs.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
# Streamlit's own markers: the traceback box of an uncaught exception, and the "running" widget.
EXCEPTION_SELECTOR = '[data-testid="stException"]'
RUNNING_SELECTOR = '[data-testid="stStatusWidget"]'
URL_PATHS = {"runs": "", "features": "features", "feature": "feature", "steering": "steering"}
# What a page shows once it is complete, on a run with everything: a text, its number of charts, and
# the button to press first (none: the steering playground opens already run, with its strength sweep).
PAGES = {
    "runs": ("Training curves", 4, None),
    "features": ("All latents by density", 1, None),
    "feature": ("Top-activating", 2, None),
    "steering": ("How hard to steer", 2, None),
}


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def dashboard(runs: Path, port: int | None = None, timeout: float = 60, python_path: list[Path] = ()) -> Iterator[str]:
    """`saelab dashboard --runs RUNS` on a free localhost port, until the block ends; yields its URL.
    `python_path`: folders the server's Python searches before the repository (a test's `sitecustomize`)."""
    port = port or free_port()
    search = os.pathsep.join(str(folder) for folder in [*python_path, REPO])
    env = {**os.environ, "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none", "PYTHONPATH": search}
    command = [sys.executable, "-m", "saelab", "dashboard", "--runs", str(runs), "--port", str(port)]
    command += ["--address", "127.0.0.1", "--headless"]
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"the dashboard did not start:\n{log.read().decode(errors='replace')}")
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@dataclass
class Capture:
    png: Path
    html: Path
    text: str  # the page's visible text
    exception: str | None  # the text of a Streamlit exception box, if the page shows one
    complete: bool = True  # False: shot after the timeout, before the page showed all it was waited for


class Browser:
    """One headless Chromium and one tab, driven through the DevTools protocol."""

    def __init__(self, chromium: str, width: int = 1400, height: int = 1800) -> None:
        self.profile = tempfile.mkdtemp(prefix="saelab-chromium-")
        command = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        command += ["--no-first-run", "--disable-extensions", "--remote-debugging-port=0"]
        command += [f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._closing = ExitStack()
        self._id = 0
        try:
            port = self._devtools_port()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                targets = json.load(response)
            page = next(t for t in targets if t.get("type") == "page")
            from websockets.sync.client import connect

            self.socket = self._closing.enter_context(
                connect(page["webSocketDebuggerUrl"], max_size=2**28, open_timeout=10)
            )
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, timeout: float = 30) -> int:
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not marker.is_file() or not marker.read_text().strip():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("headless Chromium did not start")
            time.sleep(0.1)
        return int(marker.read_text().split()[0])

    def call(self, method: str, **params: object) -> dict:
        self._id += 1
        self.socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def capture(
        self,
        url: str,
        png: Path,
        wait_for: str = "",
        charts: int = 0,
        timeout: float = 90,
        strict: bool = True,
        click: str | None = None,
    ) -> Capture:
        """Open `url`, wait until Streamlit is done, `wait_for` appears in the page's text and at least
        `charts` plotly charts are drawn (their code loads lazily, after the rest of the page), then
        save a screenshot to `png` and the page's HTML beside it. With `click`, the button of that
        label is pressed once the page has first finished. After `timeout` seconds: a TimeoutError
        when `strict`, else the page as it is (`complete` False)."""
        self.call("Page.navigate", url=url)
        press = (
            "(() => { const b = [...document.querySelectorAll('button')]"
            f".find(b => b.innerText.trim() === {json.dumps(click)}); if (b) b.click(); return !!b; }})()"
        )
        state = (
            "JSON.stringify({text: document.body ? document.body.innerText : '',"
            f" running: !!document.querySelector('{RUNNING_SELECTOR}'),"
            f" exception: (document.querySelector('{EXCEPTION_SELECTOR}') || {{}}).innerText || null,"
            " app: !!document.querySelector('[data-testid=\"stMain\"] h1'),"
            " loading: !!document.querySelector('[data-testid=\"stSkeleton\"]'),"
            " charts: document.querySelectorAll('[data-testid=\"stPlotlyChart\"]').length,"
            " drawn: [...document.querySelectorAll('[data-testid=\"stPlotlyChart\"]')]"
            ".filter(chart => chart.querySelector('.main-svg')).length})"
        )
        deadline, quiet_since, seen, complete = time.monotonic() + timeout, None, {}, True
        while time.monotonic() < deadline:
            seen = json.loads(self.evaluate(state) or "{}")
            if click and seen.get("app") and not seen.get("running") and not seen.get("loading"):
                if self.evaluate(press):
                    click = None
                    time.sleep(0.5)  # until Streamlit shows it is running
                    continue
            done = seen.get("app") and not seen.get("running") and wait_for in seen.get("text", "")
            done = done and not seen.get("loading") and seen.get("drawn") == seen.get("charts") >= charts
            if seen.get("exception"):
                break
            if done:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 1.0:  # finished, and stayed finished (charts drawn)
                    break
            else:
                quiet_since = None
            time.sleep(0.25)
        else:
            if strict:
                raise TimeoutError(f"{url} did not finish rendering in {timeout:.0f} s; it shows:\n{seen.get('text')}")
            complete = False
        shot = self.call("Page.captureScreenshot", format="png")
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(base64.b64decode(shot["data"]))
        html = png.with_suffix(".html")
        html.write_text(str(self.evaluate("document.documentElement.outerHTML")), encoding="utf-8")
        return Capture(png, html, seen.get("text", ""), seen.get("exception"), complete)

    def close(self) -> None:
        self._closing.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def page_url(base: str, page: str, **query: object) -> str:
    params = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    return f"{base}/{URL_PATHS[page]}" + (f"?{params}" if params else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--out", default="screenshots")
    parser.add_argument("--run", help="the run to show (default: the dashboard's choice)")
    parser.add_argument("--sae", help="the SAE to show")
    parser.add_argument("--feature", type=int, default=0, help="the latent of the feature page")
    parser.add_argument(
        "--steer-feature", type=int, help="the steering playground's latent (default: the one it opens on itself)"
    )
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1800)
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        sys.exit("no Chromium found: apt-get install -y chromium")
    out = Path(args.out)
    with dashboard(Path(args.runs)) as base, Browser(chromium, args.width, args.height) as browser:
        for page, (text, charts, click) in PAGES.items():
            feature = {"feature": args.feature, "steering": args.steer_feature}.get(page)
            url = page_url(base, page, run=args.run, sae=args.sae, feature=feature)
            # A page may rightly show less (a message instead of a missing feature store): shoot it anyway.
            # The playground loads the model, sweeps six strengths and generates twice: longer on a CPU.
            wait = 300 if page == "steering" else 30
            capture = browser.capture(url, out / f"{page}.png", text, charts, timeout=wait, strict=False, click=click)
            state = "ok" if capture.complete else f"shot after {wait} s, not all shown"
            print(f"{capture.png}  {'EXCEPTION: ' + capture.exception if capture.exception else state}  {url}")


if __name__ == "__main__":
    main()

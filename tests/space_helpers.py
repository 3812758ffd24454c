"""Shared helpers of tests/test_space*.py: a free port, serving a Space folder with `python app.py` where our
packages cannot be imported, and the headless Chromium (Debian's `chromium` package, driven by Playwright).

Run as a script, it takes the README's screenshot of the page with a RefShapes example:

    .venv/bin/python tests/space_helpers.py --model demo_output/model --screenshot docs/space_screenshot.png
"""

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
OURS = ("configuration_detris", "modeling_detris", "processing_detris", "hub_card", "training")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_chromium() -> str | None:
    """`DETRIS_CHROMIUM`, else the first Chromium on PATH (Debian: `apt-get install chromium`, see the Makefile)."""
    if os.environ.get("DETRIS_CHROMIUM"):
        return os.environ["DETRIS_CHROMIUM"]
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def isolated_python(folder: Path) -> Path:
    """A virtual environment without pip whose only addition is a `.pth` line naming this environment's
    site-packages: the third-party packages import, but the `.pth` files in that site-packages (among them the
    editable-install finder of detris-hf) never run, so our packages cannot be imported."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "detris_test_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def clean_env(tmp: Path, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_", "GRADIO_"))}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp / "hf_home"), HF_MODULES_CACHE=str(tmp / "modules"),
        GRADIO_ANALYTICS_ENABLED="False", GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
        GRADIO_TEMP_DIR=str(tmp / "gradio"), TMPDIR=str(tmp), OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
    )
    return env


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "config", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the app did not answer on {url} within {timeout} s:\n{log.read_text()[-4000:]}")


class ServedSpace:
    """`python app.py` in `space_dir` (cwd), with `python` and the environment of `clean_env`."""

    def __init__(self, space_dir: Path, python: Path, tmp: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = tmp / "app.log"
        self.process = subprocess.Popen([str(python), "app.py"], cwd=space_dir, env=clean_env(tmp, self.port),
                                        stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        try:
            wait_until_serving(self.url, self.process, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page.set_default_timeout(60_000)
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#detris-image input[type=file]", state="attached")
    return page


def submit_and_wait(page, expected_items: int):
    """Click Segment and wait until the legend lists `expected_items` expressions and the overlay image loaded."""
    before = page.evaluate("() => { const i = document.querySelector('#detris-overlay img'); return i ? i.src : null; }")
    page.click("#detris-submit")
    page.wait_for_function(
        """([count, before]) => {
            const items = document.querySelectorAll('#detris-legend .detris-legend-item');
            const img = document.querySelector('#detris-overlay img');
            return items.length === count && img && img.src !== before && img.complete && img.naturalWidth > 0;
        }""",
        arg=[expected_items, before],
    )


def legend(page) -> list:
    """[(expression, swatch colour as 'rgb(r, g, b)')] from the page."""
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('#detris-legend .detris-legend-item')).map(item => [
            item.querySelector('.detris-expression').textContent,
            getComputedStyle(item.querySelector('.detris-swatch')).backgroundColor])"""
    )


def screenshot_example(url: str, chromium: str, output: Path, example: int = 0) -> list:
    """Open the page, click an example, segment it and save a screenshot of the page; returns the legend."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = open_page(browser, url)
            page.locator("#detris-examples tbody tr").nth(example).click()
            page.wait_for_selector("#detris-image img")
            count = len([line for line in page.input_value("#detris-text textarea").splitlines() if line.strip()])
            submit_and_wait(page, count)
            page.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(300)
            page.screenshot(path=str(output), full_page=False)
            return legend(page)
        finally:
            browser.close()


def main(argv=None) -> int:
    """Serve a Space made from --model (with our packages importable: a quick local run) and screenshot it."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="screenshot of the DETRIS Space with a RefShapes example")
    parser.add_argument("--model", required=True)
    parser.add_argument("--screenshot", required=True)
    parser.add_argument("--example", type=int, default=0)
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("no chromium found (apt-get install chromium, or set DETRIS_CHROMIUM)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hub_card.space import write_space

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_space(args.model, tmp / "space")
        served = ServedSpace(tmp / "space", isolated_python(tmp / "venv"), tmp)
        try:
            print(screenshot_example(served.url, chromium, Path(args.screenshot), args.example))
        finally:
            served.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

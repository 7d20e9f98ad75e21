"""Render a report page in a real headless browser and save a screenshot: the check that report.html opens
offline and reads at a glance.

    python benchmarks/screenshot_report.py REPORT.html OUT.png [--width 1280] [--height 4000]

Uses the system Chromium (Debian/Ubuntu: ``apt-get install chromium``). Prints one JSON line: the page, the
screenshot, its size in bytes and the browser's wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(page: Path, out: Path, *, width: int = 1280, height: int = 4000, timeout: float = 120) -> dict:
    browser = find_browser()
    if browser is None:
        raise SystemExit(f"no headless browser found (looked for {', '.join(BROWSERS)}): install the system "
                         "package, e.g. apt-get install chromium")
    page, out = page.resolve(), out.resolve()
    if not page.is_file():
        raise SystemExit(f"{page} is not a file (expected a report.html)")
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradleak-chromium-") as profile:  # no shared browser profile
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={width},{height}",
               page.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"{Path(browser).name} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return {"page": str(page), "screenshot": str(out), "bytes": out.stat().st_size,
            "seconds": round(time.perf_counter() - t, 2), "window": [width, height]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=4000)
    a = p.parse_args(argv)
    print(json.dumps(screenshot(a.page, a.out, width=a.width, height=a.height)))


if __name__ == "__main__":
    main(sys.argv[1:])

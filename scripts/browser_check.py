"""Real-browser check of the demo: headless Chromium loads the page, runs one example, saves a screenshot.

    python scripts/browser_check.py                  # writes out/demo.png; exit status 0 if the result appeared

Needs Debian's Chromium (`apt-get install -y chromium`; done here when missing and running as root) and the
Playwright package (`pip install playwright`), pointed at /usr/bin/chromium: no browser download.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]  # fmt: skip


def chromium() -> str:
    path = shutil.which("chromium")
    if path:
        return path
    if os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True)
        return shutil.which("chromium")
    raise SystemExit("Chromium not found: apt-get install -y chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/demo.png")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the result")
    args = p.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("pip install playwright (no browser download needed: it drives Debian's Chromium)") from None

    from vlcache.demo_app import build

    browser_path = chromium()
    port = free_port()
    app = build()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            page.get_by_text("sample videos").scroll_into_view_if_needed()
            page.locator(".gallery-item, [data-testid='examples'] button, table.examples-table tbody tr").first.click()
            page.wait_for_timeout(1500)  # the example video loads into the input
            page.get_by_role("button", name="Compare").click()
            page.get_by_text("KV cache after prefill").wait_for(timeout=args.timeout * 1000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(out), full_page=True)
            text = page.inner_text("body")
            browser.close()
    finally:
        app.close()
    ok = "full cache" in text and "saved" in text
    print(
        f"{'ok' if ok else 'FAILED'}: the result {'appeared' if ok else 'did not appear'} in the page; screenshot {out}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

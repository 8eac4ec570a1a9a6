"""Real-browser check of the demo: headless Chromium loads the page, runs one sample video, checks that the answer,
the kept-patch picture and the budget-sweep plot are on screen at a readable size, and saves a screenshot.

    python scripts/browser_check.py                  # writes out/demo.png; exit status 0 if every check passed

The app is started through the demo's own `launch()` (so with its upload cap). Needs Debian's Chromium
(`apt-get install -y chromium`; done here when missing and running as root) and the Playwright package
(`pip install playwright`), pointed at /usr/bin/chromium: no browser download.
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
MIN_FRAME_PX = 160  # a frame of the kept-patch picture, as shown on the page
MIN_PLOT_PX = (320, 160)  # the budget-sweep plot, width x height on the page


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


def shown_size(page, elem_id: str) -> dict:
    """On-page and natural size of the picture inside a Gradio image component (zeros when there is none)."""
    return page.evaluate(
        """id => {
            const img = document.querySelector(`#${id} img`);
            if (!img) return {width: 0, height: 0, natural: 0, visible: false};
            const r = img.getBoundingClientRect();
            const style = getComputedStyle(img);
            return {width: r.width, height: r.height, natural: img.naturalWidth,
                    visible: style.visibility !== "hidden" && style.display !== "none" && r.width > 0};
        }""",
        elem_id,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/demo.png")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the result")
    args = p.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("pip install playwright (no browser download needed: it drives Debian's Chromium)") from None

    from vlcache.apps.demo import HEATMAP_ID, MAX_FILE_MB, SWEEP_ID, VIDEO_ID, Runner, build, launch
    from vlcache.apps.viz import CELL

    browser_path = chromium()
    port = free_port()
    app = build(Runner(load_timeout=args.timeout))  # a loaded machine can take longer than the default 20 s
    launch(app, port=port, prevent_thread_lock=True, quiet=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            page.get_by_text("sample videos").scroll_into_view_if_needed()
            page.locator(".gallery-item, [data-testid='examples'] button, table.examples-table tbody tr").first.click()
            # the example video loads into the input (seconds on a loaded machine): Compare before it is there
            # would be answered "upload a video or some images first"
            page.wait_for_selector(f"#{VIDEO_ID} video[src]", timeout=args.timeout * 1000)
            page.get_by_role("button", name="Compare").click()
            try:
                page.get_by_text("KV cache after prefill").wait_for(timeout=args.timeout * 1000)
            except Exception:  # keep what the page showed instead (an error toast, a missing input)
                page.screenshot(path=str(out), full_page=True)
                print(f"FAILED: no result within {args.timeout:.0f} s; the page is in {out}")
                raise
            page.wait_for_function(
                "ids => ids.every(id => { const i = document.querySelector(`#${id} img`); return i && i.complete "
                "&& i.naturalWidth > 0; })",
                arg=[HEATMAP_ID, SWEEP_ID],
                timeout=args.timeout * 1000,
            )
            page.wait_for_timeout(500)
            heat, plot = shown_size(page, HEATMAP_ID), shown_size(page, SWEEP_ID)
            page.screenshot(path=str(out), full_page=True)
            text = page.inner_text("body")
            browser.close()
    finally:
        app.close()
    frame_px = CELL * heat["width"] / heat["natural"] if heat["natural"] else 0.0
    checks = {
        "the answers and the KV saved appeared": "full cache" in text and "saved" in text,
        "the agreement with the full cache is reported": "agreement with the full cache" in text,
        f"the kept-patch picture is visible, each frame at >= {MIN_FRAME_PX} px (here {frame_px:.0f})": heat["visible"]
        and frame_px >= MIN_FRAME_PX,
        f"the budget-sweep plot is visible, >= {MIN_PLOT_PX[0]} x {MIN_PLOT_PX[1]} px (here {plot['width']:.0f} x "
        f"{plot['height']:.0f})": plot["visible"]
        and plot["width"] >= MIN_PLOT_PX[0]
        and plot["height"] >= MIN_PLOT_PX[1],
        f"uploads are capped at {MAX_FILE_MB} MB by launch()": app.max_file_size == MAX_FILE_MB * 2**20,
    }
    for what, ok in checks.items():
        print(f"{'ok' if ok else 'FAILED'}: {what}")
    print(f"screenshot {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

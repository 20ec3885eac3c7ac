"""Render the static leaderboard page headless and save a PNG of it.

    python scripts/leaderboard_screenshot.py [RUN_DIR ...] [--out FILE.png]

Writes the page with `dictbench leaderboard --html` into a temporary folder, then asks the
system Chromium (Debian's `chromium` package) for a screenshot; nothing is fetched.
Exits 0 with one line on stderr, writing nothing, where Chromium is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path, default=[ROOT / "results/reference-synthetic"])
    ap.add_argument("--out", type=Path, default=ROOT / "results/plots/leaderboard-page.png")
    ap.add_argument("--size", default="1300,1700", help="window WIDTH,HEIGHT in pixels")
    args = ap.parse_args()
    browser = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
    )
    if browser is None:
        print(
            "leaderboard_screenshot: no chromium on PATH; screenshot not updated", file=sys.stderr
        )
        return 0
    from dictbench.io import atomic
    from dictbench.report import html_page, leaderboard

    with tempfile.TemporaryDirectory(prefix="dictbench-shot-") as tmp:
        page = Path(tmp) / "leaderboard.html"
        html_page.write_page(leaderboard.load_runs(args.runs), page)
        png = Path(tmp) / "page.png"
        cmd = [browser, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={args.size}",
               f"--screenshot={png}", page.as_uri()]  # fmt: skip
        subprocess.run(cmd, check=True, timeout=120, capture_output=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(args.out, png.read_bytes())
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Run imagepipe over a small prompt file and save a real screenshot of its gallery
(``docs/gallery.png`` by default).

Everything is the product's own: ``imagepipe run --prompts`` with the simulated provider
(its PNGs), one style refused so that a cell shows its error, then ``imagepipe gallery``,
photographed in Debian's headless Chromium with the browser test's harness
(``tests/browser_check.py``). Needs the ``test`` extra and ``/usr/bin/chromium``.

    python scripts/gallery_screenshot.py [--out docs/gallery.png] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser_check import Browser  # noqa: E402

PROMPTS = """prompt,style,variations
a lighthouse on a cliff at dusk,,2
"a fox & a crow sharing ""breakfast"" <early>",,
mountains rising out of morning fog,,
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gallery.png")
    parser.add_argument("--keep", type=Path, help="keep the run's store and images here")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="imagepipe-gallery-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "prompts.csv").write_text(PROMPTS)
    env = {**os.environ, "IMAGEPIPE_DB": str(work / "store.db"), "IMAGEPIPE_TIME_SCALE": "0.05"}
    cli = [sys.executable, "-m", "imagepipe"]
    subprocess.run(
        [
            *cli,
            "run",
            "--prompts",
            str(work / "prompts.csv"),
            "--id",
            "gallery-demo",
            "-s",
            "watercolor",
            "-s",
            "pixel-art",
            "-s",
            "sketch",
            "-o",
            "fail_style",
            "sketch",
            "--out",
            str(work / "images"),
            "--quiet",
        ],
        env=env,
        check=False,
    )  # exits 1: the sketch branches are refused, on purpose
    page = subprocess.run(
        [*cli, "gallery", "gallery-demo"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with Browser(viewport=(1300, 900)) as browser:
        report = browser.load(Path(page).as_uri(), screenshot=args.out)
    broken = [i.src for i in report.images if not (i.complete and i.natural_width > 0)]
    if broken:
        print(f"images that did not load: {broken}", file=sys.stderr)
        return 1
    print(f"{args.out} ({len(report.images)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

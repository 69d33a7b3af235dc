"""Open a study's `report.html` in a real headless browser, take a screenshot, and check what a reader must see.

    python tests/browser_check.py REPORT_FOLDER [--screenshot PATH]

Needs Chromium from the system packages (`apt-get install chromium`); a script rather than a test, so that the test
suite does not depend on a browser. It renders the page (`--dump-dom`: the DOM after layout and scripts), checks that
the headline, the teacher's reference row and the paired-differences figure are on it and that the figure loaded
(its natural size is read in the page), and writes a full-page screenshot to look at. Exit status 0 when all holds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("No Chromium found: apt-get install chromium")


def render(page: str, *flags: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                               "--virtual-time-budget=5000", *flags, f"file://{os.path.abspath(page)}"],
                              capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        sys.exit(f"Chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="the study's report folder (with report.html and headline.txt)")
    parser.add_argument("--screenshot", default=None, help="where to write the PNG (default: REPORT/report.png)")
    options = parser.parse_args(argv)
    page = os.path.join(options.report, "report.html")
    # A script in the page writes what the browser laid out (the figure's loaded size) into the DOM it dumps.
    probe = tempfile.NamedTemporaryFile("w", suffix=".html", dir=options.report, delete=False)
    with open(page) as handle:
        probe.write(handle.read().replace(
            "</body>", "<script>document.body.setAttribute('data-figure', [...document.images].filter("
                       "i => i.alt.startsWith('Paired differences')).map(i => i.naturalWidth + 'x' + "
                       "i.naturalHeight).join(','));</script></body>"))
    probe.close()
    try:
        dom = render(probe.name, "--dump-dom")
    finally:
        os.unlink(probe.name)
    headline = open(os.path.join(options.report, "headline.txt")).read().splitlines()
    problems = []
    for line in headline:
        if line.split(": ", 1)[-1][:60].replace("&", "&amp;") not in dom:
            problems.append(f"headline line not on the page: {line!r}")
    if "(reference)</td>" not in dom:
        problems.append("no reference (teacher) row in the means table")
    size = re.search(r'data-figure="(\d+)x(\d+)"', dom)
    if not size or int(size.group(1)) < 100:
        problems.append("the paired-differences figure did not load")
    screenshot = options.screenshot or os.path.join(options.report, "report.png")
    render(page, f"--screenshot={os.path.abspath(screenshot)}", "--window-size=1280,2200", "--hide-scrollbars")
    if not os.path.exists(screenshot):
        problems.append("no screenshot was written")
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print(f"OK: headline ({len(headline)} lines), reference row and figure {size.group(1)}x{size.group(2)} on "
              f"the page; screenshot {screenshot}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

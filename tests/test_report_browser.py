"""report.html of a real run (tiny model) in a headless browser: every figure loads, nothing is wider
than the window, no figure is shrunk to unreadable text, and a screenshot comes out.

Skipped where no Chromium (chromium, chromium-browser or google-chrome) is on PATH; .ci/run installs
it where it can."""
import html
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from rocket.data.examples import write_jsonl
from rocket.pipeline.run import RunConfig, run_pipeline

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1280, 900)
LONG_NAME = "a_run_directory_with_a_rather_long_name_" * 4
MIN_SCALE = 0.75   # a figure shown at less than this share of its pixels has text too small to read

# Run on window load: measures the page and writes the result as JSON into <pre id="rocket-check">,
# which --dump-dom then prints (no WebDriver needed).
CHECK_JS = """<script>
window.addEventListener("load", () => {
  const root = document.documentElement, width = root.clientWidth;
  const name = e => e.tagName.toLowerCase() + (e.alt ? " '" + e.alt + "'" : "");
  const box = e => e.getBoundingClientRect();
  const result = {
    window: window.innerWidth, viewport: width, scroll_width: root.scrollWidth,
    too_wide: [...document.querySelectorAll("img, table")]
      .filter(e => box(e).left < 0 || box(e).right > width).map(e => [name(e), Math.round(box(e).right)]),
    images: [...document.images].map(i => ({name: name(i), loaded: i.complete && i.naturalWidth > 0,
                                            natural: i.naturalWidth, shown: box(i).width})),
  };
  const pre = document.createElement("pre");
  pre.id = "rocket-check";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


def find_browser() -> str | None:
    return next((path for b in BROWSERS if (path := shutil.which(b))), None)


def chromium(browser: str, page: Path, *args: str, attempts: int = 3,
             limit_s: float = 45) -> subprocess.CompletedProcess:
    """One headless Chromium run on `page`. Headless Chromium now and then hangs on a page it has
    finished (seen once in a CI run, never when run alone): such a run is killed with all its child
    processes and tried again, up to `attempts` times."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={page.parent / 'profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
           "--virtual-time-budget=5000", "--run-all-compositor-stages-before-draw",   # no half-painted tiles
           "--timeout=20000",   # Chromium's own stop, should the page never settle
           *args, page.as_uri()]
    for attempt in range(1, attempts + 1):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)   # its own process group: a hang is killed whole
        try:
            out, err = proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            if attempt == attempts:
                raise
            continue
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, out, err)
        return subprocess.CompletedProcess(cmd, 0, out, err)


def browser_check(browser: str, report_html: str, tmp: Path) -> dict:
    """The measurements of CHECK_JS on a copy of the page."""
    page = tmp / "check.html"
    page.write_text(report_html.replace("</body>", CHECK_JS + "</body>"), encoding="utf-8")
    dom = chromium(browser, page, "--dump-dom").stdout
    found = re.search(r'<pre id="rocket-check">(.*?)</pre>', dom, re.DOTALL)
    assert found, f"the check script left no result; the browser printed {len(dom)} characters"
    return json.loads(html.unescape(found.group(1)))


def problems(check: dict) -> list[str]:
    out = []
    if check["scroll_width"] > check["viewport"]:
        out.append(f"the page scrolls sideways: {check['scroll_width']} px wide in a {check['viewport']} px window")
    out += [f"{name} reaches {right} px, past the {check['viewport']} px window" for name, right in check["too_wide"]]
    for img in check["images"]:
        if not img["loaded"]:
            out.append(f"{img['name']} did not load")
        elif img["shown"] < MIN_SCALE * img["natural"]:
            out.append(f"{img['name']} is shrunk from {img['natural']} to {img['shown']:.0f} px: its text is unreadable")
    return out


@pytest.fixture(scope="module")
def browser():
    found = find_browser()
    if found is None:
        pytest.skip(f"no headless browser on PATH (looked for {', '.join(BROWSERS)})")
    return found


@pytest.fixture(scope="module")
def report(browser, tmp_path_factory, kshot_examples, tiny_model_dir, lora_bank_dir):
    """report.html of `rocket run` on the tiny model with every stage and the held-out evaluation, in a
    directory whose long name (no place to break a line) heads the page."""
    root = tmp_path_factory.mktemp("report_run")
    write_jsonl(root / "kshot.jsonl", kshot_examples[:3])
    write_jsonl(root / "pool.jsonl", [dict(e, output=e["output"] + s) for e in kshot_examples for s in ("", " Indeed.")])
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")   # the plain-torch paths: the report is under test, not the kernels
    try:
        run_pipeline(RunConfig(
            base_model=str(tiny_model_dir), bank=str(lora_bank_dir), kshot=str(root / "kshot.jsonl"),
            pool=str(root / "pool.jsonl"), out=str(root / LONG_NAME), n_experts=2, top_m=3, target=10, threshold=0.9,
            train={"epochs": 1, "batch_size": 4, "grad_accum": 1, "cutoff": 512, "backend": "torch"}, device="cpu",
            accuracy=None, progress=False, eval_data=str(root / "kshot.jsonl")), log=lambda *a: None)
    finally:
        mp.undo()
    return (root / LONG_NAME / "report.html").read_text(encoding="utf-8")


def test_report_fits_the_window_and_every_figure_loads(browser, report, tmp_path):
    check = browser_check(browser, report, tmp_path)
    assert check["window"] == WINDOW[0] and len(check["images"]) >= 4, check   # heatmap, similarity, curve, routing
    assert "Held-out evaluation" in report
    assert problems(check) == [], check


def test_report_screenshot(browser, report, tmp_path):
    (tmp_path / "report.html").write_text(report, encoding="utf-8")
    shot = tmp_path / "report.png"
    chromium(browser, tmp_path / "report.html", f"--screenshot={shot}")
    with Image.open(shot) as png:
        assert png.size == WINDOW
        darkest, lightest = png.convert("L").getextrema()
    assert lightest - darkest > 128   # drawn, not a blank page


def test_the_check_sees_overflow_and_broken_images(browser, tmp_path):
    page = ("<!doctype html><html><body><table><tr><td>" + "x" * 400 + "</td></tr></table>"
            "<img alt='broken' src='data:image/png;base64,AAAA'></body></html>")
    found = problems(browser_check(browser, page, tmp_path))
    assert any("scrolls sideways" in p for p in found) and any("table reaches" in p for p in found), found
    assert "img 'broken' did not load" in found, found


def test_a_hung_browser_run_is_killed_and_tried_again(tmp_path):
    """The retry of chromium(), on a stand-in browser that hangs on its first run only."""
    fake = tmp_path / "browser"
    fake.write_text(f"#!/bin/sh\nif [ ! -e {tmp_path}/ran ]; then touch {tmp_path}/ran; sleep 600; fi\necho painted\n")
    fake.chmod(0o755)
    page = tmp_path / "p.html"
    page.write_text("<html></html>")
    assert chromium(str(fake), page, limit_s=2).stdout == "painted\n"
    (tmp_path / "ran").unlink()
    with pytest.raises(subprocess.TimeoutExpired):
        chromium(str(fake), page, attempts=1, limit_s=1)

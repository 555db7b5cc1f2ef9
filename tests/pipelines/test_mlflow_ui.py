"""The MLflow UI as a person reaches it from a Kubeflow report: the evaluation report's link to a sample opens MLflow's
run page on that artifact, and the sample plays there, at a visible size (headless Debian chromium via Playwright).

MLflow 3.17's artifact viewer plays .mp4/.mov/.mkv/.webm/.avi in a ``<video controls>`` whose source is a ``blob:``
URL of the downloaded file, shown at the file's own size (at most 100 % wide and 62.5 % of the window high). The
tracker logs samples under 256 px enlarged (components/mlflow_tracker.py ``enlarged_video``), so a 64 px tiny-preset
sample shows at 256 px. The looping GIF preview beside each MP4 is for viewers that cannot play MP4; MLflow's
image viewer shows it too (checked after the MP4).

Needs Debian's ``chromium`` (``make test`` installs it); without it the test is skipped, saying so. The screenshot
goes to ``tests/artifacts/mlflow_video.png``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

pytestmark = [pytest.mark.slow,  # reuses the `runs` fixture (two pipeline runs)
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs "
                                                          "it: apt-get install -y chromium)")]

VIDEO_STATE = """() => { const v = document.querySelector('video');
  return v && {ready: v.readyState, duration: v.duration, error: v.error && v.error.code, width: v.videoWidth,
               height: v.videoHeight, src: v.currentSrc, controls: v.controls}; }"""
IMAGES = """() => [...document.querySelectorAll('img')].filter(i => i.src.startsWith('blob:')).map(i => (
  {complete: i.complete, width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width}))"""
IMAGE_SHOWN = f"() => ({IMAGES})().some(i => i.complete && i.width > 0 && i.shown > 0)"
VIDEO_LOADED = f"() => {{ const s = ({VIDEO_STATE})(); return !!s && (s.ready >= 1 || s.duration > 0 || !!s.error); }}"


def test_the_reports_sample_link_plays_the_video_in_mlflow(runs):
    from playwright.sync_api import sync_playwright

    report = (Path(runs["first"]["run_dir"]) / "evaluate" / "report").read_text()
    found = re.search(r'href="([^"]+/artifacts/samples/prompt-00\.mp4)"', report)
    assert found, f"the evaluation report has no MLflow link to samples/prompt-00.mp4:\n{report[:2000]}"
    link = found.group(1).replace("&amp;", "&")
    assert link.startswith(runs["client"].tracking_uri.rstrip("/") + "/#/experiments/"), link

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(link)
            try:
                element = page.wait_for_selector("video[src]")
                page.wait_for_function(VIDEO_LOADED, timeout=30_000)
                state = page.evaluate(VIDEO_STATE)
                box = element.bounding_box()
                answered = page.evaluate("async src => { const r = await fetch(src); "
                                         "return {ok: r.ok, type: r.type, bytes: (await r.arrayBuffer()).byteLength}; }",
                                         state["src"])
            finally:
                page.screenshot(path=str(ARTIFACTS / "mlflow_video.png"))
            # the looping GIF preview beside it (for viewers that cannot play MP4): MLflow's image viewer shows it
            page.get_by_text("prompt-00.gif", exact=True).click()  # in the run's artifact tree
            page.wait_for_function(IMAGE_SHOWN)
            images = page.evaluate(IMAGES)
        finally:
            browser.close()
    assert state["error"] is None, f"the browser could not play the sample: MediaError code {state['error']}"
    assert state["ready"] >= 1 and state["duration"] > 0, state
    assert state["controls"], "MLflow's viewer shows the video without controls"
    assert answered["ok"] and answered["bytes"] > 1000, answered  # the <video>'s source answers with the file
    # a visible size: the 64 px tiny-preset sample was logged enlarged to 256 px, and is shown at that size
    assert (state["width"], state["height"]) == (256, 256), state
    assert box and box["width"] >= 250 and box["height"] >= 250, box
    assert any(i["width"] >= 256 and i["shown"] >= 250 for i in images), images

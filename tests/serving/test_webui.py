"""The gradio UI (``serving/webui.py``) in front of a real ``tritonserver`` serving the tiny model, driven by headless
Chromium through Playwright: a generated MP4 is shown, saved and logged; a bad request shows the server's message.

The browser tests need Debian's ``chromium`` (``make test`` installs it); without it they are skipped, saying so.
The page screenshot after a generation goes to ``tests/artifacts/webui.png``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402

from easyanimate.video import read_video  # noqa: E402
from serving import webui  # noqa: E402
from serving.client import GenerationResult  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs "
                                                             "it: apt-get install -y chromium)")


# ---------------------------------------------------------------------------------------------------------------------
# fast: saving, logging, what is sent


def _result(data: bytes, suffix: str = ".mp4") -> GenerationResult:
    mime = "video/mp4" if suffix == ".mp4" else "image/png"
    return GenerationResult(data=data, metadata={"mime": mime, "parameters": {"steps": 5}, "model": {"name": "tiny"}},
                            transport="grpc-stream", url="grpc://x:1")


def test_save_sample_numbers_files_and_appends_logs(tmp_path):
    import datetime as dt

    now = dt.datetime(2026, 11, 27, 10, 0, 0)
    first = webui.save_sample(tmp_path, _result(b"one"), {"prompt": "a cat", "seed": 1}, now=now)
    second = webui.save_sample(tmp_path, _result(b"\x89PNG\r\n\x1a\n", ".png"), {"prompt": "a dog", "seed": 2},
                               now=now)
    folder = tmp_path / "2026-11-27"
    assert (first, second) == (folder / "001.mp4", folder / "002.png")
    assert first.read_bytes() == b"one"
    logs = json.loads((folder / "logs.json").read_text())
    assert [e["file"] for e in logs] == ["001.mp4", "002.png"]
    assert logs[1]["prompt"] == "a dog" and logs[1]["served_parameters"] == {"steps": 5}
    assert not [p for p in folder.iterdir() if p.name.startswith(".logs.json.")], "temp file left behind"
    items = webui.gallery_items(tmp_path)
    assert [Path(p).name for p, _ in items] == ["002.png", "001.mp4"] and "a dog" in items[0][1]


def test_lora_and_model_choice_are_sent_only_when_the_server_takes_them(tmp_path):
    (tmp_path / "style.safetensors").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert webui.lora_files(tmp_path) == ["style.safetensors"]
    params = {"prompt": "p", "negative_prompt": "", "seed": 1, "steps": 5, "guidance": 7.0, "num_frames": 9,
              "height": 64, "width": 64, "fps": 24, "sampler": "Euler", "lora": "style.safetensors",
              "lora_alpha": 0.55, "model": "models:/easyanimate@champion", "accel": "cache=mag"}
    ours = webui.ServerInfo(inputs={"PROMPT", "STEPS"}, url="grpc://x:1")
    inputs, applied = webui.request_inputs(params, ours, tmp_path)
    assert applied == {"model_applied": False, "lora_applied": False}
    assert not {"LORA", "LORA_ALPHA", "MODEL", "ACCEL"} & set(inputs) and inputs["SAMPLER"][0] == b"Euler"
    richer = webui.ServerInfo(inputs={"PROMPT", "LORA", "LORA_ALPHA", "MODEL", "ACCEL"}, url="grpc://x:1")
    inputs, applied = webui.request_inputs(params, richer, tmp_path)
    assert applied == {"model_applied": True, "lora_applied": True}
    assert inputs["LORA"][0] == b"style.safetensors"  # the NAME: the server resolves it in its own LoRA folder
    assert inputs["LORA_ALPHA"][0] == pytest.approx(0.55)
    assert inputs["ACCEL"][0] == b"cache=mag"  # the page's speed setting


def test_model_dropdown_lists_registered_versions_and_aliases(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("easyanimate")
    for i in range(2):
        client.create_model_version("easyanimate", source=str(tmp_path / f"v{i}"))
    client.set_registered_model_alias("easyanimate", "champion", "1")
    choices, note = webui.model_choices(uri)
    assert choices == [webui.SERVED, "models:/easyanimate@champion", "models:/easyanimate/2", "models:/easyanimate/1"]
    assert note == ""
    choices, note = webui.model_choices("http://127.0.0.1:9", timeout=0.5)  # down: the page still builds
    assert choices == [webui.SERVED] and "not reachable" in note


def test_server_info_of_an_unreachable_server_is_a_message():
    from serving.launch import free_port

    info = webui.server_info(f"grpc://127.0.0.1:{free_port()}", timeout=2)
    assert info.error and not info.url and "unknown" in info.describe()


# ---------------------------------------------------------------------------------------------------------------------
# the real thing: tritonserver + gradio + headless Chromium


@pytest.fixture(scope="module")
def triton(tmp_path_factory, lora_dir):
    from serving.launch import TritonServer

    server = TritonServer("tiny", models=["easyanimate_stream"], exit_timeout=5, parameters={"torch_threads": "1"},
                          env={"EASYANIMATE_MODEL_CACHE": str(tmp_path_factory.mktemp("model_cache"))},
                          lora_dir=lora_dir)
    with server:
        yield server


@pytest.fixture(scope="module")
def ui(triton, lora_dir, tmp_path_factory):
    from serving.launch import free_port

    root = tmp_path_factory.mktemp("webui")
    demo, url = webui.launch(f"grpc://{triton.grpc_url}", port=free_port(), samples_dir=root / "samples",
                             lora_dir=lora_dir, block=False, timeout=120)
    try:
        yield {"url": url, "samples": root / "samples"}
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make test installs it: apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, ui):
    context = browser.new_context(viewport={"width": 1280, "height": 1500})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(ui["url"])
    pg.wait_for_selector("#generate")
    try:
        yield pg
    finally:
        context.close()


def _set_number(page, elem_id: str, value) -> None:
    """Type into a slider's (or a number's) box and leave it, as a user does."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def _fill_small(page, prompt: str, **overrides) -> None:
    page.locator("#prompt textarea").fill(prompt)
    for elem_id, value in {"steps": 5, "width": 64, "height": 64, "length": 9, "seed": 7, **overrides}.items():
        _set_number(page, elem_id, value)


def _status(page) -> str:
    return page.locator("#status-box").inner_text()


def _wait_status(page, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = _status(page)
        if "Saved" in text or "✖" in text:
            return text
        page.wait_for_timeout(200)
    raise AssertionError(f"no result on the page after {timeout} s; status: {_status(page)!r}")


_WATCH_PROGRESS = """() => { window.__progress = [];
  new MutationObserver(() => {
    for (const e of document.querySelectorAll('.progress-text, .progress-level-inner, .meta-text-center'))
      if (e.innerText) window.__progress.push(e.innerText);
  }).observe(document.body, {subtree: true, childList: true, characterData: true}); }"""


def _all_logs(samples: Path) -> list[dict]:
    return [e for f in sorted(samples.glob("*/logs.json")) for e in json.loads(f.read_text())]


@pytest.mark.slow
@needs_chromium
def test_generate_a_video_in_the_browser(page, ui):
    assert "the server applies it" in page.locator("#lora-note").inner_text()  # LORA is a declared input
    page.locator("#lora input").click()  # V2's LoRA dropdown lists the folder's .safetensors
    page.get_by_role("option", name="style.safetensors").click()
    page.locator("#accel input").click()  # the speed setting: exact (bit-identical), sent as ACCEL
    page.get_by_role("option", name="exact", exact=True).click()
    _fill_small(page, "a red kite over a green hill")
    before = len(_all_logs(ui["samples"]))
    page.evaluate(_WATCH_PROGRESS)
    page.locator("#generate").click()
    page.wait_for_selector("#result-video video", timeout=90_000)
    status = _wait_status(page)
    assert "Saved" in status and "grpc-stream" in status, status
    assert "5 progress messages" in status, status  # one PROGRESS per denoising step reached the progress bar
    seen = " ".join(page.evaluate("window.__progress"))  # what the progress bar showed while generating
    assert re.search(r"[1-5]/5 steps", seen) and "denoising" in seen, seen[:500]
    assert "LoRA style.safetensors applied by the server (alpha 0.55)" in status, status
    assert "tiny" in page.locator("#served-model").inner_text()

    logs = _all_logs(ui["samples"])
    assert len(logs) == before + 1
    entry = logs[-1]
    saved = next(ui["samples"].glob(f"*/{entry['file']}"))
    assert saved.suffix == ".mp4" and saved.parent.name == time.strftime("%Y-%m-%d")
    frames = read_video(saved)
    assert frames.shape == (9, 64, 64, 3)
    expected = {"prompt": "a red kite over a green hill", "steps": 5, "width": 64, "height": 64, "num_frames": 9,
                "seed": 7, "sampler": "Euler", "guidance": 7.0, "lora": "style.safetensors", "lora_alpha": 0.55,
                "lora_applied": True, "edition": "v2", "transport": "grpc-stream", "accel": "exact"}
    assert {k: entry.get(k) for k in expected} == expected
    assert entry["negative_prompt"].startswith("The video is not of a high quality")
    assert entry["served_parameters"]["steps"] == 5 and entry["served_parameters"]["sampler"] == "Euler"
    assert entry["served_parameters"]["lora"] == "style.safetensors"  # the server applied it (its METADATA)
    assert entry["served_parameters"]["accel"] == "exact"  # and generated with the chosen speed setting
    assert entry["model"]["name"] == "tiny"
    page.wait_for_selector("#gallery video")  # the gallery shows it
    page.locator("#gallery").scroll_into_view_if_needed()  # Chromium paints videos it has shown
    with contextlib.suppress(PlaywrightTimeout):  # a loaded frame makes a better screenshot; not a requirement
        page.wait_for_function("[...document.querySelectorAll('video')].every(v => v.readyState >= 2)",
                               timeout=10_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webui.png"), full_page=True)


@pytest.mark.slow
@needs_chromium
def test_generate_an_image_and_roll_the_dice(page, ui):
    _fill_small(page, "a lighthouse at night")
    page.locator("#seed-dice").click()
    page.wait_for_function("document.querySelector('#seed input').value !== '7'")
    seed = int(page.locator("#seed input").input_value())
    page.locator("#generate-image input[type=checkbox]").check()
    page.locator("#generate").click()
    page.wait_for_selector("#result-image img", timeout=90_000)
    assert "Saved" in _wait_status(page)
    entry = _all_logs(ui["samples"])[-1]
    assert entry["file"].endswith(".png") and entry["num_frames"] == 1 and entry["seed"] == seed
    assert read_video(next(ui["samples"].glob(f"*/{entry['file']}"))).shape == (1, 64, 64, 3)


@pytest.mark.slow
@needs_chromium
def test_a_request_the_server_rejects_shows_its_message(page, ui):
    before = len(_all_logs(ui["samples"]))
    _fill_small(page, "a cat", width=72)  # not a multiple of 16: the UI lets it through, the server says no
    page.locator("#generate").click()
    status = _wait_status(page)
    assert "WIDTH must be a multiple of 16" in status and "got 72" in status, status
    assert "Traceback" not in page.content()
    assert len(_all_logs(ui["samples"])) == before  # nothing saved


@pytest.mark.slow
def test_cli_ui_prints_the_url_and_serves_the_page(tmp_path):
    """``easyanimate ui`` starts even while the server is down (the page says so), on loopback, until SIGINT."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from serving.launch import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "easyanimate", "ui", "--server", f"grpc://127.0.0.1:{free_port()}", "--port", str(port),
         "--samples-dir", str(tmp_path / "samples")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}/", (url, proc.stderr.read() if proc.poll() is not None else "")
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200 and "EasyAnimate" in resp.read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

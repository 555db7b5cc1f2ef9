"""Sidecar captions and the VLM client (against a local OpenAI-compatible server started here)."""

import base64
import dataclasses
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import skimage.data
from PIL import Image

from easyanimate.config import CaptionConfig
from easyanimate.preprocess.captions import CaptionError, SidecarCaptions, VLMCaptioner

# --- sidecars --------------------------------------------------------------------------------------------------------


def _json(root, rows):
    (root / "captions.json").write_text(json.dumps(rows))


def test_sidecar_whole_file_and_most_specific_range(tmp_path):
    _json(tmp_path, [
        {"file": "videos/a.mp4", "text": "whole a"},
        {"file": "videos/a.mp4", "text": "first half", "start_frame": 0, "end_frame": 100},
        {"file": "videos/a.mp4", "text": "shot 2", "start_frame": 20, "end_frame": 60},
        {"file": "videos/a.mp4", "text": "second half", "start_frame": 100, "end_frame": 200},
        {"file": "./videos/b.mp4", "text": "only b"},
    ])
    sc = SidecarCaptions(tmp_path)
    assert sc.lookup("videos/a.mp4", 30, 50) == "shot 2"  # contained by two ranges: the smaller wins
    assert sc.lookup("videos/a.mp4", 0, 90) == "first half"
    assert sc.lookup("videos/a.mp4", 120, 150) == "second half"
    assert sc.lookup("videos/a.mp4", None, None) == "whole a"
    # overlap fallback: [90, 130) is in no range; it overlaps "second half" by 30 of 40 frames (>= half)
    assert sc.lookup("videos/a.mp4", 90, 130) == "second half"
    # [180, 260) overlaps "second half" by 20 of 80 frames (< half): the whole-file caption
    assert sc.lookup("videos/a.mp4", 180, 260) == "whole a"
    assert sc.lookup("videos/b.mp4", 10, 20) == "only b"
    assert sc.lookup("videos/c.mp4", 0, 10) is None


def test_sidecar_overlap_needs_half_and_takes_the_largest(tmp_path):
    _json(tmp_path, [
        {"file": "v.mp4", "text": "left", "start_frame": 0, "end_frame": 55},
        {"file": "v.mp4", "text": "right", "start_frame": 45, "end_frame": 200},
    ])
    sc = SidecarCaptions(tmp_path)
    assert sc.lookup("v.mp4", 44, 64) == "right"  # in neither: overlaps left by 11, right by 19 of 20
    assert sc.lookup("v.mp4", 40, 60) == "left"  # 15 and 15: a tie goes to the first defined
    assert sc.lookup("v.mp4", 150, 250) == "right"  # exactly half of the clip overlaps: still kept
    assert sc.lookup("v.mp4", 150, 260) is None  # 50 of 110 frames: less than half, and no whole-file caption
    assert sc.lookup("v.mp4", 300, 400) is None  # no overlap, no whole-file caption


def test_sidecar_txt_and_csv(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "dog.txt").write_text("  a dog runs on a beach \n")
    (tmp_path / "clips" / "empty.txt").write_text("\n")
    (tmp_path / "captions.csv").write_text(
        "file,text,start_frame,end_frame\n"
        'clips/cat.mp4,"a cat, sleeping",,\n'
        "clips/cat.mp4,the cat wakes up,50,80\n"
        "clips/dog.mp4,the dog jumps,10,20\n"
    )
    sc = SidecarCaptions(tmp_path)
    assert sc.lookup("clips/dog.mp4", 0, 100) == "a dog runs on a beach"  # .txt beside the video
    assert sc.lookup("clips/dog.mp4", 10, 20) == "the dog jumps"  # a csv range beats the .txt
    assert sc.lookup("clips/cat.mp4", 0, 40) == "a cat, sleeping"
    assert sc.lookup("clips/cat.mp4", 55, 75) == "the cat wakes up"
    assert sc.lookup("clips/empty.mp4", 0, 10) is None


@pytest.mark.parametrize(("name", "content", "match"), [
    ("captions.json", '[{"file": "a.mp4", "text": "ok"}, {"file": "b.mp4"}]', r"captions.json row 1: missing text"),
    ("captions.json", '[{"file": "a.mp4", "text": "x", "start_frame": 9, "end_frame": 3}]', r"row 0: end_frame 3"),
    ("captions.json", '[{"file": "a.mp4", "text": "x", "start_frame": "soon"}]', r"row 0: start_frame"),
    ("captions.json", '{"file": "a.mp4"}', r"expected a JSON list"),
    ("captions.json", '[{"file": "../a.mp4", "text": "x"}]', r"inside the dataset root"),
    ("captions.csv", "file,text\na.mp4,ok\nb.mp4,\n", r"captions.csv line 3: 'text' must be a non-empty string"),
    ("captions.csv", "file,text,start_frame,end_frame\na.mp4,x,one,5\n", r"line 2: start_frame"),
    ("captions.csv", "path,caption\na.mp4,x\n", r"header must name the columns file,text"),
])
def test_sidecar_malformed_rows_name_file_and_row(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        SidecarCaptions(tmp_path)


# --- VLM ---------------------------------------------------------------------------------------------------------------


class _Server:
    """A local OpenAI-compatible chat-completions server; ``mode`` decides the answer, ``requests`` records them."""

    def __init__(self):
        self.mode = "ok"
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                           "body": body})
                mode = outer.mode
                if mode == "sleep":
                    time.sleep(0.6)
                    return self._reply(200, {"choices": [{"message": {"content": "late"}}]}, quiet=True)
                if mode == "500":
                    return self._reply(500, {"error": "boom"})
                if mode == "400":
                    return self._reply(400, {"error": "bad image"})
                if mode == "empty":
                    return self._reply(200, {"choices": [{"message": {"role": "assistant", "content": "  "}}]})
                content = body["messages"][0]["content"]
                if isinstance(content, str):  # the rewrite call: text only
                    text = "In this video, " + content.split(": ", 1)[-1]
                else:
                    text = "An astronaut in a white suit poses before a flag."
                return self._reply(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

            def _reply(self, code, obj, quiet=False):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    if not quiet:
                        raise

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def reset(self, mode="ok"):
        self.mode = mode
        self.requests.clear()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    yield srv
    srv.close()


def _captioner(server, **cfg) -> VLMCaptioner:
    base = CaptionConfig(vlm_url=server.url, vlm_model="llava-test", timeout=5.0, retries=2)
    return VLMCaptioner(dataclasses.replace(base, **cfg), backoff=0.01)


@pytest.fixture(scope="module")
def frame():
    return skimage.data.astronaut()[:300, :400].copy()  # 400x300


def test_vlm_request_carries_the_image_and_prompt(server, frame):
    server.reset()
    cap = _captioner(server, api_key="sekret")
    assert cap.caption(frame) == "An astronaut in a white suit poses before a flag."
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sekret"
    body = req["body"]
    assert body["model"] == "llava-test" and body["temperature"] == 0 and body["max_tokens"] > 0
    parts = body["messages"][0]["content"]
    assert {"type": "text", "text": "Please describe this image in detail."} in parts
    (image_part,) = [p for p in parts if p["type"] == "image_url"]
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.format == "JPEG" and img.size == (400, 300)
    assert np.abs(np.asarray(img, dtype=float) - frame).mean() < 8  # it is this frame


def test_vlm_rewrite_call_when_configured(server, frame):
    server.reset()
    cap = _captioner(server, rewrite_model="qwen-test")
    text = cap.caption(frame)
    assert text == "In this video, An astronaut in a white suit poses before a flag."
    first, second = server.requests
    assert first["body"]["model"] == "llava-test" and second["body"]["model"] == "qwen-test"
    prompt = second["body"]["messages"][0]["content"]
    assert isinstance(prompt, str) and prompt.startswith("Rewrite this description")
    assert prompt.endswith("An astronaut in a white suit poses before a flag.")
    assert second["auth"] is None  # no api_key configured


@pytest.mark.parametrize(("mode", "expected_requests", "match"), [
    ("sleep", 3, r"VLM \(llava-test\) at http://127.0.0.1:\d+/v1/chat/completions: timed out after 0.2 s \(3 tries\)"),
    ("500", 3, r"HTTP 500.*\(3 tries\)"),
    ("empty", 3, r"empty reply \(3 tries\)"),
    ("400", 1, r"HTTP 400"),  # a client error is not retried
])
def test_vlm_failures_are_caption_errors_after_retries(server, frame, mode, expected_requests, match):
    server.reset(mode)
    cap = _captioner(server, timeout=0.2)
    with pytest.raises(CaptionError, match=match):
        cap.caption(frame)
    assert len(server.requests) == expected_requests


def test_vlm_unreachable_and_caption_many(server, frame):
    dead = VLMCaptioner(CaptionConfig(vlm_url="http://127.0.0.1:9/v1", retries=1, timeout=1.0), backoff=0.01)
    with pytest.raises(CaptionError, match=r"connection failed.*\(2 tries\)"):
        dead.caption(frame)

    server.reset()
    cap = _captioner(server)
    out = cap.caption_many([frame, frame[:100, :100], frame], concurrency=2)
    assert out == ["An astronaut in a white suit poses before a flag."] * 3
    assert len(server.requests) == 3
    out = dead.caption_many([frame, frame], concurrency=2)
    assert all(isinstance(o, CaptionError) for o in out)

    with pytest.raises(ValueError, match="vlm_url is empty"):
        VLMCaptioner(CaptionConfig())

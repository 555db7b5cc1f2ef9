"""Captions of the preprocessing stage: sidecar files first, then a VLM behind an OpenAI-compatible endpoint.

Sidecars (``SidecarCaptions``), all relative to the dataset root:

* ``captions.json`` — a JSON list of ``{"file": relpath, "text": str, "start_frame"?: int, "end_frame"?: int}``;
  the range is the frames ``[start_frame, end_frame)`` of the source file; no range = the whole file (one bound only =
  open on the other side).
* ``captions.csv`` — header ``file,text,start_frame,end_frame`` (the last two may be empty or absent).
* ``<video stem>.txt`` beside a video — a whole-file caption (an empty file counts as no caption).

For a clip ``[start, end)`` of a source, ``lookup`` returns the most specific caption: among the ranged captions of
that file the one whose range contains the clip with the smallest span; else the one overlapping at least half of the
clip with the largest overlap; else the whole-file caption (captions.json, then captions.csv, then the .txt); else
``None``. Ties go to the first defined.

VLM (``VLMCaptioner``): V2 captions a clip's middle frame with LLaVA-1.6 ("Please describe this image in detail.") and
has Qwen1.5-7B-Chat rewrite the description to begin with "In this video" within 100 words. Any server speaking the
OpenAI chat-completions API works (vLLM / SGLang serving LLaVA, Qwen2-VL, InternVL2, ...). Failures raise
``CaptionError`` with the reason; a caption is never made up.
"""

from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import math
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------------------------------
# sidecar captions


@dataclass(frozen=True)
class _Ranged:
    start: int
    end: float  # math.inf when open
    text: str


def _norm_rel(path: str, root: Path, where: str) -> str:
    text = str(path).strip().replace("\\", "/")
    if not text:
        raise ValueError(f"{where}: empty 'file'")
    p = PurePosixPath(text)
    if p.is_absolute():
        try:
            p = PurePosixPath(Path(text).resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            raise ValueError(f"{where}: file {text!r} is not inside the dataset root {root}") from None
    parts = [part for part in p.parts if part not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"{where}: file {text!r} must be a path inside the dataset root")
    return "/".join(parts)


def _frame_bound(value, name: str, where: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{where}: {name} must be a frame number, got {value!r}")  # noqa: TRY004
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{where}: {name} must be a frame number, got {value!r}") from None
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {name} must be a non-negative frame number, got {value!r}")
    return value


class SidecarCaptions:
    """Captions that ship with the dataset (see the module docstring for the files and the lookup rule).

    ``captions.json`` and ``captions.csv`` are read at construction (malformed rows raise ``ValueError`` naming the
    file and the row); ``<video stem>.txt`` files are read on lookup.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._whole: dict[str, str] = {}
        self._ranged: dict[str, list[_Ranged]] = {}
        self._txt_cache: dict[str, str | None] = {}
        json_path, csv_path = self.root / "captions.json", self.root / "captions.csv"
        if json_path.is_file():
            self._read_json(json_path)
        if csv_path.is_file():
            self._read_csv(csv_path)

    def __len__(self) -> int:
        return len(self._whole) + sum(len(v) for v in self._ranged.values())

    def _add(self, file, text, start, end, where: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: 'text' must be a non-empty string, got {text!r}")
        if not isinstance(file, str):
            raise ValueError(f"{where}: 'file' must be a relative path string, got {file!r}")  # noqa: TRY004
        rel = _norm_rel(file, self.root, where)
        start = _frame_bound(start, "start_frame", where)
        end = _frame_bound(end, "end_frame", where)
        if start is not None and end is not None and end <= start:
            raise ValueError(f"{where}: end_frame {end} must be greater than start_frame {start}")
        text = text.strip()
        if start is None and end is None:
            self._whole.setdefault(rel, text)
        else:
            self._ranged.setdefault(rel, []).append(_Ranged(start or 0, math.inf if end is None else end, text))

    def _read_json(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, list):
            raise ValueError(  # noqa: TRY004
                f"{path}: expected a JSON list of {{file, text, start_frame?, end_frame?}} objects, "
                f"got {type(data).__name__}")
        allowed = {"file", "text", "start_frame", "end_frame"}
        for i, row in enumerate(data):
            where = f"{path} row {i}"
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object with file and text, got {row!r}")  # noqa: TRY004
            missing = [k for k in ("file", "text") if k not in row]
            if missing:
                raise ValueError(f"{where}: missing {', '.join(missing)}")
            unknown = sorted(set(row) - allowed)
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
            self._add(row["file"], row["text"], row.get("start_frame"), row.get("end_frame"), where)

    def _read_csv(self, path: Path) -> None:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            if "file" not in fields or "text" not in fields:
                raise ValueError(f"{path}: the header must name the columns file,text[,start_frame,end_frame]; "
                                 f"got {fields}")
            reader.fieldnames = fields
            for row in reader:
                where = f"{path} line {reader.line_num}"
                if None in row:
                    raise ValueError(f"{where}: more values than columns (quote texts that contain commas)")
                if all(v is None or not str(v).strip() for v in row.values()):
                    continue  # blank line
                self._add(row.get("file"), row.get("text"), row.get("start_frame"), row.get("end_frame"), where)

    def _txt(self, rel: str) -> str | None:
        if rel not in self._txt_cache:
            txt = (self.root / rel).with_suffix(".txt")
            text = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
            self._txt_cache[rel] = text or None
        return self._txt_cache[rel]

    def lookup(self, source_rel: str, start_frame: int | None = None, end_frame: int | None = None) -> str | None:
        """The most specific caption of frames ``[start_frame, end_frame)`` of ``source_rel`` (None = open end)."""
        rel = _norm_rel(source_rel, self.root, "lookup")
        ranged = self._ranged.get(rel, [])
        if ranged and not (start_frame is None and end_frame is None):
            s = start_frame or 0
            e = math.inf if end_frame is None else end_frame
            containing = [r for r in ranged if r.start <= s and e <= r.end]
            if containing:
                return min(containing, key=lambda r: r.end - r.start).text  # min keeps the first on ties
            if math.isfinite(e) and e > s:
                best, best_ov = None, 0.0
                for r in ranged:
                    ov = min(e, r.end) - max(s, r.start)
                    if ov >= 0.5 * (e - s) and ov > best_ov:
                        best, best_ov = r, ov
                if best is not None:
                    return best.text
        if rel in self._whole:
            return self._whole[rel]
        return self._txt(rel)


# ---------------------------------------------------------------------------------------------------------------------
# VLM captions


class CaptionError(RuntimeError):
    """A caption could not be obtained; the message says why (never replaced by a made-up caption)."""


class _Retryable(Exception):
    pass


def frame_to_data_url(frame, quality: int = 90) -> str:
    """A uint8 RGB frame ``(H, W, 3)`` (or a PIL image) → ``data:image/jpeg;base64,...``."""
    img = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, dtype=np.uint8))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _message_text(reply: dict) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content in the reply") from None
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return (content or "").strip() if isinstance(content, str) else ""


class VLMCaptioner:
    """Captions a frame with a VLM behind ``POST {vlm_url}/chat/completions`` and optionally rewrites it with an LLM.

    * request 1 (VLM): ``model=cfg.vlm_model``, one user message with a text part (``cfg.vlm_prompt``) and an
      ``image_url`` part (the frame as a JPEG data URL), ``max_tokens``, ``temperature`` 0;
    * request 2 (only when ``cfg.rewrite_model`` is set): text-only, ``model=cfg.rewrite_model``, the user message
      ``cfg.rewrite_prompt`` with ``{caption}`` filled in. It goes to ``rewrite_url`` (default: ``cfg.vlm_url``; an
      OpenAI-compatible router such as LiteLLM serves both models behind one URL, or pass the LLM's own server).

    Each request: ``cfg.timeout`` seconds per socket operation; up to ``cfg.retries`` retries with exponential backoff
    (``backoff`` · 2^k seconds, jittered) on connection errors, timeouts, HTTP 5xx, 408/429, unparsable and empty
    replies; other 4xx fail at once. ``Authorization: Bearer cfg.api_key`` when set.
    """

    def __init__(self, cfg, *, rewrite_url: str | None = None, max_tokens: int = 512, rewrite_max_tokens: int = 256,
                 backoff: float = 1.0, jpeg_quality: int = 90):
        if not cfg.vlm_url:
            raise ValueError("caption.vlm_url is empty: set it to an OpenAI-compatible endpoint such as "
                             "http://127.0.0.1:30000/v1")
        self.cfg = cfg
        self.url = cfg.vlm_url.rstrip("/") + "/chat/completions"
        self.rewrite_url = (rewrite_url or cfg.rewrite_url or cfg.vlm_url).rstrip("/") + "/chat/completions"
        self.max_tokens = max_tokens
        self.rewrite_max_tokens = rewrite_max_tokens
        self.backoff = backoff
        self.jpeg_quality = jpeg_quality
        self._rng = random.Random()
        self._rng_lock = threading.Lock()

    # -- one HTTP call with retries --------------------------------------------------------------------------------
    def _post_once(self, url: str, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.cfg.api_key:
            headers["Authorization"] = f"Bearer {self.cfg.api_key}"
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace").strip()
            msg = f"HTTP {exc.code}" + (f": {detail}" if detail else "")
            if exc.code >= 500 or exc.code in (408, 429):
                raise _Retryable(msg) from None
            raise CaptionError(f"at {url} failed: {msg}") from None
        except TimeoutError:
            raise _Retryable(f"timed out after {self.cfg.timeout:g} s") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise _Retryable(f"timed out after {self.cfg.timeout:g} s") from None
            raise _Retryable(f"connection failed: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # reset / refused mid-request, truncated reply
            raise _Retryable(f"connection failed: {exc}") from None
        try:
            text = _message_text(json.loads(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Retryable(f"unparsable reply ({exc}): {raw[:200]!r}") from None
        if not text:
            raise _Retryable("empty reply")
        return text

    def _chat(self, url: str, model: str, content, max_tokens: int, what: str) -> str:
        body = json.dumps({
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }).encode("utf-8")
        tries = max(0, int(self.cfg.retries)) + 1
        last = ""
        for attempt in range(tries):
            try:
                return self._post_once(url, body)
            except _Retryable as exc:
                last = str(exc)
                if attempt + 1 < tries and self.backoff > 0:
                    with self._rng_lock:
                        jitter = 0.5 + self._rng.random()
                    time.sleep(self.backoff * (2 ** attempt) * jitter)
            except CaptionError as exc:
                raise CaptionError(f"{what} ({model}) {exc}") from None
        raise CaptionError(f"{what} ({model}) at {url}: {last} ({tries} {'try' if tries == 1 else 'tries'})")

    # -- public -------------------------------------------------------------------------------------------------------
    def describe(self, frame) -> str:
        """The VLM's description of one frame (no rewrite)."""
        content = [
            {"type": "text", "text": self.cfg.vlm_prompt},
            {"type": "image_url", "image_url": {"url": frame_to_data_url(frame, self.jpeg_quality)}},
        ]
        return self._chat(self.url, self.cfg.vlm_model, content, self.max_tokens, "VLM")

    def rewrite(self, caption: str) -> str:
        """The LLM rewrite of a description (V2: begins with "In this video", within 100 words)."""
        try:
            prompt = self.cfg.rewrite_prompt.format(caption=caption)
        except (KeyError, IndexError, ValueError):  # other braces in the prompt: fill {caption} only
            prompt = self.cfg.rewrite_prompt.replace("{caption}", caption)
        return self._chat(self.rewrite_url, self.cfg.rewrite_model, prompt, self.rewrite_max_tokens, "rewrite LLM")

    def caption(self, frame, *, rewrite: bool | None = None) -> str:
        """Caption a uint8 RGB frame: describe, then rewrite when ``cfg.rewrite_model`` is set (or ``rewrite``)."""
        text = self.describe(frame)
        if (self.cfg.rewrite_model if rewrite is None else rewrite) and self.cfg.rewrite_model:
            text = self.rewrite(text)
        return text

    def caption_many(self, frames, concurrency: int | None = None, *,
                     rewrite: bool | None = None) -> list[str | CaptionError]:
        """Caption frames in parallel (``concurrency`` threads, default ``cfg.concurrency``), in input order.

        A frame that fails gives its ``CaptionError`` in its slot (any other exception is wrapped in one); the rest
        still get captions.
        """
        frames = list(frames)
        workers = max(1, int(concurrency or self.cfg.concurrency or 1))

        def one(frame) -> str | CaptionError:
            try:
                return self.caption(frame, rewrite=rewrite)
            except CaptionError as exc:
                return exc
            except Exception as exc:  # noqa: BLE001 - one bad frame must not sink the batch
                return CaptionError(f"captioning failed: {type(exc).__name__}: {exc}")

        if not frames:
            return []
        with ThreadPoolExecutor(max_workers=min(workers, len(frames))) as pool:
            return list(pool.map(one, frames))

"""A gradio web UI in front of the EasyAnimate Triton endpoint, with the controls of EasyAnimate V2's UI.

``build_ui(server)`` returns the ``gr.Blocks``; ``launch(server)`` serves it (loopback by default). The page has
V2's controls: edition, pretrained model (registered MLflow versions and aliases, or a local folder) + refresh, LoRA
+ "LoRA alpha", prompt, negative prompt (V2's), sampler (Euler), steps (50), width/height (step 16), "Generate image"
(one frame, PNG) or animation length (9k frames; the ``v3`` edition, a slice-VAE model: 1 + 8k frames), CFG (7.0),
seed (43) with a dice button. Generate sends one request
over the decoupled ``easyanimate_stream`` gRPC stream: each PROGRESS message (one per denoising step) moves the
``gr.Progress`` bar, then the video (or image) shows. Without a gRPC address the request goes over HTTP (no per-step
progress). Each result is saved as ``<samples_dir>/<YYYY-MM-DD>/NNN.mp4|png`` and its parameters appended to
``<samples_dir>/<YYYY-MM-DD>/logs.json`` (a JSON list, rewritten atomically); the gallery shows past results.

What the server accepts decides what is sent (Triton model metadata). The LoRA choice is sent as ``LORA`` (the file's
NAME, never a path) + ``LORA_ALPHA`` when the served model declares them (``serving/request.py`` does): the server
resolves the name in its own LoRA folder (``easyanimate serve --lora-dir``), merges it for that request and unmerges
it after, like V2's UI; its METADATA records ``lora`` / ``lora_alpha`` and ``logs.json`` ``lora_applied: true``. A
server whose model has no ``LORA`` input gets no LoRA: the page says it is not applied (``lora_applied: false``).
The model dropdown lists the models the server allows (``easyanimate serve --model A --allow-models B``: the public
model config that ``serve``'s front answers names them, which are loaded and their generate defaults), then the
MLflow registry's other versions and aliases (``--mlflow-uri``). The choice is sent as ``MODEL`` (the front loads
that version on demand); each answer's METADATA says which version answered, and the page shows it. The controls
(sampler, steps, size, length, CFG, speed) start from the served default's generate defaults and follow the chosen
model's; V2's UI values only where a server publishes none (a bare tritonserver without the front).

Requests are checked by the server only: its message (e.g. ``WIDTH must be a multiple of 16 between 16 and 1280,
got 72``) is shown on the page in the status box and as a toast, never a stack trace.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls to outside hosts

import numpy as np  # noqa: E402

from .client import (  # noqa: E402
    DEFAULT_TIMEOUT,
    MODEL,
    STREAM_MODEL,
    GenerationResult,
    ServerError,
    _message,
    parse_server,
    send,
)
from .request import to_inputs  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_LORA_DIR = "models/Personalized_Model"  # where V2's UI looks for LoRA / DreamBooth .safetensors
# the speed settings offered (any easyanimate.accel spec may be typed; the server checks it)
ACCEL_CHOICES = ["default", "exact", "cache=first_block", "cache=mag", "cache=taylorseer", "cache=pab", "cache=faster"]
V2_DEFAULTS = {"sampler": "Euler", "steps": 50, "width": 672, "height": 384, "num_frames": 144, "guidance": 7.0,
               "seed": 43, "lora_alpha": 0.55, "fps": 24}
EDITIONS = {"v2": "v2 (EasyAnimateV2, 9k frames, 16-pixel sizes)",
            "v3": "v3 (slice VAE: the first frame alone + 8-frame slices, 1 + 8k frames, 16-pixel sizes)"}
# the animation-length slider per edition, as the served VAE's frame rule: (minimum, maximum, step)
LENGTH_SLIDERS = {"v2": (9, 144, 9), "v3": (9, 145, 8)}


def length_slider(edition: str, served: dict[str, Any] | None = None) -> dict[str, Any]:
    """Slider settings (minimum, maximum, step, value) for an edition; a served ``frame_rule`` (each answer's
    METADATA ``model.frame_rule``: ``offset + step * k`` up to ``max_frames``) wins over the edition's table."""
    lo, hi, step = LENGTH_SLIDERS.get(edition, LENGTH_SLIDERS["v2"])
    if served and served.get("step"):
        step = int(served["step"])
        lo = int(served.get("offset", 0)) + step
        hi = max(lo, int(served.get("max_frames") or hi))
    return {"minimum": lo, "maximum": hi, "step": step, "value": hi}
NO_LORA = "none"
SERVED = "(as served)"
EXAMPLE_COUNT = 6  # example prompts under the prompt box: captions of the packaged sample clips (make demo trains on them)


def example_prompts(count: int = EXAMPLE_COUNT) -> list[str]:
    """Captions of the packaged sample videos (``easyanimate sample-data``), one per video first: what a model trained
    by ``make demo`` knows."""
    from easyanimate.data.sample import sample_captions

    captions = [r for r in sample_captions() if r["file"].startswith("videos/")]
    firsts = list({r["file"]: r["text"] for r in reversed(captions)}.values())[::-1]
    rest = [r["text"] for r in captions if r["text"] not in firsts]
    return (firsts + rest)[:count]
MAX_SEED_UI = 10**8  # V2's dice: random.randint(1, 1e8)
GALLERY_LIMIT = 48
_SAVE_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------------------------------
# what the server serves and accepts


@dataclass
class ServerInfo:
    """What the first usable address of ``server`` says about the served model (best effort; empty if down)."""

    inputs: set[str] = field(default_factory=set)
    parameters: dict[str, str] = field(default_factory=dict)
    url: str = ""
    error: str = ""

    @property
    def supports_model_choice(self) -> bool:
        return "MODEL" in self.inputs

    @property
    def supports_lora(self) -> bool:
        return "LORA" in self.inputs

    def _json(self, key: str, empty):
        try:
            value = json.loads(self.parameters.get(key) or "null")
        except ValueError:
            return empty
        return value if isinstance(value, type(empty)) else empty

    @property
    def allowed(self) -> list[str]:
        """The models a request may name in MODEL (``serve --model`` first, then ``--allow-models``)."""
        return [str(m) for m in self._json("allowed_models", [])]

    @property
    def loaded(self) -> list[str]:
        return [str(m) for m in self._json("loaded_models", [])]

    @property
    def default_model(self) -> str:
        return self.parameters.get("default_model") or (self.allowed[0] if self.allowed else "")

    def defaults(self, model: str | None = None) -> dict[str, Any]:
        """The generate defaults of an allowed model (``SERVED``/None: the default) as the page's controls take
        them; V2's where the server does not publish them (yet: a model publishes its own when it loads)."""
        published = self._json("generate_defaults", {})
        name = self.default_model if model in (None, "", SERVED) else model
        mine = published.get(name) or {}
        out = dict(V2_DEFAULTS)
        out.update({k: mine[k] for k in ("sampler", "steps", "width", "height", "num_frames", "guidance", "seed",
                                         "fps", "accel") if mine.get(k) is not None})
        return out

    def describe(self) -> str:
        if self.error and not self.url:
            return f"Served model: unknown ({self.error})"
        if self.allowed:
            text = f"Served model: `{self.default_model}` (default) at `{self.url}`"
            others = [m for m in self.allowed if m != self.default_model]
            if others:
                limit = self.parameters.get("max_loaded") or "1"
                text += (f"; this server also serves {', '.join(f'`{m}`' for m in others)} — loaded now: "
                         f"{', '.join(f'`{m}`' for m in self.loaded) or 'none'}; at most {limit} loaded at once, "
                         "another one loads when chosen (its first answer waits for the load)")
            return text
        source = self.parameters.get("model_alias") or self.parameters.get("model_source") or "?"
        text = f"Served model: `{source}` at `{self.url}`"
        if self.parameters.get("model_alias") and self.parameters.get("model_source"):
            text += f" (resolved to `{self.parameters['model_source']}`)"
        return text


def _config_or_empty(get: Callable[[], dict]) -> dict:
    """The model config, or {} when the server restricts it (``serve`` does: it holds server paths); the UI then
    learns the served model from each answer's METADATA."""
    from tritonclient.utils import InferenceServerException

    try:
        return get()
    except InferenceServerException as exc:
        if "restricted" in str(exc).lower() or "403" in str(exc) or "permission" in str(exc).lower():
            return {}
        raise


def server_info(server: str, timeout: float = 5.0) -> ServerInfo:
    """Inputs and config parameters of the served model: gRPC (stream model) first, then HTTP, as ``server`` lists."""
    failures = []
    try:
        addresses = parse_server(server)
    except ValueError as exc:
        return ServerInfo(error=str(exc))
    for scheme, address in addresses:
        try:
            if scheme == "grpc":
                import tritonclient.grpc as grpcclient

                client = grpcclient.InferenceServerClient(address)
                try:
                    meta = client.get_model_metadata(STREAM_MODEL, as_json=True, client_timeout=timeout)
                    config = _config_or_empty(lambda c=client: c.get_model_config(STREAM_MODEL, as_json=True,
                                                                                  client_timeout=timeout)["config"])
                finally:
                    client.close()
            else:
                import tritonclient.http as httpclient

                client = httpclient.InferenceServerClient(address, ssl=scheme == "https", connection_timeout=timeout,
                                                          network_timeout=timeout)
                try:
                    meta = client.get_model_metadata(MODEL)
                    config = _config_or_empty(lambda c=client: c.get_model_config(MODEL))
                finally:
                    client.close()
        except Exception as exc:  # not reachable, model missing: try the next address
            failures.append(f"{scheme}://{address}: {_message(exc)}")
            continue
        params = {k: str((v or {}).get("string_value", "")) for k, v in (config.get("parameters") or {}).items()}
        return ServerInfo(inputs={i["name"] for i in meta.get("inputs", [])}, parameters=params,
                          url=f"{scheme}://{address}")
    return ServerInfo(error="; ".join(failures) or "no address")


# ---------------------------------------------------------------------------------------------------------------------
# model and LoRA choices


def registered_models(mlflow_uri: str | None) -> list[str]:
    """``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` of every registered model (newest version first)."""
    if not mlflow_uri:
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    out = []
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name='{rm.name}'")
        aliases = {}
        for mv in versions:
            for alias in getattr(mv, "aliases", None) or []:
                aliases[alias] = mv.version
        aliases.update(getattr(rm, "aliases", None) or {})
        out += [f"models:/{rm.name}@{alias}" for alias in sorted(aliases)]
        out += [f"models:/{rm.name}/{mv.version}" for mv in sorted(versions, key=lambda v: -int(v.version))]
    return out


def model_choices(mlflow_uri: str | None, timeout: float = 15.0) -> tuple[list[str], str]:
    """Dropdown choices and a note (why the list may be short). An unreachable registry (MLflow retries for
    minutes) gives up after ``timeout`` seconds: the page must not wait on it."""
    box: dict[str, Any] = {}

    def work():
        try:
            box["found"] = registered_models(mlflow_uri)
        except Exception as exc:  # registry down: the UI still works with the served model
            box["error"] = f"{type(exc).__name__}: {exc}"

    worker = threading.Thread(target=work, name="mlflow-models", daemon=True)
    worker.start()
    worker.join(timeout)
    if "found" in box:
        return [SERVED, *box["found"]], "" if box["found"] else f"no registered versions at {mlflow_uri}"
    reason = box.get("error") or f"no answer within {timeout:.0f} s"
    return [SERVED], f"MLflow registry at {mlflow_uri} not reachable: {reason}"


def lora_files(lora_dir: str | os.PathLike | None) -> list[str]:
    """``.safetensors`` file names in ``lora_dir`` (sorted), V2's LoRA dropdown."""
    if not lora_dir or not Path(lora_dir).is_dir():
        return []
    return sorted(p.name for p in Path(lora_dir).iterdir() if p.suffix == ".safetensors" and p.is_file())


# ---------------------------------------------------------------------------------------------------------------------
# samples: samples/<date>/NNN.mp4|png + logs.json


def _atomic_write(path: Path, data: bytes) -> None:
    from easyanimate.video import atomic_write_bytes

    atomic_write_bytes(path, data)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Serialise numbering and logs.json updates across threads and processes sharing ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with _SAVE_LOCK, open(folder / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_logs(folder: Path) -> list[dict[str, Any]]:
    path = Path(folder) / "logs.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        logger.warning("%s is not valid JSON; starting a new list", path)
        return []
    return data if isinstance(data, list) else [data]


def save_sample(samples_dir: str | os.PathLike, result: GenerationResult, record: dict[str, Any],
                now: _dt.datetime | None = None) -> Path:
    """Write the media as the next ``NNN.<ext>`` of today's folder and append ``record`` (+ file, time, server
    answer) to its ``logs.json``; both writes are atomic (temp file + rename)."""
    now = now or _dt.datetime.now()
    folder = Path(samples_dir) / now.strftime("%Y-%m-%d")
    with _folder_lock(folder):
        taken = [int(m[1]) for p in folder.iterdir() if (m := re.fullmatch(r"(\d+)\.(mp4|png)", p.name))]
        path = folder / f"{max(taken, default=0) + 1:03d}{result.suffix}"
        _atomic_write(path, result.data)
        entry = {"file": path.name, "time": now.isoformat(timespec="seconds"), **record,
                 "server": result.url, "transport": result.transport,
                 "served_parameters": result.metadata.get("parameters"), "model": result.metadata.get("model"),
                 "timings": result.metadata.get("timings")}
        logs = read_logs(folder) + [entry]
        _atomic_write(folder / "logs.json", (json.dumps(logs, indent=2, ensure_ascii=False) + "\n").encode())
    return path


def gallery_items(samples_dir: str | os.PathLike, limit: int = GALLERY_LIMIT) -> list[tuple[str, str]]:
    """Past results (newest first) as ``(path, caption)`` from every ``<date>/logs.json`` under ``samples_dir``."""
    root = Path(samples_dir)
    if not root.is_dir():
        return []
    items = []
    for folder in sorted((p for p in root.iterdir() if p.is_dir()), reverse=True):
        for entry in reversed(read_logs(folder)):
            path = folder / str(entry.get("file", ""))
            if path.is_file() and path.stat().st_size:
                items.append((str(path.resolve()), f"{folder.name}/{path.name} · {str(entry.get('prompt', ''))[:60]}"))
            if len(items) >= limit:
                return items
    return items


# ---------------------------------------------------------------------------------------------------------------------
# one generation


def request_inputs(params: dict[str, Any], info: ServerInfo, lora_dir: str | os.PathLike | None) -> tuple[
        dict[str, np.ndarray], dict[str, Any]]:
    """UI values → Triton inputs, plus what was applied (model / LoRA only when the server takes them)."""
    inputs = to_inputs(params["prompt"], negative_prompt=params["negative_prompt"], seed=params["seed"],
                       steps=params["steps"], guidance=params["guidance"], num_frames=params["num_frames"],
                       height=params["height"], width=params["width"], fps=params["fps"], sampler=params["sampler"])
    applied = {"model_applied": False, "lora_applied": False}
    if params.get("accel") and "ACCEL" in info.inputs:  # the speed setting (easyanimate.accel spec)
        inputs["ACCEL"] = np.array([str(params["accel"]).encode()], dtype=object)
    model = params.get("model")
    if model and model != SERVED and info.supports_model_choice:
        inputs["MODEL"] = np.array([str(model).encode()], dtype=object)
        applied["model_applied"] = True
    lora = params.get("lora")
    if lora and lora != NO_LORA and info.supports_lora:
        # the NAME only: the server resolves it in its own LoRA folder (it never takes a path)
        inputs["LORA"] = np.array([Path(str(lora)).name.encode()], dtype=object)
        if "LORA_ALPHA" in info.inputs:
            inputs["LORA_ALPHA"] = np.array([params["lora_alpha"]], dtype=np.float32)
        applied["lora_applied"] = True
    return inputs, applied


def run_request(server: str, inputs: dict[str, np.ndarray], on_progress: Callable[[int, int], None] | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> GenerationResult:
    """``client.send``: every PROGRESS step goes to ``on_progress`` (the page's progress bar)."""
    return send(server, inputs, on_progress, timeout)


def _served_text(metadata: dict[str, Any]) -> str:
    model = metadata.get("model") or {}
    text = f"Answered by `{model.get('served_as') or model.get('alias_uri') or model.get('source', '?')}`"
    if model.get("version"):
        text += f" — {model.get('name', '')} version `{model['version']}`"
    if model.get("weights_sha256"):
        text += f", weights sha256 `{str(model['weights_sha256'])[:12]}…`"
    return text


# ---------------------------------------------------------------------------------------------------------------------
# the page


CSS = """
#status-box {min-height: 2.5em}
#status-box .error-text {color: #c0392b; font-weight: 600}
"""


def build_ui(server: str, *, mlflow_uri: str | None = None, samples_dir: str | os.PathLike = "samples",
             lora_dir: str | os.PathLike | None = None, timeout: float = DEFAULT_TIMEOUT):
    """The gradio page for ``server`` (``grpc://HOST:PORT``, ``http://HOST:PORT``, bare ``HOST[:PORT]`` or several,
    comma-separated, as in ``serving.client``).

    Args:
        mlflow_uri: MLflow tracking URI: the model dropdown lists its registered versions and aliases; None shows a
            local-folder text box instead.
        samples_dir: results go to ``<samples_dir>/<date>/NNN.mp4|png`` + ``logs.json``.
        lora_dir: folder of LoRA ``.safetensors`` (default ``models/Personalized_Model``, V2's).
        timeout: seconds one request may take.
    """
    import gradio as gr

    from easyanimate.config import V2_NEGATIVE_PROMPT
    from easyanimate.schedulers import SAMPLERS

    parse_server(server)  # a bad address fails here, not at the first click
    samples_dir = Path(samples_dir).resolve()
    samples_dir.mkdir(parents=True, exist_ok=True)
    lora_dir = Path(lora_dir or DEFAULT_LORA_DIR)
    gr.set_static_paths([str(samples_dir)])  # results and gallery are served from where they are saved
    info_box: dict[str, ServerInfo] = {"info": server_info(server)}

    def lora_note(info: ServerInfo) -> str:
        if info.supports_lora:
            server_dir = info.parameters.get("lora_dir", "")
            enabled = info.parameters.get("lora_enabled")  # the front's public config (no server paths in it)
            if (info.parameters and not server_dir and enabled != "true") or enabled == "false":
                return (f"LoRA files from `{lora_dir}`. The server applies a LoRA by file name, but it has **no LoRA "
                        "folder** (start it with `--lora-dir`): choosing one gives an error.")
            where = f" (server folder `{server_dir}`)" if server_dir else (" from its own `--lora-dir`" if enabled
                                                                           else "")
            return (f"LoRA files from `{lora_dir}`; the chosen file's name is sent and the server applies it with "
                    f"LoRA alpha{where} — it must hold a file of that name.")
        return (f"LoRA files from `{lora_dir}`. **This server's model takes no LoRA input: a chosen LoRA is not "
                "applied** (recorded as `lora_applied: false`). Merge it locally instead: "
                "`easyanimate generate --lora FILE --lora-scale ALPHA`.")

    def model_note(info: ServerInfo, note: str = "") -> str:
        text = info.describe()
        if not info.supports_model_choice:
            text += (". The server serves one model: the selection below is recorded but not sent; start the server "
                     "with `easyanimate serve --model <choice>` to serve another.")
        elif len(info.allowed) > 1:
            text += ". Registered versions the server does not allow are refused with the list it allows."
        return text + (f" ({note})" if note else "")

    def choices_for(info: ServerInfo) -> tuple[list[str], str]:
        """The model dropdown: the server's allowed models first, then the registry's other versions/aliases."""
        registered, note = model_choices(mlflow_uri) if mlflow_uri else ([SERVED], "")
        ordered = [SERVED, *info.allowed]
        return ordered + [m for m in registered if m not in ordered], note

    first_info = info_box["info"]
    choices, reg_note = choices_for(first_info)
    start = first_info.defaults()  # the served default's generate defaults (V2's when it publishes none)

    with gr.Blocks(title="EasyAnimate V2 (Triton)") as demo:
        gr.Markdown("# EasyAnimate V2 — text to video\nGenerated by the Triton server at "
                    f"`{server}`; results are saved under `{samples_dir}`.")
        with gr.Column(variant="panel"):
            gr.Markdown("### 1. Model checkpoints")
            with gr.Row():
                edition = gr.Dropdown(label="Edition", choices=list(EDITIONS), value="v2", interactive=True,
                                      info="v1 (512×512, motion module) is not served", elem_id="edition", scale=1)
                if mlflow_uri or first_info.allowed:
                    label = "Pretrained model (allowed by the server" + (", then the MLflow registry)" if mlflow_uri
                                                                          else ")")
                    model = gr.Dropdown(label=label, choices=choices, value=SERVED, interactive=True,
                                        elem_id="model", scale=3)
                else:
                    model = gr.Textbox(label="Pretrained model (local folder)", value="",
                                       placeholder="served model; a pipeline folder is recorded, not sent",
                                       elem_id="model", scale=3)
                refresh = gr.Button("↻", scale=0, min_width=50, elem_id="refresh")
            with gr.Row():
                lora = gr.Dropdown(label="Select LoRA model", choices=[NO_LORA, *lora_files(lora_dir)], value=NO_LORA,
                                   interactive=True, elem_id="lora", scale=2)
                lora_alpha = gr.Slider(label="LoRA alpha", value=V2_DEFAULTS["lora_alpha"], minimum=0, maximum=2,
                                       step=0.05, interactive=True, elem_id="lora-alpha", scale=2)
            served = gr.Markdown(model_note(info_box["info"], reg_note), elem_id="served-model")
            lora_info = gr.Markdown(lora_note(info_box["info"]), elem_id="lora-note")

        with gr.Column(variant="panel"):
            gr.Markdown("### 2. Configs for generation")
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                placeholder="This video shows the majestic beauty of a waterfall cascading down a "
                                            "cliff into a serene lake.")
            gr.Examples(example_prompts(), inputs=prompt, label="Example prompts (the sample clips' captions)",
                        elem_id="examples")
            negative_prompt = gr.Textbox(label="Negative prompt", lines=2, value=V2_NEGATIVE_PROMPT,
                                         elem_id="negative-prompt")
            with gr.Row():
                with gr.Column():
                    with gr.Row():
                        sampler = gr.Dropdown(label="Sampling method", choices=list(SAMPLERS),
                                              value=_sampler_choice(start["sampler"]), elem_id="sampler")
                        steps = gr.Slider(label="Sampling steps", value=start["steps"], minimum=1, maximum=100,
                                          step=1, elem_id="steps")
                    width = gr.Slider(label="Width", value=start["width"], minimum=16, maximum=1280, step=16,
                                      elem_id="width")
                    height = gr.Slider(label="Height", value=start["height"], minimum=16, maximum=1280,
                                       step=16, elem_id="height")
                    with gr.Row():
                        is_image = gr.Checkbox(label="Generate Image", value=start["num_frames"] == 1,
                                               elem_id="generate-image")
                        length = gr.Slider(label="Animation length", minimum=9, maximum=144, step=9,
                                           value=max(9, start["num_frames"]), elem_id="length",
                                           interactive=start["num_frames"] != 1)
                    cfg = gr.Slider(label="CFG Scale", value=start["guidance"], minimum=0, maximum=20,
                                    step=0.1, elem_id="cfg")
                    accel = gr.Dropdown(label="Speed (step caching; exact = bit-identical)",
                                        choices=_with(ACCEL_CHOICES, start.get("accel")),
                                        value=start.get("accel") or "default", allow_custom_value=True,
                                        elem_id="accel")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=start["seed"], precision=0, minimum=0,
                                         elem_id="seed", scale=3)
                        dice = gr.Button("⚄", scale=0, min_width=50, elem_id="seed-dice")
                    with gr.Row():
                        generate_btn = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel", scale=1)
                with gr.Column():
                    result_image = gr.Image(label="Generated image", visible=False, interactive=False,
                                            elem_id="result-image")
                    result_video = gr.Video(label="Generated animation", interactive=False, elem_id="result-video",
                                            loop=True, autoplay=True)
                    status = gr.Markdown("", elem_id="status-box")
        with gr.Column(variant="panel"):
            gr.Markdown("### 3. Past results")
            gallery = gr.Gallery(label="samples", value=gallery_items(samples_dir), columns=6, height=240,
                                 fit_columns=False, object_fit="contain", elem_id="gallery", allow_preview=True)

        # -- events ----------------------------------------------------------------------------------------------

        def on_refresh():
            info_box["info"] = info = server_info(server)
            if mlflow_uri or info.allowed:
                new_choices, note = choices_for(info)
                model_update = gr.update(choices=new_choices)
            else:
                note, model_update = "", gr.update()
            return (model_update, gr.update(choices=[NO_LORA, *lora_files(lora_dir)]), model_note(info, note),
                    lora_note(info), gallery_items(samples_dir))

        refresh.click(on_refresh, outputs=[model, lora, served, lora_info, gallery], queue=False)
        dice.click(lambda: random.randint(1, MAX_SEED_UI), outputs=seed, queue=False)
        is_image.change(lambda img: gr.update(interactive=not img), inputs=is_image, outputs=length, queue=False)
        # the slider follows the edition's frame rule (v2: 9k; v3 slice VAE: 1 + 8k); the server still checks
        edition.change(lambda ed: gr.update(**length_slider(ed)), inputs=edition, outputs=length, queue=False)

        def on_model(choice):
            """A model chosen: the controls take its generate defaults (what the server published for it)."""
            info = info_box["info"]
            if choice not in (SERVED, *info.allowed):  # a registered version this server does not serve
                return (gr.update(),) * 8
            if info.allowed and choice not in info.parameters.get("generate_defaults", ""):
                info_box["info"] = info = server_info(server)  # loaded since the page was built: ask again
            d = info.defaults(choice)
            return (gr.update(value=_sampler_choice(d["sampler"])), gr.update(value=d["steps"]),
                    gr.update(value=d["width"]), gr.update(value=d["height"]),
                    gr.update(value=d["num_frames"] == 1), gr.update(value=max(9, d["num_frames"]),
                                                                     interactive=d["num_frames"] != 1),
                    gr.update(value=d["guidance"]), gr.update(value=d.get("accel") or "default"))

        model.change(on_model, inputs=model, outputs=[sampler, steps, width, height, is_image, length, cfg, accel],
                     queue=False)

        def on_generate(edition_v, model_v, lora_v, alpha_v, prompt_v, negative_v, sampler_v, steps_v, width_v,
                        height_v, is_image_v, length_v, cfg_v, seed_v, accel_v, progress=gr.Progress()):
            keep = (gr.update(), gr.update(), gr.update(), gallery_items(samples_dir))

            def fail(text: str):
                gr.Warning(text)
                return (*keep[:2], f'<span class="error-text">✖ {_escape(text)}</span>', keep[3], gr.update())

            if not str(prompt_v or "").strip():
                return fail("Please enter a prompt.")
            params = {"edition": edition_v, "model": model_v or SERVED, "lora": lora_v, "lora_alpha": float(alpha_v),
                      "prompt": prompt_v, "negative_prompt": negative_v or "", "sampler": sampler_v,
                      "steps": int(steps_v), "width": int(width_v), "height": int(height_v),
                      "num_frames": 1 if is_image_v else int(length_v), "guidance": float(cfg_v),
                      "seed": int(seed_v if seed_v is not None else V2_DEFAULTS["seed"]),
                      "fps": info_box["info"].defaults(model_v)["fps"],
                      "accel": str(accel_v or "default").strip()}
            info = info_box["info"]
            if info.error and not info.url:  # the server was down at start: ask again
                info_box["info"] = info = server_info(server)
            inputs, applied = request_inputs(params, info, lora_dir)
            progress(0, desc="waiting for the server (prompt encoding)")
            started = time.monotonic()

            def on_step(step: int, total: int) -> None:
                progress((step, total), desc="denoising", unit="steps")

            try:
                result = run_request(server, inputs, on_step, timeout=timeout)
            except ServerError as exc:
                return fail(f"The server rejected the request: {exc}")
            except ConnectionError as exc:
                return fail(f"Cannot reach the server: {exc}")
            except Exception as exc:  # anything else: a message, not a stack trace
                logger.exception("generation failed")
                return fail(f"Generation failed: {type(exc).__name__}: {exc}")
            progress(1.0, desc="saving")
            path = save_sample(samples_dir, result, {**params, **applied})
            seconds = time.monotonic() - started
            text = (f"✔ Saved `{path}` ({len(result.data) / 1024:.0f} KiB, {seconds:.1f} s, "
                    f"{result.transport}, {len(result.progress)} progress messages)")
            served_params = result.metadata.get("parameters") or {}
            if params["lora"] != NO_LORA and not applied["lora_applied"]:
                text += f" — LoRA `{params['lora']}` was not applied (the server takes no LoRA)."
            elif applied["lora_applied"] and served_params.get("lora"):
                text += (f" — LoRA `{served_params['lora']}` applied by the server "
                         f"(alpha {float(served_params.get('lora_alpha', params['lora_alpha'])):g}).")
            image_out = gr.update(value=str(path), visible=True) if result.suffix == ".png" else gr.update(
                value=None, visible=False)
            video_out = gr.update(value=str(path), visible=True) if result.suffix == ".mp4" else gr.update(
                value=None, visible=False)
            served_text = _served_text(result.metadata)
            if not info.supports_model_choice:
                served_text += " (the model selection is recorded, not sent: the server serves one model)"
            return image_out, video_out, text, gallery_items(samples_dir), served_text

        generation = generate_btn.click(
            on_generate,
            inputs=[edition, model, lora, lora_alpha, prompt, negative_prompt, sampler, steps, width, height, is_image,
                    length, cfg, seed, accel],
            outputs=[result_image, result_video, status, gallery, served],
            concurrency_limit=1,
        )
        # stops waiting for the answer and frees the page (the server finishes or drops the request on its side)
        cancel_btn.click(lambda: "Cancelled.", outputs=status, cancels=[generation], queue=False)
    demo.samples_dir = samples_dir  # for launch(): allowed_paths
    return demo


def _sampler_choice(name: str) -> str:
    """A defaults' sampler spelled as the dropdown lists it (``dpm++`` → ``DPM++``)."""
    from easyanimate.schedulers import SAMPLERS, canonical_sampler

    try:
        name = canonical_sampler(name)
    except ValueError:
        return V2_DEFAULTS["sampler"]
    return name if name in SAMPLERS else V2_DEFAULTS["sampler"]


def _with(choices: list[str], extra: str | None) -> list[str]:
    return choices if not extra or extra in choices else [*choices, extra]


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def launch(server: str, host: str = "127.0.0.1", port: int | None = None, *, mlflow_uri: str | None = None,
           samples_dir: str | os.PathLike = "samples", lora_dir: str | os.PathLike | None = None,
           block: bool = True, quiet: bool = True, timeout: float = DEFAULT_TIMEOUT):
    """Build and serve the UI (loopback by default; ``port`` None = gradio's 7860 or the next free one).

    Returns ``(demo, url)``; with ``block=True`` it serves until Ctrl-C first. ``demo.close()`` stops it."""
    demo = build_ui(server, mlflow_uri=mlflow_uri, samples_dir=samples_dir, lora_dir=lora_dir, timeout=timeout)
    demo.queue(default_concurrency_limit=1)
    _app, url, _share = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, share=False,
                                    quiet=quiet, inbrowser=False, ssr_mode=False, show_error=False,
                                    allowed_paths=[str(demo.samples_dir)], css=CSS, footer_links=["api"],
                                    mcp_server=False)
    url = url or f"http://{host}:{demo.server_port}/"
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo, url


__all__ = ["ServerInfo", "build_ui", "gallery_items", "launch", "lora_files", "model_choices", "read_logs",
           "registered_models", "request_inputs", "run_request", "save_sample", "server_info"]

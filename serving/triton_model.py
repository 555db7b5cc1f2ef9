"""The Triton Python-backend adapter shared by ``easyanimate`` and ``easyanimate_stream``.

Each ``serving/model_repository/<model>/1/model.py`` only imports ``TritonPythonModel`` from here. The adapter:
``initialize`` loads one pipeline (``load_model``), ``execute`` turns each request into a ``GenerationRequest``
(``serving/request.py``), runs ``generate`` and answers with ``VIDEO`` + ``METADATA`` — or with one ``TritonError``
for that request only (INVALID_ARG for a bad request, INTERNAL for a failure while generating), so the instance stays
healthy. The decoupled ``easyanimate_stream`` sends a ``PROGRESS`` response after every denoising step, then the video,
then the final flag.

Model parameters (``config.pbtxt`` ``parameters``, runtime knobs only; empty = the default/env):

================ ======================================================================================================
model_source     ``tiny`` (random tiny weights), a pipeline folder, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``
                 (default: env ``EASYANIMATE_MODEL_URI``)
tracking_uri     MLflow tracking URI for ``models:/`` sources (default: env ``MLFLOW_TRACKING_URI``)
model_alias      informational: the ``models:/NAME@ALIAS`` the launcher resolved ``model_source`` from (in METADATA)
device           ``auto`` (cuda when available) | ``cpu`` | ``cuda`` | ``cuda:N``
dtype            transformer/VAE dtype: empty = as stored, or float32 | bfloat16 | float16
torch_threads    intra-op CPU threads per instance (0 = torch's default)
max_size         largest HEIGHT/WIDTH accepted (default 1280)
max_frames       largest NUM_FRAMES accepted (default 144; lowered to what the motion module's table allows)
lora_dir         folder of official-format LoRA ``.safetensors`` a request may name in ``LORA`` (by file name only);
                 empty = LoRA disabled (a request naming one gets an error)
max_cost         work budget per request (``frames*height*width*steps``, x2 with CFG); empty = the version's
                 ``max_cost`` default, else sized for the device (``serving.request.default_admission``)
deadline_s       seconds a request may compute before it is stopped at the next step; empty = version's/device's
stop_file        set by the launcher: once this file exists every generation stops at its next denoising step
shm_prefix       set by the launcher: the server's ``/dev/shm`` regions, removed by a stub whose server died
admission_dir    set by the launcher: each model writes ``<model>.json`` there (budget, cost-input defaults) so the
                 front refuses over-budget requests before they wait in Triton's queue
================ ======================================================================================================

A request's LoRA is merged into the transformer for that request only (the whole file is checked first; the exact
original weights are copied back afterwards, also when the request fails), under a per-model lock: Triton calls
``execute`` of an instance sequentially anyway, the lock keeps in-process callers (bench, tests) safe too.

``load_model`` and ``generate`` do not need the stub: the benchmark and tests call them in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .request import (
    MODEL_INPUT,
    Admission,
    GenerationRequest,
    Limits,
    OverBudget,
    RequestError,
    cancel_marker,
    check_budget,
    check_request,
    default_admission,
    merge_defaults,
    model_names,
    parse_request,
    resolve_lora,
)

try:  # only inside the Triton stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # tests, bench
    pb_utils = None

MODEL_URI_ENV = "EASYANIMATE_MODEL_URI"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
_HASH_LIMIT = 2 << 30  # hash local folders up to 2 GiB at load; bigger ones (the official 16 GB) are not re-hashed


class Cancelled(Exception):
    """Generation stopped at a denoising step: the client went away or cancelled, the request's deadline passed, or
    the server is stopping (``reason``: ``cancelled`` | ``deadline`` | ``shutdown``)."""

    def __init__(self, message: str, reason: str = "cancelled", step: int = 0):
        super().__init__(message)
        self.reason = reason
        self.step = step


@dataclass
class LoadedModel:
    """A loaded pipeline and what METADATA says about it."""

    pipe: Any
    limits: Limits
    defaults: dict[str, Any]
    info: dict[str, Any]  # name, version, source, alias, weights_sha256
    load_seconds: float
    lora_dir: str = ""  # the folder LORA names are resolved in; "" = LoRA disabled
    admission: Admission | None = None  # work budget + deadline (None = unlimited, in-process callers)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one generation (and LoRA) at a time


def parameters_of(model_config: Mapping[str, Any]) -> dict[str, str]:
    """``{"key": {"string_value": v}}`` parameters of a Triton model config → ``{"key": v}``."""
    return {k: str(v.get("string_value", "")) for k, v in (model_config.get("parameters") or {}).items()}


def _digest_modules(*modules) -> str:
    """sha256 over the parameters of in-memory modules (names and raw bytes, in name order)."""
    import torch

    digest = hashlib.sha256()
    for module in modules:
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _folder_digest(folder: Path) -> str | None:
    from .pyfunc import manifest_digest, weights_manifest

    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return manifest_digest(weights_manifest(folder)) if size <= _HASH_LIMIT else None


def registered_defaults(client, name: str, version: str) -> dict[str, Any]:
    """A registered version's generate defaults: its pyfunc's ``model_config`` (in the MLmodel file)."""
    import mlflow
    import yaml

    root = client.get_model_version_download_uri(name, str(version)).rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel", dst_path=tmp,
                                                      tracking_uri=client.tracking_uri)
        flavor = (yaml.safe_load(Path(mlmodel).read_text()).get("flavors") or {}).get("python_function") or {}
    return dict(flavor.get("config") or {})


def _registered(source: str, tracking_uri: str | None) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """``models:/NAME@ALIAS|VERSION`` → (local pipeline folder, model info, the version's generate defaults)."""
    from mlflow.tracking import MlflowClient

    from .registry import download_pipeline

    m = _MODELS_URI.match(source)
    if m is None:
        raise ValueError(f"model_source {source!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mv = (client.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"]
          else client.get_model_version(m["name"], m["version"]))
    if m["alias"]:  # an alias names whatever passed the gates; a pinned version is the operator's explicit choice
        from .registry import gate_refusal

        refusal = gate_refusal(mv)
        if refusal:
            raise ValueError(f"{source} points at version {mv.version}, which is not served: {refusal}")
    pinned = f"models:/{mv.name}/{mv.version}"  # the alias may move while we download: load what we resolved
    folder = download_pipeline(pinned, tracking_uri)
    defaults = registered_defaults(client, mv.name, mv.version)
    info = {"name": mv.name, "version": str(mv.version), "source": pinned,
            "alias": m["alias"], "weights_sha256": (mv.tags or {}).get("weights_sha256"),
            "run_id": mv.run_id, "git_commit": (mv.tags or {}).get("git_commit")}
    return folder, info, defaults


def load_model(source: str, tracking_uri: str | None = None, device: str = "auto", dtype: str = "",
               max_size: int = 1280, max_frames: int = 144, alias_uri: str = "", lora_dir: str = "",
               max_cost: int | None = None, deadline_s: float | None = None) -> LoadedModel:
    """Load the pipeline a model source names.

    Args:
        source: ``tiny`` (the tiny preset, random weights, its generate section as defaults), a pipeline folder
            (V2's defaults), or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (downloaded once into the model
            cache; defaults from the registered pyfunc's ``model_config``, else V2's).
        tracking_uri: MLflow URI for ``models:/`` sources.
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        dtype: transformer/VAE dtype (empty = as stored).
        max_size, max_frames: upper bounds of HEIGHT/WIDTH and NUM_FRAMES.
        alias_uri: the ``models:/NAME@ALIAS`` a pinned version was resolved from (recorded in ``info``).
        lora_dir: folder of LoRA ``.safetensors`` requests may name (empty = LoRA disabled).
        max_cost, deadline_s: the admission (``serving.request.default_admission``): None/0 = the version's
            ``max_cost`` / ``deadline_s`` defaults, else sized for the device.
    """
    import torch

    from easyanimate.config import load_config
    from easyanimate.pipeline import EasyAnimatePipeline, build_pipeline, resolve_dtype
    from easyanimate.schedulers import canonical_sampler

    start = time.perf_counter()
    if not source:
        raise ValueError(f"no model source: set the model_source parameter or {MODEL_URI_ENV}")
    if source == "tiny":
        cfg = load_config("tiny")
        pipe = build_pipeline(cfg.model)
        if dtype:
            pipe.to(dtype=resolve_dtype(dtype))
        defaults = dict(vars(cfg.generate))
        info = {"name": "tiny", "version": f"random-init-seed{cfg.model.init_seed}", "source": "tiny",
                "weights_sha256": _digest_modules(pipe.transformer, pipe.vae)}
    elif source.startswith("models:/"):
        folder, info, defaults = _registered(source, tracking_uri)
        # the version's own torch_dtype (pyfunc model_config) unless the server sets one
        pipe = EasyAnimatePipeline.from_pretrained(folder, torch_dtype=dtype or defaults.get("torch_dtype") or None)
    else:
        folder = Path(source).expanduser().resolve()
        pipe = EasyAnimatePipeline.from_pretrained(folder, torch_dtype=dtype or None)
        defaults = {}
        info = {"name": folder.name, "version": "local", "source": folder.name,  # answers carry no server path
                "weights_sha256": _folder_digest(folder)}
    if alias_uri:
        info["alias_uri"] = alias_uri
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":  # loaded on the CPU
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    raw_defaults = dict(defaults)
    m = pipe.size_multiple
    frame_offset, frame_multiple = pipe.vae.frame_rule  # the served VAE's rule: (0, 9) V2 chunks, (1, 8) slices
    bound = max_frames + frame_offset  # the slice VAE's lone first frame on top of V2's 144: 145 = 1 + 8 * 18
    top = bound - (bound - frame_offset) % frame_multiple
    table = pipe.transformer.config.motion_module_kwargs.get("temporal_position_encoding_max_len", 4096)
    while top >= frame_offset + frame_multiple and pipe.latent_frames(top) > table:
        top -= frame_multiple
    if top < frame_offset + frame_multiple:
        top = 1
    limits = Limits(size_multiple=m, min_size=m, max_size=max(m, max_size - max_size % m),
                    frame_multiple=frame_multiple, frame_offset=frame_offset, max_frames=top)
    defaults = merge_defaults(defaults)
    try:
        defaults["sampler"] = canonical_sampler(defaults["sampler"])
        check_request(GenerationRequest(prompt="-", **defaults), limits)
        from easyanimate.accel import resolve as resolve_accel

        resolve_accel(defaults["accel"], str(device))  # e.g. an fp8 default served on a CPU
    except ValueError as exc:
        raise ValueError(f"the generate defaults of {info['source']} do not fit what it serves: {exc}") from None
    info["device"] = str(device)
    # clients (the web UI) learn the served frame rule from each answer: NUM_FRAMES = 1 or offset + step * k
    info["frame_rule"] = {"offset": frame_offset, "step": frame_multiple, "max_frames": top}
    if lora_dir and not Path(lora_dir).is_dir():
        raise ValueError(f"lora_dir {lora_dir!r} is not a folder")
    admission = default_admission(raw_defaults, str(device), max_cost=max_cost, deadline_s=deadline_s)
    return LoadedModel(pipe=pipe, limits=limits, defaults=defaults, info=info,
                       load_seconds=round(time.perf_counter() - start, 3),
                       lora_dir=str(Path(lora_dir).resolve()) if lora_dir else "", admission=admission)


def generate(model: LoadedModel, req: GenerationRequest,
             on_step: Callable[[int, int], bool | str | None] | None = None) -> tuple[bytes, str, dict[str, Any]]:
    """One request → ``(media bytes, mime, metadata)``; the same pipeline call as ``easyanimate generate``.

    ``on_step(step, total)`` runs after each denoising step (1-based); returning False (or a reason string:
    ``cancelled`` | ``deadline`` | ``shutdown``) stops there and raises ``Cancelled``. Metadata: seed, resolved
    parameters (``lora``, ``lora_alpha`` included), model info, timings (s) of load / encode (text) / denoise (LoRA
    merge included) / decode (VAE) / encode_media (MP4 or PNG) / total, and ``started_at`` / ``finished_at`` (unix).

    ``req.lora`` (a file name in ``model.lora_dir``) is merged with ``req.lora_alpha`` for the denoising only; the
    transformer's exact weights are restored afterwards, whatever happens. A name that is not in the folder, or a
    file that does not fit the transformer, raises ``RequestError`` with the model untouched.
    """
    import torch

    from easyanimate.models.lora import lora_merged
    from easyanimate.video import encode_media

    pipe = model.pipe
    timings = {"load": model.load_seconds, "encode": 0.0}
    encode_prompt = pipe.encode_prompt

    def timed_encode(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return encode_prompt(*args, **kwargs)
        finally:
            timings["encode"] += time.perf_counter() - begin

    stopped = []

    def callback(p, i, _t, _kwargs):
        if on_step is None:
            return
        verdict = on_step(i + 1, len(p.scheduler.timesteps))
        if verdict is False or isinstance(verdict, str):
            p.interrupt = True
            stopped.append((i + 1, verdict if isinstance(verdict, str) else "cancelled"))

    lora_path = resolve_lora(req.lora, model.lora_dir)  # before any work: a bad name is the request's error
    from easyanimate.accel import AccelError
    from easyanimate.accel import resolve as resolve_accel

    try:  # the device-dependent checks (fp8, offload, flash attention need CUDA) are the request's error too
        accel = resolve_accel(req.accel, str(model.info.get("device", "cpu")))
    except AccelError as exc:
        raise RequestError(f"ACCEL: {exc}") from None
    started_at = time.time()
    start = time.perf_counter()
    with model.lock, ExitStack() as stack:
        if lora_path is not None:
            try:
                stack.enter_context(lora_merged(pipe.transformer, lora_path, req.lora_alpha))
            except Exception as exc:  # does not fit (ValueError) or cannot be read: the weights are untouched
                if not isinstance(exc, (ValueError, OSError)) and type(exc).__name__ != "SafetensorError":
                    raise  # e.g. out of memory while merging: a server failure, not the request's
                why = f"the file cannot be read ({exc.strerror or type(exc).__name__})" if isinstance(exc, OSError) \
                    else str(exc)  # OSError messages carry the server's path: only its reason goes back
                raise RequestError(f"LORA {req.lora!r} cannot be applied to this model: {why}") from None
        try:  # a fresh scheduler per request: no state carried over
            pipe.set_sampler(req.sampler)
        except ValueError as exc:  # e.g. PNDM for a model trained with a zero terminal SNR
            raise RequestError(f"SAMPLER: {exc}") from None
        generator = torch.Generator("cpu").manual_seed(req.seed)
        pipe.encode_prompt = timed_encode  # instance attribute: times both prompt encodings of this call
        try:
            latents = pipe(req.prompt, negative_prompt=req.negative_prompt, num_frames=req.num_frames,
                           height=req.height, width=req.width, num_inference_steps=req.steps,
                           guidance_scale=req.guidance, generator=generator, output_type="latent",
                           callback_on_step_end=callback, show_progress=False, accel=accel).videos
        finally:
            del pipe.encode_prompt
    if stopped:
        step, reason = stopped[0]
        raise Cancelled(f"{reason}: stopped after denoising step {step} of {req.steps}", reason, step)
    timings["denoise"] = time.perf_counter() - start - timings["encode"]
    begin = time.perf_counter()
    frames = pipe.decode_latents(latents, generator=generator)  # what output_type="pt" does
    timings["decode"] = time.perf_counter() - begin
    begin = time.perf_counter()
    data, suffix = encode_media(frames[0], fps=req.fps)
    timings["encode_media"] = time.perf_counter() - begin
    timings["total"] = time.perf_counter() - start
    mime = "image/png" if suffix == ".png" else "video/mp4"
    metadata = {"seed": req.seed, "mime": mime, "bytes": len(data), "model": dict(model.info),
                "parameters": req.to_dict(), "timings": {k: round(v, 4) for k, v in timings.items()},
                "started_at": round(started_at, 4), "finished_at": round(time.time(), 4)}  # unix times
    return data, mime, metadata


# ---------------------------------------------------------------------------------------------------------------------
# the Triton adapter


def _bytes_tensor(name: str, value: bytes | str):
    data = value.encode("utf-8") if isinstance(value, str) else value
    return pb_utils.Tensor(name, np.array([data], dtype=np.object_))


OUTCOMES = ("success", "invalid", "over_budget", "cancelled", "deadline", "shutdown", "failed")
_STEP_BUCKETS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
_REQUEST_BUCKETS = [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0]


class ServingMetrics:
    """Our per-step and per-request metrics, on Triton's metrics port next to its own (``pb_utils.MetricFamily``;
    every instance labels its series with ``model`` and ``instance``):

    - ``easyanimate_requests_total{outcome}``: counter, outcome in ``OUTCOMES``;
    - ``easyanimate_denoise_steps_total``: counter of denoising steps done (stopped requests included);
    - ``easyanimate_stopped_request_steps_total``: counter of the steps stopped requests had done when they stopped
      (with ``easyanimate_denoise_steps_total`` read when a client left: how many steps ran after it left);
    - ``easyanimate_step_seconds``, ``easyanimate_request_seconds``: histograms (a step; a request from the start of
      its generation to its answer);
    - ``easyanimate_request_cost_total``: counter of admitted work units (``serving.request.request_cost``);
    - ``easyanimate_inflight``: gauge, 1 while the instance generates;
    - ``easyanimate_last_progress_timestamp_seconds``: gauge, unix time of the instance's last sign of progress
      (a request started, a step ended, a request ended): the launcher calls an instance whose request has not
      progressed for ``stall_timeout`` wedged.
    """

    def __init__(self, model: str, instance: str):
        family = pb_utils.MetricFamily
        labels = {"model": model, "instance": instance}

        self._families = []  # a family must outlive its metrics: keep them all

        def make(name, description, kind, **kwargs):
            self._families.append(family(name=name, description=description, kind=kind))
            return self._families[-1].Metric(labels=labels, **kwargs)

        requests = family(name="easyanimate_requests_total", description="EasyAnimate requests by outcome",
                          kind=family.COUNTER)
        self._families.append(requests)
        self._requests = {o: requests.Metric(labels={**labels, "outcome": o}) for o in OUTCOMES}
        self.steps = make("easyanimate_denoise_steps_total", "denoising steps done", family.COUNTER)
        self.stopped_steps = make("easyanimate_stopped_request_steps_total", "denoising steps done by requests that "
                                  "were then stopped (cancelled, deadline, shutdown)", family.COUNTER)
        self.cost = make("easyanimate_request_cost_total", "admitted work units (frames*height*width*steps*cfg)",
                         family.COUNTER)
        self.step_seconds = make("easyanimate_step_seconds", "seconds per denoising step", family.HISTOGRAM,
                                 buckets=_STEP_BUCKETS)
        self.request_seconds = make("easyanimate_request_seconds", "seconds per request (generation to answer)",
                                    family.HISTOGRAM, buckets=_REQUEST_BUCKETS)
        self.inflight = make("easyanimate_inflight", "1 while this instance generates", family.GAUGE)
        self.progress = make("easyanimate_last_progress_timestamp_seconds", "unix time of the last progress",
                             family.GAUGE)
        self.progress.set(time.time())

    def outcome(self, outcome: str) -> None:
        self._requests[outcome].increment(1)


class _NoMetrics:
    """Stand-in when the backend has no metrics API (or it failed): every call does nothing."""

    def __getattr__(self, _name):
        return self

    def __call__(self, *args, **kwargs):
        return self


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "success"
    if isinstance(exc, OverBudget):
        return "over_budget"
    if isinstance(exc, (RequestError, ValueError)):
        return "invalid"
    if isinstance(exc, Cancelled):
        return exc.reason if exc.reason in OUTCOMES else "cancelled"
    return "failed"


def _publish_admission(path: Path, model: LoadedModel) -> None:
    """Write what the front needs to refuse an over-budget request before it is queued: the budget and the
    defaults of the cost inputs (atomically: the front may read it any time)."""
    from .request import COST_INPUTS

    data = {"max_cost": model.admission.max_cost, "deadline_s": model.admission.deadline_s,
            "defaults": {field: model.defaults[field] for field in COST_INPUTS.values()},
            # what clients may learn through the front (the web UI's defaults): no server paths in either
            "generate": {k: v for k, v in model.defaults.items() if k != "lora"},
            "model": {k: model.info.get(k) for k in ("name", "version", "source", "alias_uri", "served_as")}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


LAUNCHER_PID_ENV = "EASYANIMATE_LAUNCHER_PID"  # set by serving.launch: the process the server must not outlive


def _alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie (a killed launcher whose parent has not reaped it yet is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def _start_parent_watchdog(shm_prefix: str, interval: float = 0.5) -> None:
    """A daemon thread: when tritonserver (this stub's parent) is gone — or the launcher that started it, e.g. after
    a SIGKILL — kill the server, remove its ``/dev/shm`` regions and exit at once, also in the middle of a
    generation (the stub's own parent check waits for ``execute`` to return)."""
    parent = os.getppid()
    launcher = int(os.environ.get(LAUNCHER_PID_ENV) or 0)

    def watch():
        while True:
            time.sleep(interval)
            if launcher and not _alive(launcher) and os.getppid() == parent:
                try:
                    os.kill(parent, 9)  # SIGKILL: the launcher is gone, nobody will stop this server
                except OSError:
                    pass
                time.sleep(0.2)
            if os.getppid() != parent:
                if shm_prefix and "/" not in shm_prefix:
                    for path in Path("/dev/shm").glob(f"{shm_prefix}*"):
                        try:
                            path.unlink()
                        except OSError:
                            pass
                os._exit(1)

    threading.Thread(target=watch, name="easyanimate-parent-watchdog", daemon=True).start()


class TritonPythonModel:
    """``easyanimate`` (one response per request) and ``easyanimate_stream`` (decoupled: progress, video, final).

    Each request is admitted (``serving.request.check_budget``: refused at once when over the work budget), then
    generated with a per-step check that stops it at the next denoising step when the client cancelled or went
    away (``request.is_cancelled()``), its deadline passed, or the launcher is stopping the server (the
    ``stop_file`` parameter exists).
    """

    def initialize(self, args: dict[str, str]) -> None:
        import torch

        self.model_config = json.loads(args["model_config"])
        self.name = args.get("model_name", self.model_config.get("name", "easyanimate"))
        self.instance = args.get("model_instance_name", "")
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.model_config)
        params = parameters_of(self.model_config)
        threads = int(params.get("torch_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.model = load_model(
            params.get("model_source") or os.environ.get(MODEL_URI_ENV, ""),
            tracking_uri=params.get("tracking_uri") or os.environ.get(TRACKING_URI_ENV) or None,
            device=(f"cuda:{args.get('model_instance_device_id', 0)}" if args.get("model_instance_kind") == "GPU"
                    else params.get("device") or "auto"),  # KIND_GPU: each instance on its own device
            dtype=params.get("dtype") or "",
            max_size=int(params.get("max_size") or 1280),
            max_frames=int(params.get("max_frames") or 144),
            alias_uri=params.get("model_alias") or "",
            lora_dir=params.get("lora_dir") or "",
            max_cost=int(params.get("max_cost") or 0) or None,
            deadline_s=float(params.get("deadline_s") or 0) or None,
        )
        self.stop_file = params.get("stop_file") or ""
        self.cancel_dir = params.get("cancel_dir") or ""
        # the MODEL values that name this model (the launcher's allowed source; the front routes by them)
        served_as = params.get("served_as") or params.get("model_alias") or self.model.info.get("source", "")
        self.model.info["served_as"] = served_as
        self.model_names = set(json.loads(params["model_names"])) if params.get("model_names") else \
            model_names(served_as) | model_names(self.model.info.get("source", ""))
        if params.get("admission_dir"):  # the launcher's front refuses over-budget requests before they queue
            _publish_admission(Path(params["admission_dir"]) / f"{self.name}.json", self.model)
        _start_parent_watchdog(params.get("shm_prefix") or "")
        try:
            self.metrics = ServingMetrics(self.name, self.instance or self.name)
        except Exception as exc:  # metrics disabled on the server (--allow-metrics=false): serve without them
            self._log("warn", f"{self.name}: no custom metrics: {exc}")
            self.metrics = _NoMetrics()
        admission = self.model.admission
        self._log("info", f"{self.instance or self.name}: loaded {self.model.info['source']} "
                          f"(version {self.model.info['version']}) in {self.model.load_seconds:.1f} s; work budget "
                          f"{admission.max_cost:,}, deadline {admission.deadline_s:g} s")

    def _log(self, level: str, message: str) -> None:
        logger = getattr(pb_utils, "Logger", None)
        if logger is not None:
            getattr(logger, f"log_{level}")(message)

    def _error(self, exc: BaseException):
        if isinstance(exc, RequestError):
            return pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
        if isinstance(exc, Cancelled):
            if exc.reason == "shutdown":  # another replica (or this one, restarted) can take it
                return pb_utils.TritonError(f"server is stopping; retry: {exc}", pb_utils.TritonError.UNAVAILABLE)
            if exc.reason == "deadline":
                return pb_utils.TritonError(f"deadline of {self.model.admission.deadline_s:g} s exceeded ({exc})",
                                            pb_utils.TritonError.CANCELLED)
            return pb_utils.TritonError(str(exc), pb_utils.TritonError.CANCELLED)
        if isinstance(exc, ValueError):  # the pipeline's own checks (e.g. a size its VAE cannot take)
            return pb_utils.TritonError(f"invalid request: {exc}", pb_utils.TritonError.INVALID_ARG)
        self._log("error", f"{self.name}: generation failed: {traceback.format_exc()}")
        # the traceback (paths included) stays in the server log; the client learns the kind of failure only
        return pb_utils.TritonError(f"generation failed on the server ({type(exc).__name__}); the server log has the "
                                    "details", pb_utils.TritonError.INTERNAL)

    def _parse(self, request) -> GenerationRequest:
        inputs = {t.name(): t.as_numpy() for t in request.inputs()}
        chosen = inputs.pop(MODEL_INPUT, None)
        if chosen is not None:  # the front routed it here; without the front, a MODEL naming another is refused
            value = chosen.reshape(-1)[0]
            value = (bytes(value).decode("utf-8", "replace") if isinstance(value, bytes | np.bytes_)
                     else str(value)).strip()
            if value and value not in self.model_names:
                raise RequestError(f"MODEL {value[:80]!r} is not served here: this model serves "
                                   f"{self.model.info.get('served_as')}")
        req = parse_request(inputs, self.model.defaults, self.model.limits)
        self.metrics.cost.increment(check_budget(req, self.model.admission))  # over budget: refused before any work
        return req

    def _stop_reason(self, request, started: float) -> str | None:
        """Why this request must stop now (None = carry on)."""
        if request.is_cancelled():
            return "cancelled"
        if self.cancel_dir and request.request_id() and cancel_marker(self.cancel_dir, request.request_id()).exists():
            return "cancelled"  # an HTTP client that hung up (the front marked it: Triton 2.51 does not cancel it)
        if self.stop_file and os.path.exists(self.stop_file):
            return "shutdown"
        if time.monotonic() - started > self.model.admission.deadline_s:
            return "deadline"
        return None

    def _run(self, request, on_progress: Callable[[int, int], None] | None = None):
        """Parse, admit and generate one request with the per-step stop checks → (data, mime, metadata); counts
        the outcome and times in the metrics either way."""
        metrics = self.metrics
        started = time.monotonic()
        last = [started]

        def on_step(step: int, total: int) -> str | None:
            now = time.monotonic()
            metrics.steps.increment(1)
            metrics.step_seconds.observe(now - last[0])
            metrics.progress.set(time.time())
            last[0] = now
            reason = self._stop_reason(request, started)
            if reason is None and on_progress is not None:
                on_progress(step, total)
            return reason

        metrics.inflight.set(1)
        metrics.progress.set(time.time())
        error = None
        try:
            req = self._parse(request)
            reason = self._stop_reason(request, started)  # cancelled while it waited in the queue
            if reason is not None:
                raise Cancelled(f"{reason}: stopped before the first denoising step", reason, 0)
            return generate(self.model, req, on_step=on_step)
        except Exception as exc:
            error = exc
            if isinstance(exc, Cancelled):
                metrics.stopped_steps.increment(exc.step)
                self._log("info", f"{self.instance or self.name}: {exc}")
            raise
        finally:
            metrics.outcome(_outcome(error))
            metrics.request_seconds.observe(time.monotonic() - started)
            metrics.inflight.set(0)
            metrics.progress.set(time.time())

    def _outputs(self, data: bytes, metadata: dict[str, Any]) -> list:
        metadata = {**metadata, "triton_model": self.name, "instance": self.instance}
        return [_bytes_tensor("VIDEO", data), _bytes_tensor("METADATA", json.dumps(metadata))]

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        responses = []
        for request in requests:
            try:
                data, _mime, metadata = self._run(request)
                responses.append(pb_utils.InferenceResponse(output_tensors=self._outputs(data, metadata)))
            except Exception as exc:  # one failed request, not a failed instance
                responses.append(pb_utils.InferenceResponse(error=self._error(exc)))
        return responses

    def _stream(self, request) -> None:
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        last = {"step": 0, "total": 0}

        def on_progress(step: int, total: int) -> None:
            last.update(step=step, total=total)
            progress = json.dumps({"step": step, "total": total})
            sender.send(pb_utils.InferenceResponse(
                output_tensors=[_bytes_tensor("VIDEO", b""), _bytes_tensor("PROGRESS", progress)]))

        try:
            data, _mime, metadata = self._run(request, on_progress)
            done = json.dumps({**last, "done": True})
            sender.send(pb_utils.InferenceResponse(
                output_tensors=[*self._outputs(data, metadata), _bytes_tensor("PROGRESS", done)]))
            sender.send(flags=final)
        except Exception as exc:
            try:
                sender.send(pb_utils.InferenceResponse(error=self._error(exc)), flags=final)
            except Exception:  # the client is gone: nothing left to tell it
                self._log("warn", f"{self.name}: could not send the error response: {exc}")

    def finalize(self) -> None:
        self.model = None


__all__ = ["Cancelled", "LoadedModel", "OUTCOMES", "ServingMetrics", "TritonPythonModel", "generate", "load_model",
           "parameters_of", "registered_defaults"]

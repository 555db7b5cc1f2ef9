"""The Triton request schema of ``easyanimate`` / ``easyanimate_stream``: parse and validate, nothing else.

Pure functions on a ``{input name: numpy array}`` dict (what the Python backend hands over, and what clients build
with ``to_inputs``). No Triton, torch or MLflow import: the stub adapter (``serving/triton_model.py``), the clients
and the unit tests share this module. Every violation raises ONE ``RequestError`` whose message names the input, what
was expected and what came, e.g. ``NUM_FRAMES must be 1 or a multiple of 9 up to 144, got 10``.

============== ======== ==================================================================================
input          datatype meaning (every input is shape [1]; all but PROMPT are optional)
============== ======== ==================================================================================
PROMPT         BYTES    UTF-8 text, 1 … ``max_prompt_chars`` characters (Unicode code points, after decoding)
NEGATIVE_PROMPT BYTES   UTF-8 text, 0 … ``max_prompt_chars`` characters (default: V2's negative prompt)
SEED           INT64    0 … 2**63-1 (default 43)
STEPS          INT64    1 … 100 (default 50; PNDM needs ≥ 4)
GUIDANCE       FP32     finite, 0 … 20 (default 6.0; ≤ 1 disables classifier-free guidance)
NUM_FRAMES     INT64    1 (an image, PNG) or a multiple of 9 up to 144 (default 144)
HEIGHT, WIDTH  INT64    multiples of 16 within [16, 1280] (defaults 384 × 672)
FPS            INT64    1 … 60 (default 24)
SAMPLER        BYTES    Euler | Euler A | DPM++ | PNDM | DDIM (case-insensitive; default DPM++)
LORA           BYTES    the NAME of a ``.safetensors`` file in the server's LoRA folder (``lora_dir``), never a path;
                        empty = none. Merged into the transformer for this request only (V2's UI does the same)
LORA_ALPHA     FP32     finite, 0 … 2 (default 0.55, V2's): the LoRA's multiplier
ACCEL          BYTES    speed setting (``easyanimate.accel`` spec): exact | default | key=value items such as
                        ``cache=first_block,threshold=0.08`` (default: the model's ``generate_defaults``, else default)
MODEL          BYTES    which of the server's allowed models answers (``serve --allow-models``): a version number,
                        an alias or a ``models:/`` URI; empty/absent = the served default. Routed by the front
                        (``serving/front.py``); the model itself only checks that the value names it
============== ======== ==================================================================================

Outputs: ``VIDEO`` (BYTES [1]: MP4, or PNG for one frame) and ``METADATA`` (BYTES [1]: JSON); the streaming model also
sends ``PROGRESS`` (BYTES [1]: JSON ``{"step": i, "total": n}``) once per denoising step before the video.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

MAX_SEED = 2**63 - 1
DEFAULT_LORA_ALPHA = 0.55  # V2's UI default
LORA_SUFFIX = ".safetensors"
MAX_LORA_NAME_BYTES = 255  # a file name longer than this cannot exist (NAME_MAX on Linux file systems)

# input name → (request field, Triton datatype); the order is the documented one
INPUTS: dict[str, tuple[str, str]] = {
    "PROMPT": ("prompt", "BYTES"),
    "NEGATIVE_PROMPT": ("negative_prompt", "BYTES"),
    "SEED": ("seed", "INT64"),
    "STEPS": ("steps", "INT64"),
    "GUIDANCE": ("guidance", "FP32"),
    "NUM_FRAMES": ("num_frames", "INT64"),
    "HEIGHT": ("height", "INT64"),
    "WIDTH": ("width", "INT64"),
    "FPS": ("fps", "INT64"),
    "SAMPLER": ("sampler", "BYTES"),
    "LORA": ("lora", "BYTES"),
    "LORA_ALPHA": ("lora_alpha", "FP32"),
    "ACCEL": ("accel", "BYTES"),
}
REQUIRED = ("PROMPT",)
OUTPUTS = ("VIDEO", "METADATA")
STREAM_OUTPUTS = ("VIDEO", "METADATA", "PROGRESS")
_FIELD_TO_INPUT = {f: name for name, (f, _) in INPUTS.items()}
_COERCE = {"prompt": str, "negative_prompt": str, "seed": int, "steps": int, "guidance": float, "num_frames": int,
           "height": int, "width": int, "fps": int, "sampler": str, "lora": str, "lora_alpha": float,
           "accel": lambda value: _accel_text(value)}
# GenerateConfig / pyfunc spellings accepted in defaults
_DEFAULT_ALIASES = {"guidance_scale": "guidance", "num_inference_steps": "steps", "frames": "num_frames"}


class RequestError(ValueError):
    """A request that does not fit the schema: the message says which input, what was expected and what came."""


@dataclass(frozen=True)
class Limits:
    """What a served model accepts (the model adapter derives them from the loaded pipeline and config.pbtxt).

    Args:
        size_multiple: HEIGHT/WIDTH must be multiples of this (VAE ×8 times the DiT patch 2 = 16 for V2).
        min_size, max_size: inclusive pixel bounds of HEIGHT and WIDTH (V2's UI: up to 1280).
        frame_multiple: NUM_FRAMES must be 1 or ``frame_offset`` + a positive multiple of this (the VAE's 9-frame
            chunk; 8-frame slice of the slice VAE).
        frame_offset: 0 for V2's chunk VAE (9k frames), 1 for the slice VAE (1 + 8k: the first frame alone).
        max_frames: inclusive upper bound of NUM_FRAMES (V2 trains and samples up to 144).
        max_steps: inclusive upper bound of STEPS (V2's UI slider: 100).
        max_guidance: inclusive upper bound of GUIDANCE (V2's UI slider: 20).
        max_prompt_chars: bound on PROMPT and NEGATIVE_PROMPT in characters (code points after UTF-8 decoding);
            V2 truncates to 120 tokens anyway, this only keeps absurd requests out.
        max_fps: inclusive upper bound of FPS.
        max_lora_alpha: inclusive upper bound of LORA_ALPHA (V2's UI slider: 2).
    """

    size_multiple: int = 16
    min_size: int = 16
    max_size: int = 1280
    frame_multiple: int = 9
    max_frames: int = 144
    frame_offset: int = 0
    max_steps: int = 100
    max_guidance: float = 20.0
    max_prompt_chars: int = 2000
    max_fps: int = 60
    max_lora_alpha: float = 2.0

    def __post_init__(self):
        if self.min_size % self.size_multiple or self.max_size % self.size_multiple or self.min_size > self.max_size:
            raise ValueError(f"size bounds {self.min_size}..{self.max_size} must be multiples of {self.size_multiple}")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request; field names are the pyfunc's request columns (``serving/pyfunc.py``)."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    num_frames: int
    height: int
    width: int
    fps: int
    sampler: str
    lora: str = ""  # a file name in the server's LoRA folder; "" = none
    lora_alpha: float = DEFAULT_LORA_ALPHA
    accel: str = "default"  # an easyanimate.accel spec: exact | default | key=value items

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def v2_defaults() -> dict[str, Any]:
    """EasyAnimate V2's predict defaults (``GenerateConfig``): DPM++, 50 steps, guidance 6.0, 144 × 384 × 672,
    seed 43, 24 fps, V2's negative prompt."""
    from easyanimate.config import GenerateConfig

    g = GenerateConfig()
    return {"negative_prompt": g.negative_prompt, "seed": g.seed, "steps": g.steps, "guidance": g.guidance_scale,
            "num_frames": g.num_frames, "height": g.height, "width": g.width, "fps": g.fps, "sampler": g.sampler,
            "accel": _accel_text(g.accel)}


def _accel_text(value: Any) -> str:
    """A defaults' accel (spec string, ``AccelConfig`` or its dict form, e.g. from a pyfunc's model_config) → the
    spec string requests carry."""
    from easyanimate.accel import to_spec
    from easyanimate.config import AccelConfig

    if isinstance(value, AccelConfig):
        return to_spec(value)
    if isinstance(value, Mapping):
        return to_spec(AccelConfig(**value))
    return str(value)


def _accel(name: str, text: str) -> str:
    """Check an accel spec for form and values (device limits, e.g. fp8 needs CUDA, are the model's check)."""
    from easyanimate.accel import AccelError, parse_spec, to_spec

    try:
        return to_spec(parse_spec(text))
    except AccelError as exc:
        raise RequestError(f"{name}: {exc}") from None


def merge_defaults(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """V2's defaults updated with a model's own (request column names or GenerateConfig names; ``prompt`` and
    unknown keys such as ``torch_dtype`` are ignored)."""
    out = v2_defaults()
    for key, value in (overrides or {}).items():
        key = _DEFAULT_ALIASES.get(key, key)
        if key in out and value is not None:
            out[key] = _COERCE[key](value)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# parsing


def _datatype(arr: np.ndarray) -> str:
    """The Triton datatype name of a numpy array (for messages)."""
    kind = arr.dtype.kind
    if kind in "OSU":
        return "BYTES"
    if kind == "b":
        return "BOOL"
    names = {"i": "INT", "u": "UINT", "f": "FP"}
    return f"{names.get(kind, arr.dtype.name)}{arr.dtype.itemsize * 8}" if kind in names else arr.dtype.name


def _single(name: str, value: Any) -> Any:
    arr = np.asarray(value)
    if arr.size != 1:
        raise RequestError(f"{name} must hold exactly one value (shape [1]), got shape {list(arr.shape)}")
    return arr


def _text(name: str, value: Any, limits: Limits, allow_empty: bool) -> str:
    arr = _single(name, value)
    if arr.dtype.kind not in "OSU":
        raise RequestError(f"{name} must be BYTES (a UTF-8 string), got {_datatype(arr)}")
    item = arr.reshape(-1)[0]
    if isinstance(item, (bytes, np.bytes_, str)) and len(item) > 4 * limits.max_prompt_chars:
        # refused before decoding: UTF-8 takes at most 4 bytes a character, so this many cannot fit
        raise RequestError(f"{name} must be at most {limits.max_prompt_chars} characters, got {len(item)} "
                           f"{'characters' if isinstance(item, str) else 'bytes'}")
    if isinstance(item, (bytes, np.bytes_)):
        try:
            text = bytes(item).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    elif isinstance(item, str):
        text = item
    else:
        raise RequestError(f"{name} must be BYTES (a UTF-8 string), got a {type(item).__name__}")
    if len(text) > limits.max_prompt_chars:
        raise RequestError(f"{name} must be at most {limits.max_prompt_chars} characters, got {len(text)}")
    if "\x00" in text:
        raise RequestError(f"{name} must not contain NUL characters")
    if not allow_empty and not text.strip():
        raise RequestError(f"{name} must not be empty")
    return text


def _int(name: str, value: Any) -> int:
    arr = _single(name, value)
    if arr.dtype.kind not in "iu":
        raise RequestError(f"{name} must be INT64, got {_datatype(arr)}")
    return int(arr.reshape(-1)[0])


def _float(name: str, value: Any) -> float:
    arr = _single(name, value)
    if arr.dtype.kind not in "fiu":
        raise RequestError(f"{name} must be FP32, got {_datatype(arr)}")
    return float(arr.reshape(-1)[0])


def _sampler(name: str, text: str) -> str:
    from easyanimate.schedulers import canonical_sampler  # lazy: diffusers is a heavy import for a pure module

    try:
        return canonical_sampler(text)
    except ValueError as exc:
        raise RequestError(f"{name}: {exc}") from None


def check_request(req: GenerationRequest, limits: Limits) -> GenerationRequest:
    """Range checks of a typed request (also run on a model's defaults at load time); returns it unchanged."""
    n, m, o = req.num_frames, limits.frame_multiple, limits.frame_offset
    if not (n == 1 or (n >= o + m and (n - o) % m == 0 and n <= limits.max_frames)):
        rule = f"{o} + {m}k" if o else f"a multiple of {m}"
        raise RequestError(f"NUM_FRAMES must be 1 or {rule} up to {limits.max_frames}, got {n}")
    for name, size in (("HEIGHT", req.height), ("WIDTH", req.width)):
        if size % limits.size_multiple or not limits.min_size <= size <= limits.max_size:
            raise RequestError(f"{name} must be a multiple of {limits.size_multiple} between {limits.min_size} and "
                               f"{limits.max_size}, got {size}")
    if not 1 <= req.steps <= limits.max_steps:
        raise RequestError(f"STEPS must be between 1 and {limits.max_steps}, got {req.steps}")
    if req.sampler == "PNDM" and req.steps < 4:
        raise RequestError(f"STEPS must be at least 4 with the PNDM sampler (its Runge-Kutta warm-up), got {req.steps}")
    if not (math.isfinite(req.guidance) and 0.0 <= req.guidance <= limits.max_guidance):
        raise RequestError(f"GUIDANCE must be a finite number between 0 and {limits.max_guidance:g}, "
                           f"got {req.guidance!r}")
    if not 0 <= req.seed <= MAX_SEED:
        raise RequestError(f"SEED must be between 0 and {MAX_SEED}, got {req.seed}")
    if not 1 <= req.fps <= limits.max_fps:
        raise RequestError(f"FPS must be between 1 and {limits.max_fps}, got {req.fps}")
    if not (math.isfinite(req.lora_alpha) and 0.0 <= req.lora_alpha <= limits.max_lora_alpha):
        raise RequestError(f"LORA_ALPHA must be a finite number between 0 and {limits.max_lora_alpha:g}, "
                           f"got {req.lora_alpha!r}")
    check_lora_name(req.lora)
    _accel("ACCEL", req.accel)
    return req


def check_lora_name(name: str) -> str:
    """A LORA value must be a plain file name ending in ``.safetensors`` (or empty): no folder, no ``..``, no
    absolute path, so a request can only pick among the files the server's LoRA folder holds."""
    if not name:
        return name
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_LORA_NAME_BYTES:
        raise RequestError(f"LORA must be a file name of at most {MAX_LORA_NAME_BYTES} bytes, got {size} bytes")
    bad = ("/" in name or "\\" in name or name in (".", "..") or name.startswith(".") or ":" in name
           or any(ord(c) < 32 or ord(c) == 127 for c in name) or name != name.strip())
    if bad:
        raise RequestError(f"LORA must be the name of a {LORA_SUFFIX} file in the server's LoRA folder, not a path: "
                           f"got {name!r}")
    if not name.endswith(LORA_SUFFIX):
        raise RequestError(f"LORA must name a {LORA_SUFFIX} file, got {name!r}")
    return name


def resolve_lora(name: str, lora_dir: str | os.PathLike | None) -> Path | None:
    """The file a (checked) LORA name means in the server's LoRA folder; None when no LoRA is asked.

    Raises ``RequestError`` when the server has no LoRA folder, the name is not a plain file name, or no such file
    is in the folder (symlinks that lead out of the folder are refused too)."""
    if not name:
        return None
    check_lora_name(name)
    if not lora_dir:
        raise RequestError(f"LORA {name!r}: this server has no LoRA folder (start it with --lora-dir)")
    folder = Path(lora_dir).resolve()
    try:
        path = (folder / name).resolve()
        found = path.parent == folder and path.is_file()
    except (OSError, RuntimeError):  # a name the file system cannot take, a symlink loop
        found = False
    if not found:  # neither the server's folder nor its listing goes back to the client
        raise RequestError(f"LORA {name!r} is not in the server's LoRA folder")
    return path


def parse_request(inputs: Mapping[str, Any], defaults: Mapping[str, Any] | None = None,
                  limits: Limits | None = None) -> GenerationRequest:
    """``{input name: array of one element}`` → a validated ``GenerationRequest``.

    Args:
        inputs: the request's inputs (numpy arrays; BYTES as object arrays of ``bytes``). Absent optional inputs
            take ``defaults``.
        defaults: full set of defaults under the request field names (``merge_defaults(...)``); None = V2's.
        limits: what the model accepts; None = ``Limits()`` (V2's ranges).

    Raises ``RequestError`` at the first violation: a missing PROMPT, an unknown input, a wrong datatype or shape,
    text that is not UTF-8 or too long, an unknown sampler, or a number out of range.
    """
    limits = limits or Limits()
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise RequestError(f"unknown input {unknown[0]!r}: expected some of {', '.join(INPUTS)}")
    for name in REQUIRED:
        if name not in inputs:
            raise RequestError(f"{name} is required")

    values = merge_defaults(defaults)
    values["sampler"] = _sampler("SAMPLER", str(values["sampler"]))  # a default spelled "dpm++" is fine too
    for name, (field, _dtype) in INPUTS.items():
        if name not in inputs:
            continue
        raw = inputs[name]
        if name in ("PROMPT", "NEGATIVE_PROMPT"):
            values[field] = _text(name, raw, limits, allow_empty=name == "NEGATIVE_PROMPT")
        elif name == "SAMPLER":
            values[field] = _sampler(name, _text(name, raw, limits, allow_empty=False))
        elif name == "LORA":
            values[field] = _text(name, raw, limits, allow_empty=True).strip()
        elif name == "ACCEL":
            values[field] = _accel(name, _text(name, raw, limits, allow_empty=False))
        elif name in ("GUIDANCE", "LORA_ALPHA"):
            values[field] = _float(name, raw)
        else:
            values[field] = _int(name, raw)
    req = GenerationRequest(**{f.name: _COERCE[f.name](values.get(f.name, f.default))
                               for f in fields(GenerationRequest)})
    return check_request(req, limits)


# ---------------------------------------------------------------------------------------------------------------------
# admission: a work budget per request and a deadline, so one request cannot take the whole service

CPU_BUDGET_FACTOR = 4  # CPU: a few times the served model's default request
GPU_BUDGET_SHAPE = (144, 768, 768)  # GPU: one 144-frame 768 x 768 request at the default steps, with CFG
DEFAULT_DEADLINE_S = {"cpu": 600.0, "cuda": 1800.0}


class OverBudget(RequestError):
    """A request whose cost (frames x height x width x steps, x2 with CFG) exceeds the deployment's work budget."""


@dataclass(frozen=True)
class Admission:
    """What one request may cost and how long it may run.

    Args:
        max_cost: the work budget in ``request_cost`` units (frames x height x width x steps, x2 with guidance > 1);
            a request above it is refused before any work.
        deadline_s: seconds a request may compute (from the start of its generation); past it, generation stops at
            the next denoising step and the request fails. The time waiting in Triton's queue is bounded apart, by
            the queue policy's timeout.
    """

    max_cost: int
    deadline_s: float

    def __post_init__(self):
        if self.max_cost < 1:
            raise ValueError(f"max_cost must be >= 1, got {self.max_cost}")
        if not (math.isfinite(self.deadline_s) and self.deadline_s > 0):
            raise ValueError(f"deadline_s must be a positive number of seconds, got {self.deadline_s!r}")


def request_cost(num_frames: int, height: int, width: int, steps: int, guidance: float) -> int:
    """Work units of one request: frames x height x width x steps, x2 when guidance > 1 (classifier-free guidance
    runs the transformer on a doubled batch, as the pipeline does)."""
    return int(num_frames) * int(height) * int(width) * int(steps) * (2 if guidance > 1.0 else 1)


def _cost_of(req: GenerationRequest | Mapping[str, Any]) -> int:
    get = (lambda k: getattr(req, k)) if isinstance(req, GenerationRequest) else req.__getitem__
    return request_cost(get("num_frames"), get("height"), get("width"), get("steps"), get("guidance"))


def default_admission(defaults: Mapping[str, Any], device: str = "cpu", max_cost: int | None = None,
                      deadline_s: float | None = None) -> Admission:
    """The admission of a deployment: explicit values (``serve --max-cost/--deadline``) first, then the registered
    version's defaults (keys ``max_cost`` / ``deadline_s`` next to its generate defaults), then the hardware's:
    CPU ``CPU_BUDGET_FACTOR`` x the default request's cost, GPU at least one ``GPU_BUDGET_SHAPE`` request at the
    default steps with CFG; deadline ``DEFAULT_DEADLINE_S`` of the device kind."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    resolved = merge_defaults(defaults)
    if not max_cost:
        max_cost = int(defaults.get("max_cost") or 0) or None
    if not max_cost:
        max_cost = CPU_BUDGET_FACTOR * _cost_of(resolved)
        if kind == "cuda":
            frames, height, width = GPU_BUDGET_SHAPE
            max_cost = max(max_cost, request_cost(frames, height, width, resolved["steps"], 2.0))
    if not deadline_s:
        deadline_s = float(defaults.get("deadline_s") or 0) or DEFAULT_DEADLINE_S[kind]
    return Admission(max_cost=int(max_cost), deadline_s=float(deadline_s))


def check_budget(req: GenerationRequest | Mapping[str, Any], admission: Admission) -> int:
    """The request's cost, or ``OverBudget`` naming the cost, how it was counted and the budget."""
    get = (lambda k: getattr(req, k)) if isinstance(req, GenerationRequest) else req.__getitem__
    cost = _cost_of(req)
    if cost > admission.max_cost:
        cfg = " x 2 (CFG, GUIDANCE > 1)" if get("guidance") > 1.0 else ""
        raise OverBudget(
            f"request cost {cost:,} ({get('num_frames')} frames x {get('height')} x {get('width')} x "
            f"{get('steps')} steps{cfg}) exceeds this server's work budget of {admission.max_cost:,}: lower "
            f"NUM_FRAMES, HEIGHT, WIDTH or STEPS")
    return cost


COST_INPUTS = {"NUM_FRAMES": "num_frames", "HEIGHT": "height", "WIDTH": "width", "STEPS": "steps",
               "GUIDANCE": "guidance"}


def check_budget_early(values: Mapping[str, float], defaults: Mapping[str, Any], max_cost: int) -> int:
    """The budget check before a request is queued (the front, from what the model published): ``values`` are the
    cost inputs a request gave (``COST_INPUTS`` names → number), the rest come from the model's ``defaults``."""
    merged = {field: values.get(name, defaults.get(field)) for name, field in COST_INPUTS.items()}
    if any(v is None or not math.isfinite(float(v)) for v in merged.values()):
        return 0  # the model's own checks answer this one
    return check_budget(merged, Admission(max_cost=int(max_cost), deadline_s=1.0))


def cost_inputs_http(header: Mapping[str, Any], binary: bytes | None) -> dict[str, float]:
    """The cost inputs of a checked KServe v2 HTTP infer request (JSON ``data`` or binary tensors in order)."""
    out, offset = {}, 0
    for tensor in header.get("inputs") or []:
        size = int(((tensor.get("parameters") or {}).get("binary_data_size")) or 0)
        name = tensor.get("name")
        if size:
            if name in COST_INPUTS and binary is not None:
                dtype = np.float32 if tensor.get("datatype") == "FP32" else np.int64
                out[name] = float(np.frombuffer(binary[offset:offset + size], dtype=dtype)[0])
            offset += size
        elif name in COST_INPUTS and tensor.get("data"):
            data = tensor["data"]
            while isinstance(data, list):
                data = data[0]
            out[name] = float(data)
    return out


def cost_inputs_grpc(request) -> dict[str, float]:
    """The cost inputs of a checked ``ModelInferRequest`` (typed contents or ``raw_input_contents``)."""
    out = {}
    raw = list(request.raw_input_contents)
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in COST_INPUTS:
            continue
        fp = tensor.datatype == "FP32"
        if raw:
            out[tensor.name] = float(np.frombuffer(raw[i], dtype=np.float32 if fp else np.int64)[0])
        else:
            values = tensor.contents.fp32_contents if fp else tensor.contents.int64_contents
            if values:
                out[tensor.name] = float(values[0])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the client side of the schema


def to_inputs(prompt: str, model: str | None = None, **params: Any) -> dict[str, np.ndarray]:
    """Request fields → ``{input name: numpy array of shape [1]}`` with the schema's datatypes (None = omitted, so
    the server's default applies). Field names as in ``GenerationRequest``; ``model`` is sent as ``MODEL`` (which
    of the server's allowed models answers; None = its default)."""
    out = {"PROMPT": np.array([prompt.encode("utf-8")], dtype=object)}
    if model is not None:
        out[MODEL_INPUT] = np.array([str(model).encode("utf-8")], dtype=object)
    for field, value in params.items():
        if field not in _FIELD_TO_INPUT or field == "prompt":
            raise TypeError(f"unknown request field {field!r}: expected some of {list(_FIELD_TO_INPUT)}")
        if value is None:
            continue
        name = _FIELD_TO_INPUT[field]
        dtype = INPUTS[name][1]
        if dtype == "BYTES":
            out[name] = np.array([str(value).encode("utf-8")], dtype=object)
        elif dtype == "FP32":
            out[name] = np.array([value], dtype=np.float32)
        else:
            out[name] = np.array([value], dtype=np.int64)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# MODEL: which of the server's allowed model sources answers (``easyanimate serve --allow-models``)

MODEL_INPUT = "MODEL"
MAX_MODEL_CHARS = 512
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[A-Za-z0-9_.-]+)|/(?P<version>[1-9][0-9]*))/?$")
_SHORT_VERSION = re.compile(r"^[1-9][0-9]*$")
_SHORT_ALIAS = re.compile(r"^@?[A-Za-z_][A-Za-z0-9_.-]*$")


def parse_model_choice(value: str) -> str:
    """Check a MODEL value for form (the client side of ``--model-version``) → it, stripped: a registry version
    number (``3``), an alias (``champion`` or ``@champion``), a full ``models:/NAME/VERSION`` /
    ``models:/NAME@ALIAS`` URI, or ``tiny``. Whether the server allows it is the server's answer."""
    text = str(value).strip()
    if len(text) > MAX_MODEL_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise RequestError(f"MODEL must be a version number, an alias or a models:/ URI of at most "
                           f"{MAX_MODEL_CHARS} printable characters, got {text[:40]!r}")
    if _SHORT_VERSION.match(text) or _MODELS_URI.match(text) or (_SHORT_ALIAS.match(text) and "/" not in text):
        return text
    raise RequestError("MODEL must be a version number (3), an alias (champion) or models:/NAME/VERSION | "
                       f"models:/NAME@ALIAS, got {text[:80]!r}")


def model_names(source: str) -> set[str]:
    """The MODEL values that name an allowed ``source``: the source as written; for ``models:/NAME/VERSION`` also
    ``VERSION`` and ``NAME/VERSION``; for ``models:/NAME@ALIAS`` also ``ALIAS``, ``@ALIAS`` and ``NAME@ALIAS``; for a
    pipeline folder also its folder name (requests never carry server paths)."""
    source = str(source).strip()
    out = {source} if source else set()
    m = _MODELS_URI.match(source)
    if m and m["version"]:
        out |= {m["version"], f"{m['name']}/{m['version']}"}
    elif m and m["alias"]:
        out |= {m["alias"], f"@{m['alias']}", f"{m['name']}@{m['alias']}"}
    elif source.startswith("/"):
        out.add(Path(source).name)
    return out


def bytes_input_http(header: Mapping[str, Any], binary: bytes | None, name: str) -> str | None:
    """The first element of BYTES input ``name`` of a checked KServe v2 HTTP infer request (JSON ``data`` or a
    binary tensor: a 4-byte little-endian length, then the bytes), decoded as UTF-8 (None when absent)."""
    offset = 0
    for tensor in header.get("inputs") or []:
        size = int(((tensor.get("parameters") or {}).get("binary_data_size")) or 0)
        if tensor.get("name") == name:
            if size:
                if binary is None or size < 4:
                    return None
                (n,) = np.frombuffer(binary[offset:offset + 4], dtype="<u4")
                return bytes(binary[offset + 4:offset + 4 + int(n)]).decode("utf-8", "replace")
            data = tensor.get("data")
            while isinstance(data, list) and data:
                data = data[0]
            return str(data) if isinstance(data, str) else None
        offset += size
    return None


def bytes_input_grpc(request, name: str) -> str | None:
    """The first element of BYTES input ``name`` of a checked ``ModelInferRequest`` (None when absent)."""
    raw = list(request.raw_input_contents)
    for i, tensor in enumerate(request.inputs):
        if tensor.name != name:
            continue
        if raw:
            blob = raw[i]
            if len(blob) < 4:
                return None
            n = int(np.frombuffer(blob[:4], dtype="<u4")[0])
            return bytes(blob[4:4 + n]).decode("utf-8", "replace")
        values = tensor.contents.bytes_contents
        return bytes(values[0]).decode("utf-8", "replace") if values else None
    return None


def numpy_dtype(datatype: str):
    """Numpy dtype for a Triton datatype name of this schema."""
    return {"BYTES": np.object_, "INT64": np.int64, "FP32": np.float32}[datatype]


__all__ = ["Admission", "COST_INPUTS", "MODEL_INPUT", "bytes_input_grpc", "bytes_input_http", "model_names",
           "parse_model_choice", "DEFAULT_LORA_ALPHA", "GenerationRequest", "INPUTS", "Limits", "MAX_SEED",
           "OUTPUTS", "OverBudget", "REQUIRED", "RequestError", "STREAM_OUTPUTS", "check_budget", "check_budget_early",
           "check_lora_name", "check_request", "cost_inputs_grpc", "cost_inputs_http", "default_admission",
           "merge_defaults", "numpy_dtype", "parse_request", "request_cost", "resolve_lora", "to_inputs", "v2_defaults"]


def cancel_marker(cancel_dir: str | os.PathLike, request_id: str) -> Path:
    """The file whose existence tells the model to stop the request ``request_id`` at its next denoising step.

    Triton 2.51 does not cancel an HTTP request whose client hangs up (gRPC cancellation works), so the validating
    front (``serving/front.py``) gives each HTTP inference an id, and when its client disconnects it creates this
    file; the model checks it at every step. The name is a hash: request ids are client-influenced text."""
    import hashlib

    return Path(cancel_dir) / hashlib.sha256(request_id.encode("utf-8", "replace")).hexdigest()[:32]


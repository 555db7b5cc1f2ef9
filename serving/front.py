"""The public face of the endpoint: a thin validating front (KServe v2 HTTP + gRPC) before a loopback ``tritonserver``.

Why it exists: the bundled ``tritonserver`` 2.51 (nvidia-pytriton 0.7.0, the newest on the package index) trusts the
declared ``shape`` of an HTTP/JSON input and allocates for it before checking it against the model configuration: one
~150-byte request declaring ``"shape": [4294967296]`` aborts the whole server (``std::bad_alloc``, signal 6). It has
no option that stops this (no ``--http-max-input-size`` in 2.51; ``--http-restricted-api`` only gates whole API
groups). So the front checks every request against the models' ``config.pbtxt`` and fixed limits *before anything is
allocated for it*, and only then forwards it to Triton on loopback.

Which layer stops what:

- the front, HTTP (aiohttp): request line/header sizes (8 KiB a line, 128 headers → 400), body length (``Limits.
  max_body_bytes``, checked on Content-Length and while reading, → 413), body read timeout (→ 408), compressed
  bodies (→ 415: no decompression bombs), routes (only health, metadata, model config/ready and infer are public;
  model repository, shared memory, trace, logging, statistics → 403), models (only the served ones → 404);
- the front, gRPC (grpcio): message size (``max_grpc_message_bytes`` → RESOURCE_EXHAUSTED), metadata size
  (16 KiB), concurrent calls (``max_concurrent`` → RESOURCE_EXHAUSTED), methods (the same public set; the rest are
  UNIMPLEMENTED);
- the front, both protocols (``check_http_infer`` / ``check_grpc_infer``): JSON syntax, duplicate JSON keys (two
  parsers may pick different ones), unknown or duplicated inputs/outputs, datatypes, declared shapes against the
  configured dims, element counts, binary-extension sizes (``binary_data_size``, ``Inference-Header-Content-Length``,
  the 4-byte length prefixes of BYTES elements), value types and ranges, shared-memory and classification
  parameters (→ 400 / INVALID_ARGUMENT). What Triton receives is re-serialized from what was checked (no parser
  differential);
- Triton: the same schema checks again (defence in depth) and the queue; the model (``serving/request.py``): value
  ranges (NUM_FRAMES, STEPS, prompt length, …) with their own messages;
- the supervisor (``serving/supervisor.py``): whatever still kills tritonserver (a bug we did not find, the OOM
  killer) → restart with back-off, logged with its cause.

Several models (``serve --allow-models``): the ``MODEL`` input of a checked request is routed by the launcher
(``Front.route``) to the Triton model of that allowed source, loaded on demand (a MODEL that is not allowed: 400 /
INVALID_ARGUMENT naming the allowed values); health and metadata calls of a public model go to a loaded one; the
model config (restricted on Triton: it holds server paths) is answered here as a public view whose ``parameters``
list the allowed and loaded models and their generate defaults (``TritonServer.catalog``).

Every refusal is counted by reason in ``Front.refused`` (the fuzzer reads it) and answered in KServe's error shape
(``{"error": "..."}``); the message names the input and what was expected and what came.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .launch import local_host

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
_ITEMSIZE = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2, "INT32": 4,
             "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8}
_INT_RANGE = {"INT8": 8, "INT16": 16, "INT32": 32, "INT64": 64}
_UINT_RANGE = {"UINT8": 8, "UINT16": 16, "UINT32": 32, "UINT64": 64}
_GRPC_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents", "BYTES": "bytes_contents"}
# request-level parameters a client may set (Triton's own); anything else, shared memory above all, is refused
_REQUEST_PARAMETERS = {"binary_data_output": bool, "timeout": int, "priority": int}
_GRPC_REQUEST_PARAMETERS = {"timeout": int, "priority": int, "triton_enable_empty_final_response": bool}
_INPUT_PARAMETERS = {"binary_data_size": int}
_OUTPUT_PARAMETERS = {"binary_data": bool}
_ABSENT = object()  # a field not given (``null`` is a value, and refused: tritonserver answers it with a 500)


# ---------------------------------------------------------------------------------------------------------------------
# what the models accept


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe name: BYTES, INT64, FP32, …
    dims: tuple[int, ...]  # -1 = any size
    optional: bool = False


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    max_batch_size: int = 0
    decoupled: bool = False


def _kserve_datatype(data_type: str) -> str:
    name = data_type.removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def parse_model_config(text: str) -> ModelSpec:
    """A ``config.pbtxt`` text → ``ModelSpec`` (Triton's own protobuf schema, so a typo fails here, loudly)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    dtype = model_config_pb2.DataType.Name

    def tensors(items) -> dict[str, TensorSpec]:
        batch = (-1,) if config.max_batch_size > 0 else ()
        return {t.name: TensorSpec(t.name, _kserve_datatype(dtype(t.data_type)), batch + tuple(t.dims),
                                   getattr(t, "optional", False)) for t in items}

    return ModelSpec(config.name, tensors(config.input), tensors(config.output), config.max_batch_size,
                     config.model_transaction_policy.decoupled)


def load_specs(repository: str | Path, models: Iterable[str]) -> dict[str, ModelSpec]:
    """The served models' specs from ``<repository>/<model>/config.pbtxt``."""
    specs = {}
    for name in models:
        path = Path(repository) / name / "config.pbtxt"
        if not path.is_file():
            raise FileNotFoundError(f"no model {name!r} in {repository} (expected {path})")
        specs[name] = parse_model_config(path.read_text())
    return specs


@dataclass(frozen=True)
class Limits:
    """Fixed bounds of the public endpoint (what no legitimate request comes near; all checked before reading on)."""

    max_body_bytes: int = 1 << 20  # an HTTP infer body (a 2000-character prompt is 2 KB)
    max_grpc_message_bytes: int = 1 << 20  # one gRPC request message
    max_grpc_metadata_bytes: int = 16 << 10
    max_elements: int = 64  # per input, after the configured dims (ours are [1])
    max_id_chars: int = 256
    max_concurrent: int = 64  # infer calls in flight through the front (HTTP and gRPC each): more → 503 / EXHAUSTED
    body_timeout_s: float = 30.0  # to receive a whole HTTP body (slow senders)


class Refused(Exception):
    """A request the front refuses: ``reason`` (a short key, counted), ``message`` (for the client), HTTP status."""

    def __init__(self, reason: str, message: str, status: int = 400):
        super().__init__(message)
        self.reason, self.message, self.status = reason, message, status

    @property
    def grpc_code(self):
        import grpc

        return {400: grpc.StatusCode.INVALID_ARGUMENT, 403: grpc.StatusCode.PERMISSION_DENIED,
                404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                503: grpc.StatusCode.UNAVAILABLE}.get(self.status, grpc.StatusCode.INVALID_ARGUMENT)


# ---------------------------------------------------------------------------------------------------------------------
# pure checks


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Refused("json", f"duplicate key {key!r} in the request JSON")
        out[key] = value
    return out


def _parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused("encoding", f"the request JSON is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except Refused:
        raise
    except RecursionError:
        raise Refused("json", "the request JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and over-long integer literals
        raise Refused("json", f"the request body is not valid JSON: {exc}") from None


def _no_constant(name: str) -> Any:
    raise Refused("json", f"{name} is not valid JSON")


def _model(specs: Mapping[str, ModelSpec], model: str, version: str) -> ModelSpec:
    spec = specs.get(model)
    if spec is None:
        raise Refused("model", f"unknown model {model[:64]!r}: this endpoint serves {', '.join(sorted(specs))}", 404)
    if version not in ("", "1"):
        raise Refused("model", f"unknown version {version[:32]!r} of model {model!r}: the served version is 1", 404)
    return spec


def _shape(spec: TensorSpec, shape: Any, limits: Limits) -> int:
    """Check a declared shape against the configured dims → the element count."""
    if not isinstance(shape, list | tuple) or not all(type(d) is int for d in shape):
        raise Refused("shape", f"input {spec.name!r}: shape must be a list of integers, got {_short(shape)}")
    expected = list(spec.dims)
    if len(shape) != len(expected) or any(e != -1 and d != e for d, e in zip(shape, expected, strict=True)):
        raise Refused("shape", f"input {spec.name!r}: shape must be {expected}, got {_short(list(shape))}")
    if any(d < 0 for d in shape):
        raise Refused("shape", f"input {spec.name!r}: negative dimension in shape {_short(list(shape))}")
    count = 1
    for d in shape:
        count *= d
        if count > limits.max_elements:
            raise Refused("shape", f"input {spec.name!r}: shape {_short(list(shape))} has more than "
                          f"{limits.max_elements} elements")
    return count


def _short(value: Any, n: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, bytes | bytearray) else repr(bytes(value[:n]))
    return text if len(text) <= n else text[:n] + "…"


def _flatten(data: Any, depth: int = 0) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if depth > 8:
        raise Refused("data", "data is nested too deeply")
    out = []
    for item in data:
        out.extend(_flatten(item, depth + 1) if isinstance(item, list) else [item])
    return out


def _check_value(spec: TensorSpec, value: Any) -> None:
    dt = spec.datatype
    ok = True
    if dt == "BYTES":
        ok = isinstance(value, str)
    elif dt == "BOOL":
        ok = isinstance(value, bool)
    elif dt in _INT_RANGE:
        bits = _INT_RANGE[dt]
        ok = type(value) is int and -(1 << (bits - 1)) <= value < (1 << (bits - 1))
    elif dt in _UINT_RANGE:
        ok = type(value) is int and 0 <= value < (1 << _UINT_RANGE[dt])
    elif dt in ("FP16", "BF16", "FP32", "FP64"):
        ok = type(value) in (int, float) and (type(value) is float or abs(value) < 1 << 64)
    if not ok:
        raise Refused("data", f"input {spec.name!r} ({dt}): element {_short(value, 40)} is not a {dt} value")


def _check_bytes_elements(spec: TensorSpec, raw: bytes, count: int) -> None:
    """BYTES tensors in binary form: ``count`` elements, each a 4-byte little-endian length and that many bytes."""
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise Refused("binary", f"input {spec.name!r}: BYTES element {i} of {count} is truncated "
                          f"({len(raw)} bytes in all)")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if n > len(raw) - pos:
            raise Refused("binary", f"input {spec.name!r}: BYTES element {i} declares {n} bytes, "
                          f"{len(raw) - pos} are left")
        pos += n
    if pos != len(raw):
        raise Refused("binary", f"input {spec.name!r}: {len(raw) - pos} bytes after its {count} BYTES elements")


def _check_raw(spec: TensorSpec, raw: bytes, count: int) -> None:
    if spec.datatype == "BYTES":
        _check_bytes_elements(spec, raw, count)
    elif len(raw) != count * _ITEMSIZE[spec.datatype]:
        raise Refused("binary", f"input {spec.name!r}: {count} {spec.datatype} elements are "
                      f"{count * _ITEMSIZE[spec.datatype]} bytes, got {len(raw)}")


def _check_parameters(where: str, params: Any, allowed: Mapping[str, type]) -> dict[str, Any]:
    if params is _ABSENT:
        return {}
    if not isinstance(params, dict):
        raise Refused("parameters", f"{where}: parameters must be an object, got {_short(params)}")
    for key, value in params.items():
        kind = allowed.get(key)
        if kind is None:
            why = "shared memory is not available on this endpoint" if "shared_memory" in key else \
                "allowed: " + (", ".join(sorted(allowed)) or "none")
            raise Refused("parameters", f"{where}: parameter {key[:64]!r} is not accepted ({why})")
        if type(value) is not kind or (kind is int and not 0 <= value < 1 << 63):
            raise Refused("parameters", f"{where}: parameter {key!r} must be a {kind.__name__}, got {_short(value)}")
    return params


def check_http_infer(specs: Mapping[str, ModelSpec], model: str, version: str, body: bytes,
                     header_length: str | None, limits: Limits = Limits()) -> tuple[bytes, bytes | None]:
    """Check an HTTP infer body (JSON, or JSON + binary tensors) → (JSON header to forward, binary part or None).

    The header forwarded is re-serialized from the checked one; raises ``Refused`` with the reason."""
    spec = _model(specs, model, version)
    if spec.decoupled:
        raise Refused("model", f"model {model!r} streams its responses: call it over gRPC (ModelStreamInfer)")
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.isdigit() or len(header_length) > 12 or int(header_length) > len(body):
            raise Refused("binary", f"Inference-Header-Content-Length must be a byte count within the "
                          f"{len(body)}-byte body, got {header_length[:32]!r}")
        n = int(header_length)
        header, binary = body[:n], body[n:]
    request = _parse_json(header)
    if not isinstance(request, dict):
        raise Refused("json", f"the request must be a JSON object, got {type(request).__name__}")
    unknown = set(request) - {"id", "parameters", "inputs", "outputs"}
    if unknown:
        raise Refused("json", f"unknown request field(s) {sorted(unknown)[:4]}: expected id, parameters, inputs, "
                      "outputs")
    if "id" in request and (not isinstance(request["id"], str) or len(request["id"]) > limits.max_id_chars):
        raise Refused("json", f"id must be a string of at most {limits.max_id_chars} characters")
    _check_parameters("request", request.get("parameters", _ABSENT), _REQUEST_PARAMETERS)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise Refused("inputs", "inputs must be a non-empty list")
    seen: set[str] = set()
    offset = 0
    for item in inputs:
        if not isinstance(item, dict):
            raise Refused("inputs", f"each input must be an object, got {_short(item)}")
        extra = set(item) - {"name", "shape", "datatype", "parameters", "data"}
        if extra:
            raise Refused("inputs", f"unknown input field(s) {sorted(extra)[:4]}")
        ispec = _input_spec(spec, item.get("name"), seen)
        if item.get("datatype") != ispec.datatype:
            raise Refused("datatype", f"input {ispec.name!r}: datatype must be {ispec.datatype}, got "
                          f"{_short(item.get('datatype'))}")
        count = _shape(ispec, item.get("shape"), limits)
        params = _check_parameters(f"input {ispec.name!r}", item.get("parameters", _ABSENT), _INPUT_PARAMETERS)
        if "binary_data_size" in params:
            if "data" in item:
                raise Refused("binary", f"input {ispec.name!r}: both data and binary_data_size given")
            size = params["binary_data_size"]
            if size > len(binary) - offset:
                raise Refused("binary", f"input {ispec.name!r}: binary_data_size {size} but only "
                              f"{len(binary) - offset} binary bytes are left in the body")
            _check_raw(ispec, binary[offset:offset + size], count)
            offset += size
        else:
            if "data" not in item:
                raise Refused("data", f"input {ispec.name!r}: no data (and no binary_data_size)")
            if not isinstance(item["data"], list):
                raise Refused("data", f"input {ispec.name!r}: data must be a list, got {_short(item['data'])}")
            values = _flatten(item["data"])
            if len(values) != count:
                raise Refused("data", f"input {ispec.name!r}: shape {item['shape']} holds {count} element(s), "
                              f"data has {len(values)}")
            for value in values:
                _check_value(ispec, value)
    if offset != len(binary):
        raise Refused("binary", f"the body has {len(binary) - offset} binary bytes that no input claims")
    _required(spec, seen)
    _check_outputs(spec, request.get("outputs", _ABSENT))
    return json.dumps(request, separators=(",", ":")).encode(), (binary if header_length is not None else None)


def _input_spec(spec: ModelSpec, name: Any, seen: set[str]) -> TensorSpec:
    if not isinstance(name, str):
        raise Refused("inputs", f"input name must be a string, got {_short(name)}")
    ispec = spec.inputs.get(name)
    if ispec is None:
        raise Refused("unknown_input", f"unexpected input {name[:64]!r} for model {spec.name!r}: expected one of "
                      f"{', '.join(spec.inputs)}")
    if name in seen:
        raise Refused("duplicate_input", f"input {name!r} is given twice")
    seen.add(name)
    return ispec


def _required(spec: ModelSpec, seen: set[str]) -> None:
    missing = [n for n, s in spec.inputs.items() if not s.optional and n not in seen]
    if missing:
        raise Refused("missing_input", f"model {spec.name!r} needs input(s) {', '.join(missing)}")


def _check_outputs(spec: ModelSpec, outputs: Any) -> None:
    if outputs is _ABSENT:
        return
    if not isinstance(outputs, list):
        raise Refused("outputs", f"outputs must be a list, got {_short(outputs)}")
    seen = set()
    for item in outputs:
        if not isinstance(item, dict) or set(item) - {"name", "parameters"}:
            raise Refused("outputs", f"each output must be {{name, parameters}}, got {_short(item)}")
        name = item.get("name")
        if not isinstance(name, str) or name not in spec.outputs:
            raise Refused("outputs", f"unexpected output {_short(name)}: model {spec.name!r} has "
                          f"{', '.join(spec.outputs)}")
        if name in seen:
            raise Refused("outputs", f"output {name!r} is asked twice")
        seen.add(name)
        _check_parameters(f"output {name!r}", item.get("parameters", _ABSENT), _OUTPUT_PARAMETERS)


def _grpc_parameters(where: str, params, allowed: Mapping[str, type]) -> None:
    plain = {}
    for key, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        plain[key] = {"bool_param": bool, "int64_param": int, "uint64_param": int}.get(kind, str)(
            getattr(value, kind)) if kind else None
    _check_parameters(where, plain, allowed)


def _with_request_id(header: bytes) -> tuple[bytes, str]:
    """Give a checked HTTP inference header an id the front can cancel it by: the client's id (if any) plus a
    random suffix, so two clients using the same id cannot cancel each other's requests. Triton echoes it back."""
    import uuid

    body = json.loads(header)
    request_id = f"{body.get('id') or 'front'}~{uuid.uuid4().hex[:12]}"
    body["id"] = request_id
    return json.dumps(body, separators=(",", ":")).encode(), request_id


def check_grpc_infer(specs: Mapping[str, ModelSpec], raw: bytes, stream: bool = False,
                     limits: Limits = Limits()) -> bytes:
    """Check a serialized ``ModelInferRequest`` → the bytes to forward (re-serialized without unknown fields)."""
    from google.protobuf.message import DecodeError
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest()
    try:
        request.ParseFromString(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise Refused("protobuf", f"not a ModelInferRequest: {exc}") from None
    spec = _model(specs, request.model_name, request.model_version)
    if spec.decoupled != stream:
        raise Refused("model", f"model {spec.name!r} " + ("streams its responses: call ModelStreamInfer"
                                                          if spec.decoupled else "answers once: call ModelInfer"))
    if len(request.id) > limits.max_id_chars:
        raise Refused("inputs", f"id must be at most {limits.max_id_chars} characters")
    _grpc_parameters("request", request.parameters, _GRPC_REQUEST_PARAMETERS)
    if not request.inputs:
        raise Refused("inputs", "no inputs")
    raw_contents = list(request.raw_input_contents)
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise Refused("binary", f"{len(raw_contents)} raw_input_contents for {len(request.inputs)} inputs")
    seen: set[str] = set()
    for i, tensor in enumerate(request.inputs):
        ispec = _input_spec(spec, tensor.name, seen)
        if tensor.datatype != ispec.datatype:
            raise Refused("datatype", f"input {ispec.name!r}: datatype must be {ispec.datatype}, got "
                          f"{_short(tensor.datatype)}")
        count = _shape(ispec, list(tensor.shape), limits)
        _grpc_parameters(f"input {ispec.name!r}", tensor.parameters, {})
        filled = [f.name for f, _v in tensor.contents.ListFields()]
        if raw_contents:
            if filled:
                raise Refused("binary", f"input {ispec.name!r}: both contents and raw_input_contents given")
            _check_raw(ispec, raw_contents[i], count)
            continue
        field_name = _GRPC_CONTENTS.get(ispec.datatype)
        if field_name is None or set(filled) - {field_name}:
            raise Refused("data", f"input {ispec.name!r}: contents must be in {field_name}, got {filled}")
        values = getattr(tensor.contents, field_name)
        if len(values) != count:
            raise Refused("data", f"input {ispec.name!r}: shape {list(tensor.shape)} holds {count} element(s), "
                          f"contents have {len(values)}")
        if field_name in ("int_contents", "uint_contents"):
            for value in values:
                _check_value(ispec, int(value))
    _required(spec, seen)
    names = set()
    for out in request.outputs:
        if out.name not in spec.outputs or out.name in names:
            raise Refused("outputs", f"unexpected or repeated output {_short(out.name)}: model {spec.name!r} has "
                          f"{', '.join(spec.outputs)}")
        names.add(out.name)
        _grpc_parameters(f"output {out.name!r}", out.parameters, {})
    request.DiscardUnknownFields()
    return request.SerializeToString()


def public_config(text: str, parameters: Mapping[str, str]):
    """A model's public ``ModelConfig`` (protobuf): its repository config.pbtxt with ``parameters`` replaced by
    ``parameters`` (the launcher's catalog: allowed/loaded models, defaults; never server paths)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    config.ClearField("parameters")
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    return config


# ---------------------------------------------------------------------------------------------------------------------
# the servers


@dataclass
class Upstream:
    """Where Triton listens now (loopback); ``None`` in ``Front.upstream`` while it restarts."""

    http_url: str
    grpc_url: str
    metrics_url: str | None = None
    cancel_dir: str | None = None  # where a hung-up HTTP request is marked (serving.request.cancel_marker)


@dataclass
class FrontStats:
    refused: Counter = field(default_factory=Counter)  # reason → count
    forwarded: int = 0
    cancelled: int = 0  # HTTP requests whose client hung up, marked for the model to stop
    lock: threading.Lock = field(default_factory=threading.Lock)

    def refuse(self, reason: str) -> None:
        with self.lock:
            self.refused[reason] += 1

    def count(self, what: str) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)


_PUBLIC_GET = [r"/v2", r"/v2/health/live", r"/v2/health/ready", r"/v2/models/(?P<model>[^/]+)",
               r"/v2/models/(?P<model>[^/]+)/versions/(?P<version>[^/]+)", r"/v2/models/(?P<model>[^/]+)/ready",
               r"/v2/models/(?P<model>[^/]+)/versions/(?P<version>[^/]+)/ready",
               r"/v2/models/(?P<model>[^/]+)/config", r"/v2/models/(?P<model>[^/]+)/versions/(?P<version>[^/]+)/config"]
_PUBLIC_GET = [re.compile(p + "/?$") for p in _PUBLIC_GET]
_INFER = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer/?$")
_GRPC_FORWARD_UNARY = ("ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig")


class Front:
    """The validating front: HTTP on ``http_port``, gRPC on ``grpc_port``, Triton's /metrics on ``metrics_port``.

    ``upstream`` is read per request (the supervisor swaps it on restart; ``None`` → 503 / UNAVAILABLE "restarting").
    ``live`` answers /v2/health/live and ServerLive (the supervisor: False once it gave up restarting).
    """

    def __init__(self, specs: Mapping[str, ModelSpec], *, host: str = "127.0.0.1", http_port: int = 0,
                 grpc_port: int = 0, metrics_port: int | None = 0, limits: Limits = Limits(),
                 live: Callable[[], bool] = lambda: True, status: Callable[[], str] = lambda: "restarting"):
        self.specs = dict(specs)
        self.host = host
        self.limits = limits
        self._ports = (http_port, grpc_port, metrics_port)
        self.http_port = self.grpc_port = self.metrics_port = None
        self.live = live
        self.status = status
        self.stats = FrontStats()
        self._upstream: Upstream | None = None
        # admit(model, cost inputs) raises ValueError for a request over the served model's work budget (the
        # launcher's TritonServer.admit): refused here, before it waits in Triton's queue behind long requests
        self.admit: Callable[[str, Mapping[str, float]], None] | None = None
        # several allowed models (the launcher's TritonServer): route(public model, MODEL value) → a lease on the
        # Triton model that answers (loaded on demand; ValueError: not allowed), upstream_name(public) → the Triton
        # model health/metadata calls go to, catalog() → the public model config parameters (allowed, loaded, …)
        self.route: Callable[[str, str | None], Any] | None = None
        self.upstream_name: Callable[[str], str] | None = None
        self.catalog: Callable[[], Mapping[str, str]] | None = None
        self.configs: dict[str, str] = {}  # public model → its repository config.pbtxt text (the public config)
        self._channel = None
        self._channel_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None
        self._session = None
        self._grpc_server = None
        self._http_slots: asyncio.Semaphore | None = None
        self._grpc_slots = threading.BoundedSemaphore(limits.max_concurrent)

    # -- upstream -----------------------------------------------------------------------------------------------------

    @property
    def upstream(self) -> Upstream | None:
        return self._upstream

    def set_upstream(self, upstream: Upstream | None) -> None:
        import grpc

        with self._channel_lock:
            old, self._channel = self._channel, None
            self._upstream = upstream
            if upstream is not None:
                self._channel = grpc.insecure_channel(upstream.grpc_url, options=[
                    ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        if old is not None:
            old.close()

    # -- addresses ------------------------------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"http://{local_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{local_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str | None:
        return f"http://{local_host(self.host)}:{self.metrics_port}/metrics" if self.metrics_port else None

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> Front:
        self._start_grpc()
        started = threading.Event()
        errors: list[BaseException] = []

        def run():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start_http())
            except BaseException as exc:
                errors.append(exc)
                started.set()
                return
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._stop_http())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="front-http", daemon=True)
        self._thread.start()
        started.wait(30)
        if errors:
            self.stop()
            raise errors[0]
        logger.info("front: http %s grpc %s", self.http_url, self.grpc_url)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._thread = None
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=1).wait(5)  # in-flight calls are cancelled, and so upstream
            self._grpc_server = None
        self.set_upstream(None)

    def __enter__(self) -> Front:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP -----------------------------------------------------------------------------------------------------

    async def _start_http(self) -> None:
        import aiohttp
        from aiohttp import web

        app = web.Application(client_max_size=self.limits.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._http)
        # handler_cancellation: a client that hangs up cancels the forwarded request too
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, logger=_HTTP_LOG,
                                     max_line_size=8190,
                                     max_field_size=8190, max_headers=128, auto_decompress=False,
                                     keepalive_timeout=75, shutdown_timeout=1.0)
        await self._runner.setup()
        http_port, _grpc, metrics_port = self._ports
        site = web.TCPSite(self._runner, self.host, http_port, reuse_address=True)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]
        if metrics_port is not None:
            metrics_app = web.Application(client_max_size=1024)
            metrics_app.router.add_route("*", "/{tail:.*}", self._metrics)
            self._metrics_runner = web.AppRunner(metrics_app, access_log=None)
            await self._metrics_runner.setup()
            msite = web.TCPSite(self._metrics_runner, self.host, metrics_port, reuse_address=True)
            await msite.start()
            self.metrics_port = msite._server.sockets[0].getsockname()[1]
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=self.limits.max_concurrent * 2), auto_decompress=False)
        self._http_slots = asyncio.Semaphore(self.limits.max_concurrent)

    async def _stop_http(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if getattr(self, "_metrics_runner", None) is not None:
            await self._metrics_runner.cleanup()

    def _error(self, refused: Refused):
        from aiohttp import web

        self.stats.refuse(refused.reason)
        return web.json_response({"error": refused.message}, status=refused.status,
                                 headers={"X-Refused-Reason": refused.reason})

    async def _http(self, request):
        try:
            return await self._route(request)
        except Refused as refused:
            return self._error(refused)

    async def _route(self, request):
        from aiohttp import web

        path, method = request.path, request.method
        if method in ("GET", "HEAD"):
            if path.rstrip("/") == "/v2/health/live":
                if self.live():
                    return web.Response(status=200)
                raise Refused("unavailable", "tritonserver is down and no longer restarted", 503)
            match = next((m for m in (p.match(path) for p in _PUBLIC_GET) if m), None)
            if match is None:
                raise Refused("route", f"{method} {path[:80]} is not available on this endpoint", 403
                              if path.startswith("/v2/") else 404)
            model = match.groupdict().get("model")
            if model is not None:
                _model(self.specs, model, match.groupdict().get("version") or "")
                if path.rstrip("/").endswith("/config") and self.catalog is not None and model in self.configs:
                    from google.protobuf import json_format

                    config = public_config(self.configs[model], self.catalog())
                    return web.json_response(json_format.MessageToDict(config, preserving_proto_field_name=True))
                internal = self.upstream_name(model) if self.upstream_name is not None else model
                if internal != model:  # the default source is unloaded: ask one that is loaded (same schema)
                    path = re.sub(r"^/v2/models/[^/]+", f"/v2/models/{internal}", path)
                    if not path.rstrip("/").endswith("/ready"):
                        return await self._forward(request, None, None, path.rstrip("/"), rename=(internal, model))
            return await self._forward(request, None, None, path.rstrip("/") or "/")
        if method != "POST":
            raise Refused("route", f"{method} is not accepted here (GET or POST)", 405)
        match = _INFER.match(path)
        if match is None:
            raise Refused("route", f"POST {path[:80]} is not available on this endpoint (model repository, shared "
                          "memory, trace, logging and statistics are not public)", 403 if path.startswith("/v2/")
                          else 404)
        _model(self.specs, match["model"], match["version"] or "")
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise Refused("encoding", f"Content-Encoding {encoding[:32]!r} is not accepted: send the body "
                          "uncompressed", 415)
        if request.content_length is not None and request.content_length > self.limits.max_body_bytes:
            raise Refused("body_too_large", f"the body is {request.content_length} bytes, the limit is "
                          f"{self.limits.max_body_bytes}", 413)
        try:
            body = await asyncio.wait_for(request.read(), self.limits.body_timeout_s)
        except ConnectionError:
            raise Refused("closed", "the connection closed before the whole body arrived") from None
        except web.HTTPRequestEntityTooLarge:
            raise Refused("body_too_large", f"the body is over the {self.limits.max_body_bytes}-byte limit",
                          413) from None
        except TimeoutError:
            raise Refused("timeout", f"the body did not arrive within {self.limits.body_timeout_s:.0f} s",
                          408) from None
        header, binary = check_http_infer(self.specs, match["model"], match["version"] or "", body,
                                          request.headers.get("Inference-Header-Content-Length"), self.limits)
        if self._http_slots.locked():
            raise Refused("busy", f"{self.limits.max_concurrent} requests are in flight: retry later", 503)
        lease, target, path = None, match["model"], path.rstrip("/")
        if self.route is not None:  # MODEL → the Triton model of that allowed source (loaded on demand)
            from .request import MODEL_INPUT, bytes_input_http

            value = bytes_input_http(json.loads(header), binary, MODEL_INPUT)
            work = asyncio.get_running_loop().run_in_executor(None, self._lease, match["model"], value)
            try:
                lease = await asyncio.shield(work)
            except asyncio.CancelledError:  # hung up while the model loads: let go of the lease it will get
                work.add_done_callback(lambda f: f.exception() is None and f.result().release())
                raise
            target, path = lease.name, f"/v2/models/{lease.name}/infer"
        try:
            if self.admit is not None:
                from .request import cost_inputs_http

                self._admit(target, lambda: cost_inputs_http(json.loads(header), binary))
            header, request_id = _with_request_id(header)
            async with self._http_slots:
                try:
                    return await self._forward(request, header, binary, path)
                except asyncio.CancelledError:  # the client hung up (handler_cancellation): stop the generation too
                    self._mark_cancelled(request_id)
                    raise
        finally:
            if lease is not None:
                lease.release()

    def _lease(self, model: str, value: str | None):
        """Route a checked request to the allowed source its MODEL names (blocks while that source loads) → the
        launcher's lease; a MODEL that is not allowed is a 400, a source that cannot load now a 503."""
        try:
            return self.route(model, value)
        except ValueError as exc:  # launch.ModelChoiceError
            raise Refused("model_choice", str(exc)) from None
        except Exception as exc:  # the load failed (the launcher recorded and logged why)
            logger.error("could not load the model MODEL %r names: %s", value, exc)
            raise Refused("unavailable", f"MODEL {str(value)[:80]!r} could not be loaded now: retry later (the "
                          "server log has the details)", 503) from None

    def _mark_cancelled(self, request_id: str) -> None:
        from .request import cancel_marker

        upstream = self._upstream
        if upstream is None or not upstream.cancel_dir:
            return
        try:
            cancel_marker(upstream.cancel_dir, request_id).touch()
            self.stats.count("cancelled")
        except OSError as exc:
            logger.warning("could not mark a hung-up request for cancellation: %s", exc)

    async def _forward(self, request, header: bytes | None, binary: bytes | None, path: str,
                       rename: tuple[str, str] | None = None):
        """Send the checked request on to Triton: ``path`` is one of the public routes with a served model name
        (checked), the body is the re-serialized header + binary part; only our own headers go on. ``rename``
        (Triton's name, the public one): a JSON answer naming the model is given the public name."""
        import aiohttp
        from aiohttp import web

        upstream = self._upstream
        if upstream is None:
            raise Refused("unavailable", f"tritonserver is {self.status()}: retry shortly", 503)
        headers = {"Accept-Encoding": "identity"}  # the body goes back to the client as Triton sent it
        data = None
        if header is not None:
            data = header + (binary or b"")
            headers["Content-Type"] = "application/octet-stream" if binary is not None else "application/json"
            if binary is not None:
                headers["Inference-Header-Content-Length"] = str(len(header))
        try:
            async with self._session.request(request.method, upstream.http_url + path, data=data,
                                             headers=headers) as up:
                if rename is not None and up.status == 200:
                    answer = json.loads(await up.read())
                    if isinstance(answer, dict) and answer.get("name") == rename[0]:
                        answer["name"] = rename[1]
                    return web.json_response(answer)
                out = web.StreamResponse(status=up.status)
                for name in ("Content-Type", "Inference-Header-Content-Length", "Content-Length"):
                    if name in up.headers:
                        out.headers[name] = up.headers[name]
                await out.prepare(request)
                async for chunk in up.content.iter_chunked(1 << 16):
                    await out.write(chunk)
                await out.write_eof()
                if header is not None:
                    self.stats.count("forwarded")
                return out
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise Refused("unavailable", f"tritonserver is {self.status()}: retry shortly ({type(exc).__name__})",
                          503) from None

    async def _metrics(self, request):
        from aiohttp import web

        upstream = self._upstream
        if request.method not in ("GET", "HEAD") or request.path.rstrip("/") != "/metrics":
            return web.Response(status=404, text="only GET /metrics here\n")
        if upstream is None or upstream.metrics_url is None:
            return web.Response(status=503, text=f"tritonserver is {self.status()}\n")
        try:
            async with self._session.get(upstream.metrics_url) as up:
                return web.Response(status=up.status, body=await up.read(),
                                    content_type=up.content_type or "text/plain")
        except aiohttp_errors() as exc:
            return web.Response(status=503, text=f"tritonserver is {self.status()} ({type(exc).__name__})\n")

    # -- gRPC -----------------------------------------------------------------------------------------------------

    def _start_grpc(self) -> None:
        import grpc

        handlers = {name: grpc.unary_unary_rpc_method_handler(self._grpc_unary(name))
                    for name in _GRPC_FORWARD_UNARY}
        handlers["ServerLive"] = grpc.unary_unary_rpc_method_handler(self._grpc_live)
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(self._grpc_infer)
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self._grpc_stream)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.limits.max_concurrent + 8, thread_name_prefix="front-grpc"),
            handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
            maximum_concurrent_rpcs=self.limits.max_concurrent,
            options=[("grpc.max_receive_message_length", self.limits.max_grpc_message_bytes),
                     ("grpc.max_send_message_length", -1),
                     ("grpc.max_metadata_size", self.limits.max_grpc_metadata_bytes),
                     ("grpc.so_reuseport", 0)])
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = server.add_insecure_port(f"{host}:{self._ports[1]}")
        if port == 0:
            raise OSError(f"could not bind the gRPC front to {host}:{self._ports[1]}")
        self.grpc_port = port
        server.start()
        self._grpc_server = server

    def _grpc_refuse(self, context, refused: Refused):
        self.stats.refuse(refused.reason)
        context.abort(refused.grpc_code, refused.message)

    def _callable(self, method: str, stream: bool = False):
        with self._channel_lock:
            channel = self._channel
        if channel is None:
            return None
        path = f"/{SERVICE}/{method}"
        return channel.stream_stream(path) if stream else channel.unary_unary(path)

    def _grpc_live(self, _raw: bytes, _context) -> bytes:
        from tritonclient.grpc import service_pb2

        return service_pb2.ServerLiveResponse(live=bool(self.live())).SerializeToString()

    def _grpc_unary(self, name: str):
        def handler(raw: bytes, context) -> bytes:
            if name == "ServerReady" and self._upstream is None:
                from tritonclient.grpc import service_pb2

                return service_pb2.ServerReadyResponse(ready=False).SerializeToString()
            if name.startswith("Model"):
                from google.protobuf.message import DecodeError
                from tritonclient.grpc import service_pb2

                message = getattr(service_pb2, f"{name}Request")()
                try:
                    message.ParseFromString(raw)
                except DecodeError as exc:
                    return self._grpc_refuse(context, Refused("protobuf", f"not a {name}Request: {exc}"))
                try:
                    _model(self.specs, message.name, message.version)
                except Refused as refused:
                    return self._grpc_refuse(context, refused)
                public = message.name
                if name == "ModelConfig" and self.catalog is not None and public in self.configs:
                    config = public_config(self.configs[public], self.catalog())
                    return service_pb2.ModelConfigResponse(config=config).SerializeToString()
                if self.upstream_name is not None:
                    message.name = self.upstream_name(public)
                message.DiscardUnknownFields()
                raw = message.SerializeToString()
                answer = self._grpc_call(name, raw, context)
                if name == "ModelMetadata" and message.name != public:
                    meta = service_pb2.ModelMetadataResponse.FromString(answer)
                    meta.name = public
                    answer = meta.SerializeToString()
                return answer
            else:
                raw = b""  # ServerReady / ServerMetadata requests have no fields: nothing of the client's goes on
            return self._grpc_call(name, raw, context)

        return handler

    def _grpc_call(self, name: str, raw: bytes, context) -> bytes:
        import grpc

        call = self._callable(name)
        if call is None:
            self.stats.refuse("unavailable")
            context.abort(grpc.StatusCode.UNAVAILABLE, f"tritonserver is {self.status()}: retry shortly")
        remaining = context.time_remaining()
        future = call.future(raw, timeout=remaining if remaining is not None and remaining < 1e9 else None)
        context.add_callback(future.cancel)  # the client went away → Triton sees the cancellation
        try:
            return future.result()
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.stats.refuse("unavailable")
            context.abort(exc.code(), exc.details() or str(exc.code()))
        except grpc.FutureCancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "cancelled")

    def _admit(self, model: str, values: Callable[[], Mapping[str, float]]) -> None:
        try:
            self.admit(model, values())
        except ValueError as exc:
            raise Refused("over_budget", str(exc)) from None

    def _admit_grpc(self, raw: bytes) -> None:
        if self.admit is not None:
            from tritonclient.grpc import service_pb2

            from .request import cost_inputs_grpc

            request = service_pb2.ModelInferRequest.FromString(raw)
            self._admit(request.model_name, lambda: cost_inputs_grpc(request))

    def _grpc_route(self, raw: bytes):
        """A checked ModelInferRequest → (it, sent to the Triton model of the source its MODEL names; the lease)."""
        if self.route is None:
            return raw, None
        from tritonclient.grpc import service_pb2

        from .request import MODEL_INPUT, bytes_input_grpc

        request = service_pb2.ModelInferRequest.FromString(raw)
        lease = self._lease(request.model_name, bytes_input_grpc(request, MODEL_INPUT))
        request.model_name, request.model_version = lease.name, ""
        return request.SerializeToString(), lease

    def _grpc_infer(self, raw: bytes, context) -> bytes:
        lease = None
        try:
            raw = check_grpc_infer(self.specs, raw, stream=False, limits=self.limits)
            if not self._grpc_slots.acquire(blocking=False):
                raise Refused("busy", f"{self.limits.max_concurrent} requests in flight", 503)
        except Refused as refused:
            return self._grpc_refuse(context, refused)
        try:
            try:
                raw, lease = self._grpc_route(raw)
                self._admit_grpc(raw)
            except Refused as refused:
                return self._grpc_refuse(context, refused)
            result = self._grpc_call("ModelInfer", raw, context)
            self.stats.count("forwarded")
            return result
        finally:
            self._grpc_slots.release()
            if lease is not None:
                lease.release()

    def _grpc_stream(self, request_iterator, context):
        """Forward a ModelStreamInfer stream, each request checked; a refused one ends the stream INVALID_ARGUMENT."""
        import queue

        import grpc

        call_factory = self._callable("ModelStreamInfer", stream=True)
        if call_factory is None:
            self.stats.refuse("unavailable")
            context.abort(grpc.StatusCode.UNAVAILABLE, f"tritonserver is {self.status()}: retry shortly")
        if not self._grpc_slots.acquire(blocking=False):
            self._grpc_refuse(context, Refused("busy", f"{self.limits.max_concurrent} requests in flight", 503))
        pending: queue.Queue = queue.Queue(maxsize=16)
        refused: list[Refused] = []
        leases: list = []
        leases_lock = threading.Lock()
        closed = [False]

        def keep(lease) -> None:
            with leases_lock:
                if closed[0]:  # the stream ended while its model loaded
                    lease.release()
                else:
                    leases.append(lease)

        def requests():
            while (item := pending.get()) is not None:
                yield item

        call = call_factory(requests())
        context.add_callback(call.cancel)

        def pump():
            try:
                for raw in request_iterator:
                    try:
                        checked = check_grpc_infer(self.specs, raw, stream=True, limits=self.limits)
                        checked, lease = self._grpc_route(checked)
                        if lease is not None:
                            keep(lease)
                        self._admit_grpc(checked)
                        pending.put(checked)
                        self.stats.count("forwarded")
                    except Refused as exc:
                        refused.append(exc)
                        call.cancel()
                        return
            except Exception:  # the client went away mid-stream
                call.cancel()
            finally:
                pending.put(None)

        pumper = threading.Thread(target=pump, name="front-grpc-stream", daemon=True)
        pumper.start()
        try:
            yield from call
        except grpc.RpcError as exc:
            if not refused:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    self.stats.refuse("unavailable")
                context.abort(exc.code(), exc.details() or str(exc.code()))
        finally:
            self._grpc_slots.release()
            pumper.join(timeout=1)
            with leases_lock:
                closed[0] = True
                for lease in leases:
                    lease.release()
        if refused:
            self._grpc_refuse(context, refused[0])


class _QuietRefusals(logging.Filter):
    """aiohttp logs every malformed request (too long a line, too many headers, a bad Content-Length) at ERROR
    with a traceback, after answering it 400 itself: those are refusals, logged at DEBUG here."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        from aiohttp import http_exceptions

        if isinstance(exc, http_exceptions.HttpProcessingError | ConnectionError):
            logger.debug("refused a malformed HTTP request: %s", str(exc).splitlines()[0][:200])
            return False
        return True


_HTTP_LOG = logging.getLogger(__name__ + ".http")
_HTTP_LOG.addFilter(_QuietRefusals())


def aiohttp_errors() -> tuple[type[BaseException], ...]:
    import aiohttp

    return (aiohttp.ClientError, OSError, asyncio.TimeoutError)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


__all__ = ["Front", "FrontStats", "Limits", "ModelSpec", "Refused", "TensorSpec", "Upstream", "check_grpc_infer",
           "check_http_infer", "load_specs", "parse_model_config", "public_config"]

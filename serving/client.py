"""Call the EasyAnimate Triton endpoint: gRPC streaming with a progress bar, falling back to plain HTTP.

``generate(server, prompt, ...)`` tries each address of ``server`` in order:

- ``grpc://HOST:PORT``: the decoupled ``easyanimate_stream`` over a gRPC stream (one PROGRESS message per denoising
  step drives a tqdm bar), then the video;
- ``http://HOST:PORT`` (or ``https://``): ``easyanimate`` through ``tritonclient.http``, one response;
- a bare ``HOST`` or ``HOST:PORT``: ``grpc://HOST:8001`` then ``http://HOST:8000`` (Triton's default ports; a
  given port is taken as the HTTP one);
- several, comma-separated: tried in that order.

The next address is tried only when one cannot be used (connection refused, model missing or not ready); a request
the server rejects (``ServerError``, e.g. ``NUM_FRAMES must be 1 or a multiple of 9 up to 144, got 10``) is final.
"""

from __future__ import annotations

import json
import queue
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .request import to_inputs

MODEL = "easyanimate"
STREAM_MODEL = "easyanimate_stream"
DEFAULT_TIMEOUT = 3600.0  # seconds: a 144-frame video at 50 steps takes minutes even on a GPU


class ServerError(RuntimeError):
    """The server rejected the request or failed while generating; the message is the server's."""


class Unavailable(ConnectionError):
    """This address cannot be used (not reachable, model not loaded/ready): try the next one."""


@dataclass
class GenerationResult:
    """What came back: the media bytes, their mime type and suffix, the server's METADATA, and the transport."""

    data: bytes
    metadata: dict[str, Any]
    transport: str  # "grpc-stream" | "grpc" | "http"
    url: str
    progress: list[dict[str, Any]] = field(default_factory=list)  # PROGRESS messages (streaming only)

    @property
    def mime(self) -> str:
        return self.metadata.get("mime") or ("image/png" if self.data[:8] == b"\x89PNG\r\n\x1a\n" else "video/mp4")

    @property
    def suffix(self) -> str:
        return ".png" if self.mime == "image/png" else ".mp4"


def parse_server(server: str) -> list[tuple[str, str]]:
    """``--server`` text → ``[(scheme, "host:port"), ...]`` with scheme ``grpc`` | ``http`` | ``https``."""
    out = []
    for part in (p.strip() for p in server.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(?:(?P<scheme>[a-z]+)://)?(?P<host>\[[^\]]+\]|[^:/]+)(?::(?P<port>\d+))?/?", part)
        if m is None:
            raise ValueError(f"cannot read server address {part!r}: expected grpc://HOST:PORT, http://HOST:PORT "
                             "or HOST[:PORT]")
        scheme, host, port = m["scheme"], m["host"], m["port"]
        if scheme is None:
            out += [("grpc", f"{host}:8001")] if port is None else []
            out.append(("http", f"{host}:{port or 8000}"))
        elif scheme in ("grpc", "http", "https"):
            default = {"grpc": 8001, "http": 8000, "https": 443}[scheme]
            out.append((scheme, f"{host}:{port or default}"))
        else:
            raise ValueError(f"unknown scheme {scheme!r} in {part!r}: expected grpc, http or https")
    if not out:
        raise ValueError("no server address given")
    return out


def _message(exc: Exception) -> str:
    """The server's own words from a tritonclient exception (without the status prefix)."""
    text = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    text = text or str(exc)
    text = re.sub(r"^\[StatusCode\.[A-Z_]+\]\s*", "", text)
    return re.sub(r"^\[request id: [^\]]*\]\s*", "", text).strip()


def _unavailable(exc: Exception) -> bool:
    status = str(exc.status()) if hasattr(exc, "status") and callable(exc.status) else ""
    text = _message(exc).lower()
    return (isinstance(exc, OSError) or "UNAVAILABLE" in status or "unknown model" in text or "is not ready" in text
            or "not found" in text or "failed to connect" in text or "connection refused" in text)


def _metadata(value) -> dict[str, Any]:
    raw = value[0] if value is not None and len(value) else b"{}"
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def _result(result, transport: str, url: str) -> GenerationResult:
    return GenerationResult(data=bytes(result.as_numpy("VIDEO")[0]), metadata=_metadata(result.as_numpy("METADATA")),
                            transport=transport, url=url)


# ---------------------------------------------------------------------------------------------------------------------
# transports


def infer_http(address: str, inputs: dict[str, np.ndarray], timeout: float = DEFAULT_TIMEOUT, ssl: bool = False,
               model: str = MODEL) -> GenerationResult:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    try:
        client = httpclient.InferenceServerClient(address, ssl=ssl, connection_timeout=10.0, network_timeout=timeout)
    except Exception as exc:
        raise Unavailable(f"http://{address}: {exc}") from exc
    try:
        tensors = []
        for name, arr in inputs.items():
            tensor = httpclient.InferInput(name, list(arr.shape), _datatype(arr))
            tensor.set_data_from_numpy(arr, binary_data=True)
            tensors.append(tensor)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("VIDEO", "METADATA")]
        try:
            result = client.infer(model, tensors, outputs=outputs)
        except InferenceServerException as exc:
            if _unavailable(exc):
                raise Unavailable(f"http://{address}: {_message(exc)}") from exc
            raise ServerError(_message(exc)) from None
        except OSError as exc:
            raise Unavailable(f"http://{address}: {exc}") from exc
        return _result(result, "http", f"{'https' if ssl else 'http'}://{address}")
    finally:
        client.close()


def _grpc_inputs(inputs: dict[str, np.ndarray]):
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, arr in inputs.items():
        tensor = grpcclient.InferInput(name, list(arr.shape), _datatype(arr))
        tensor.set_data_from_numpy(arr)
        tensors.append(tensor)
    return tensors


def infer_grpc(address: str, inputs: dict[str, np.ndarray], timeout: float = DEFAULT_TIMEOUT,
               model: str = MODEL) -> GenerationResult:
    """One unary gRPC call to the non-streaming model."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(address)
    try:
        try:
            result = client.infer(model, _grpc_inputs(inputs), client_timeout=timeout)
        except InferenceServerException as exc:
            if _unavailable(exc):
                raise Unavailable(f"grpc://{address}: {_message(exc)}") from exc
            raise ServerError(_message(exc)) from None
        return _result(result, "grpc", f"grpc://{address}")
    finally:
        client.close()


def infer_grpc_stream(address: str, inputs: dict[str, np.ndarray], timeout: float = DEFAULT_TIMEOUT,
                      on_progress: Callable[[int, int], None] | None = None,
                      model: str = STREAM_MODEL) -> GenerationResult:
    """Stream one request to the decoupled model: PROGRESS messages (``on_progress(step, total)``), the video,
    then the final flag."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(address)
    events: queue.Queue = queue.Queue()
    try:
        try:
            if not client.is_model_ready(model):
                raise Unavailable(f"grpc://{address}: model {model} is not ready")
        except InferenceServerException as exc:
            raise Unavailable(f"grpc://{address}: {_message(exc)}") from exc
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        client.async_stream_infer(model, _grpc_inputs(inputs), enable_empty_final_response=True)
        progress: list[dict[str, Any]] = []
        video, metadata = None, None
        deadline = time.monotonic() + timeout
        while True:
            try:
                result, error = events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise ServerError(f"no answer from grpc://{address} within {timeout:.0f} s") from None
            if error is not None:
                if _unavailable(error) and not progress:
                    raise Unavailable(f"grpc://{address}: {_message(error)}")
                raise ServerError(_message(error))
            response = result.get_response()
            step = result.as_numpy("PROGRESS")
            if step is not None and len(step):
                info = json.loads(step[0])
                if not info.get("done"):
                    progress.append(info)
                    if on_progress is not None:
                        on_progress(int(info["step"]), int(info["total"]))
            out = result.as_numpy("VIDEO")
            if out is not None and len(out) and len(out[0]):
                video, metadata = bytes(out[0]), _metadata(result.as_numpy("METADATA"))
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
        if video is None:
            raise ServerError(f"grpc://{address}: the stream ended without a video")
        return GenerationResult(data=video, metadata=metadata, transport="grpc-stream", url=f"grpc://{address}",
                                progress=progress)
    finally:
        try:
            client.stop_stream()
        finally:
            client.close()


def _datatype(arr: np.ndarray) -> str:
    """The Triton datatype of an array (the schema's dtypes come from ``request.to_inputs``)."""
    if arr.dtype.kind in "OSU":
        return "BYTES"
    if arr.dtype.kind == "b":
        return "BOOL"
    return {"i": "INT", "u": "UINT", "f": "FP"}[arr.dtype.kind] + str(arr.dtype.itemsize * 8)


# ---------------------------------------------------------------------------------------------------------------------


def generate(server: str, prompt: str, *, negative_prompt: str | None = None, seed: int | None = None,
             steps: int | None = None, guidance: float | None = None, num_frames: int | None = None,
             height: int | None = None, width: int | None = None, fps: int | None = None, sampler: str | None = None,
             lora: str | None = None, lora_alpha: float | None = None, accel: str | None = None,
             model: str | None = None, progress: bool = True,
             timeout: float = DEFAULT_TIMEOUT) -> GenerationResult:
    """Generate a video on a Triton server (see the module doc for ``server``); None parameters take the served
    model's defaults. ``lora`` is a file NAME in the server's LoRA folder (``easyanimate serve --lora-dir``);
    ``model`` (sent as MODEL) picks one of the server's allowed models (``serve --allow-models``) by version
    number, alias or ``models:/`` URI. Raises ``ServerError`` (the server's message) or ``ConnectionError``."""
    inputs = to_inputs(prompt, model=model, negative_prompt=negative_prompt, seed=seed, steps=steps,
                       guidance=guidance, num_frames=num_frames, height=height, width=width, fps=fps,
                       sampler=sampler, lora=lora, lora_alpha=lora_alpha, accel=accel)
    from tqdm import tqdm

    bar = None

    def on_progress(step: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="denoising", unit="step", disable=not progress)
        bar.update(step - bar.n)

    try:
        return send(server, inputs, on_progress, timeout)
    finally:
        if bar is not None:
            bar.close()


def send(server: str, inputs: dict[str, np.ndarray], on_progress=None,
         timeout: float = DEFAULT_TIMEOUT) -> GenerationResult:
    """Try each address of ``server`` in order (gRPC streaming hands every PROGRESS step to ``on_progress(step,
    total)``; HTTP has none). Raises ``ServerError`` (the server's message: final) or ``ConnectionError``."""
    failures = []
    for scheme, address in parse_server(server):
        try:
            if scheme == "grpc":
                return infer_grpc_stream(address, inputs, timeout, on_progress)
            return infer_http(address, inputs, timeout, ssl=scheme == "https")
        except Unavailable as exc:
            failures.append(str(exc))
    raise ConnectionError("no Triton endpoint could be used: " + "; ".join(failures))


__all__ = ["GenerationResult", "MODEL", "STREAM_MODEL", "ServerError", "Unavailable", "generate", "infer_grpc",
           "infer_grpc_stream", "infer_http", "parse_server", "send"]

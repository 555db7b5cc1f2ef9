"""Who may change what the server serves, and nothing silently wrong — against a real ``tritonserver``.

- the repository / model-config / logging / … APIs need the launcher's key: without it (or with a wrong one) they are
  refused over HTTP and gRPC, and the model keeps serving;
- only gated versions are served: an alias moved to a version whose evaluation failed (or that was never evaluated)
  is refused by the watcher, the last good version keeps serving; a server is not started on such an alias;
- a LoRA with NaN/Inf weights or alpha, an over-long LoRA name, an oversized prompt: HTTP 400 with a reason, no
  server path or folder listing in it;
- a pipeline folder with pickle weights is refused (and the pickle is never opened).
"""

from __future__ import annotations

import json
import pickle
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from easyanimate.models.lora import lora_key
from serving import client
from serving.launch import ADMIN_HEADER, TritonLaunchError, TritonServer
from serving.request import to_inputs

pytestmark = pytest.mark.slow
NAME = "easyanimate-security-test"
SMALL = {"num_frames": 9, "height": 32, "width": 48, "steps": 1, "seed": 3}
GATES = {"psnr": {"min": 20.0}}


def _tiny_linears() -> dict[str, torch.nn.Linear]:
    from easyanimate.config import load_config
    from easyanimate.models.transformer3d import Transformer3DModel

    with torch.device("meta"):
        model = Transformer3DModel(**load_config("tiny").model.transformer.to_model_kwargs())
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _lora(path: Path, *, poison: str = "", alpha: float = 2.0) -> None:
    """An official-format LoRA for the tiny transformer; ``poison``: "weights" puts one NaN in the last up matrix,
    "inf" one Inf in the first down matrix."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    linears = list(_tiny_linears().items())
    for i, (name, m) in enumerate(linears):
        key = lora_key(name)
        down = 0.1 * torch.randn(4, m.in_features, generator=g)
        up = 0.1 * torch.randn(m.out_features, 4, generator=g)
        if poison == "weights" and i == len(linears) - 1:
            up[0, 0] = float("nan")
        if poison == "inf" and i == 0:
            down[0, 0] = float("inf")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("secret-lora-folder")
    _lora(folder / "good.safetensors")
    _lora(folder / "nan_weights.safetensors", poison="weights")
    _lora(folder / "inf_weights.safetensors", poison="inf")
    _lora(folder / "nan_alpha.safetensors", alpha=float("nan"))
    (folder / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    return folder


@pytest.fixture(scope="module")
def registry(mlflow_server, tiny_pipeline_folder):
    """v1 (passed the gates: champion), v2 (failed them: stays challenger), v3 (never evaluated)."""
    from serving.registry import promote_if_better, register_pipeline

    defaults = {"num_frames": 9, "height": 32, "width": 48, "steps": 1, "fps": 8}
    versions = [register_pipeline(tiny_pipeline_folder, tracking_uri=mlflow_server, name=NAME,
                                  generate_defaults=defaults, tags={"preset": "tiny"}).version for _ in range(3)]
    assert promote_if_better(NAME, versions[0], {"psnr": 25.0}, GATES, tracking_uri=mlflow_server)[0]
    promoted, reasons = promote_if_better(NAME, versions[1], {"psnr": 12.0}, GATES, tracking_uri=mlflow_server)
    assert not promoted and "psnr: 12 < min 20" in reasons[0]
    return [str(v) for v in versions]


@pytest.fixture(scope="module")
def server(mlflow_server, registry, lora_dir, tmp_path_factory):
    srv = TritonServer(f"models:/{NAME}@champion", models=("easyanimate",), tracking_uri=mlflow_server,
                       watch_alias=True, poll_interval=0.5, exit_timeout=5, lora_dir=lora_dir,
                       parameters={"torch_threads": "1"},
                       env={"EASYANIMATE_MODEL_CACHE": str(tmp_path_factory.mktemp("model_cache"))})
    with srv:
        yield srv


def _http(srv, method: str, path: str, body=None, headers=None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(f"{srv.http_url}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _infer_json(srv, prompt="a cat", **params) -> tuple[int, str]:
    """A KServe v2 JSON infer request → (HTTP status, body)."""
    inputs = []
    for name, arr in to_inputs(prompt, **params).items():
        if arr.dtype == object:
            inputs.append({"name": name, "datatype": "BYTES", "shape": [1], "data": [arr[0].decode()]})
        else:
            dtype = "FP32" if arr.dtype == np.float32 else "INT64"
            inputs.append({"name": name, "datatype": dtype, "shape": [1], "data": [arr[0].item()]})
    body = {"inputs": inputs, "outputs": [{"name": "METADATA"}]}
    return _http(srv, "POST", "/v2/models/easyanimate/infer", body)


def _served_version(srv) -> str:
    status, body = _infer_json(srv, **SMALL)
    assert status == 200, body
    meta = json.loads(json.loads(body)["outputs"][0]["data"][0])
    return meta["model"]["version"]


def test_repository_api_needs_the_launchers_key(server, lora_dir):
    lifted = {"parameters": {"config": json.dumps({"parameters": {"max_size": {"string_value": "100000"},
                                                                  "lora_dir": {"string_value": "/"}}})}}
    attempts = [("POST", "/v2/repository/models/easyanimate/unload", {}),
                ("POST", "/v2/repository/models/easyanimate/load", lifted),
                ("POST", "/v2/repository/index", {}),
                ("GET", "/v2/models/easyanimate/config", None),
                ("GET", "/v2/models/stats", None),
                ("POST", "/v2/logging", {"log_file": "/tmp/x.log"}),
                ("POST", "/v2/trace/setting", {"trace_file": "/tmp/t.json"}),
                ("GET", "/v2/systemsharedmemory/status", None)]
    for headers in ({}, {ADMIN_HEADER: "guessed-key"}):
        for method, path, body in attempts:
            status, text = _http(server, method, path, body, headers)
            assert status in (401, 403), f"{method} {path} with {headers}: HTTP {status} {text[:200]}"
            assert str(lora_dir) not in text

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for call in (lambda h: grpc.unload_model("easyanimate", headers=h),
                     lambda h: grpc.load_model("easyanimate", config=json.dumps({"parameters": {}}), headers=h),
                     lambda h: grpc.get_model_config("easyanimate", headers=h),
                     lambda h: grpc.get_model_repository_index(headers=h)):
            for headers in (None, {ADMIN_HEADER: "guessed-key"}):
                with pytest.raises(InferenceServerException, match="(?i)restricted|permission|unauthori"):
                    call(headers)
        assert grpc.is_model_ready("easyanimate")  # inference-side APIs stay open
    finally:
        grpc.close()

    assert server.is_ready("easyanimate") and _served_version(server)  # still serving, the same model
    assert server.model_config("easyanimate")["parameters"]["max_size"]["string_value"] == "1280"  # the key works
    cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "--http-restricted-api=model-repository,model-config," in cmdline


def test_nan_lora_long_names_and_huge_prompts_are_400_without_server_paths(server, lora_dir):
    cases = {
        "nan_weights.safetensors": "holds NaN or Inf",
        "inf_weights.safetensors": "holds NaN or Inf",
        "nan_alpha.safetensors": "alpha holds NaN or Inf",
        "x" * 300 + ".safetensors": "at most 255 bytes, got 312 bytes",
        "é" * 125 + ".safetensors": "at most 255 bytes, got 262 bytes",  # 137 characters, 262 bytes
        "y" * 243 + ".safetensors": "not in the server's LoRA folder",  # exactly 255 bytes, no such file
        "missing.safetensors": "not in the server's LoRA folder",
        "corrupt.safetensors": "cannot be applied to this model",
        "bad\nname.safetensors": "not a path",
    }
    for name, expected in cases.items():
        status, body = _infer_json(server, **SMALL, lora=name)
        assert status == 400, f"{name[:40]}: HTTP {status} {body[:300]}"
        assert expected in body, f"{name[:40]}: {body[:300]}"
        assert str(lora_dir) not in body and "good.safetensors" not in body, body[:300]  # no path, no listing
    status, body = _infer_json(server, "z" * 1_000_000, **SMALL)
    assert status == 400 and "PROMPT must be at most 2000 characters, got 1000000 bytes" in body, body[:300]
    status, body = _infer_json(server, **SMALL, lora="good.safetensors", lora_alpha=float("nan"))
    assert status == 400 and "LORA_ALPHA must be a finite number" in body, body[:300]

    good = client.infer_http(server.http_url.removeprefix("http://"), to_inputs("a cat", **SMALL,
                                                                                lora="good.safetensors"))
    frames = good.data
    assert good.metadata["parameters"]["lora"] == "good.safetensors" and frames[4:8] == b"ftyp"
    assert good.metadata["model"]["source"] == f"models:/{NAME}/{_served_version(server)}"  # no server path


def test_an_alias_moved_to_an_ungated_version_is_not_served(server, registry, mlflow_server):
    from mlflow.tracking import MlflowClient

    v1, rejected, unevaluated = registry
    assert _served_version(server) == v1
    mlflow = MlflowClient(mlflow_server)
    assert mlflow.get_model_version_by_alias(NAME, "challenger").version == unevaluated  # the newest registration
    for bad, why in ((rejected, "failed its evaluation gates (rejected: gate psnr: 12 < min 20"),
                     (unevaluated, "has no gate record")):
        mlflow.set_registered_model_alias(NAME, "champion", bad)  # what one unauthenticated REST call did
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(r["version"] == bad for r in server.reloads):
            time.sleep(0.25)
        refused = [r for r in server.reloads if r["version"] == bad]
        assert refused and not refused[0]["ok"] and why in refused[0]["error"], server.reloads
        assert _served_version(server) == v1 and server.served_version == v1  # the last good one keeps serving
    mlflow.set_registered_model_alias(NAME, "champion", v1)

    with pytest.raises(TritonLaunchError, match=f"points at version {rejected}, which is not served: version "
                                                f"{rejected} failed its evaluation gates"):
        mlflow.set_registered_model_alias(NAME, "gatecheck", rejected)
        TritonServer(f"models:/{NAME}@gatecheck", models=("easyanimate",), tracking_uri=mlflow_server).start()


def test_a_pickle_weight_pipeline_is_refused_and_never_unpickled(tiny_pipe, tmp_path):
    from easyanimate.pipeline import EasyAnimatePipeline

    folder = tiny_pipe.save_pretrained(tmp_path / "pipe")
    marker = tmp_path / "unpickled"

    class Payload:  # what a hostile .bin does when unpickled: here only a file appears
        def __reduce__(self):
            return (Path.touch, (marker,))

    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match=r"transformer/diffusion_pytorch_model\.bin is a pickle weight file, which is "
                                         r"never loaded; expected \.safetensors"):
        EasyAnimatePipeline.from_pretrained(folder)
    assert not marker.exists()

"""A real ``tritonserver`` (the pytriton wheel's, CPU) started by ``serving.launch`` and serving the tiny model.

HTTP and gRPC requests, gRPC streaming, a model served from an MLflow alias and followed when the alias moves,
a crashed stub brought back by the watcher, bad requests that fail alone, concurrency, and nothing left behind.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from easyanimate.cli import app
from easyanimate.video import read_video
from serving import client
from serving.launch import TritonLaunchError, TritonServer, _group_alive
from serving.request import to_inputs

pytestmark = pytest.mark.slow
SMALL = {"num_frames": 9, "height": 48, "width": 80, "steps": 2, "seed": 5}


def _assert_nothing_left(pgid: int, prefix: str) -> None:
    assert not _group_alive(pgid), f"tritonserver process group {pgid} survived stop()"
    assert not list(Path("/dev/shm").glob(f"{prefix}*")), f"/dev/shm/{prefix}* left behind"


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """Both models (``easyanimate``, ``easyanimate_stream``) on the tiny model; checked for leftovers after."""
    server = TritonServer("tiny", exit_timeout=5, parameters={"torch_threads": "1"},
                          env={"EASYANIMATE_MODEL_CACHE": str(tmp_path_factory.mktemp("model_cache"))})
    with server:
        pgid, prefix = server.pid, server.shm_prefix
        yield server
    _assert_nothing_left(pgid, prefix)


def _http(server):
    return server.http_url.removeprefix("http://")


def _healthy(server):
    assert server.is_live(), "server not live"
    assert server.is_ready("easyanimate") and server.is_ready("easyanimate_stream"), "model not ready"


def test_http_and_grpc_return_the_asked_video(triton):
    by_http = client.infer_http(_http(triton), to_inputs("a red kite over a hill", **SMALL))
    by_grpc = client.infer_grpc(triton.grpc_url, to_inputs("a red kite over a hill", **SMALL))
    frames = read_video(by_http.data)
    assert frames.shape == (9, 48, 80, 3) and by_http.data[4:8] == b"ftyp"
    assert by_http.data == by_grpc.data  # same seed, same bytes, whichever protocol
    meta = by_http.metadata
    assert meta["seed"] == 5 and meta["mime"] == "video/mp4" and meta["triton_model"] == "easyanimate"
    assert meta["model"]["name"] == "tiny" and len(meta["model"]["weights_sha256"]) == 64
    assert meta["parameters"] | {"prompt": None} == {**SMALL, "prompt": None, "guidance": 6.0, "fps": 24,
                                                     "sampler": "DPM++", "negative_prompt": meta["parameters"]
                                                     ["negative_prompt"], "lora": "", "lora_alpha": 0.55,
                                                     "accel": "default"}
    assert set(meta["timings"]) == {"load", "encode", "denoise", "decode", "encode_media", "total"}

    other_seed = client.infer_http(_http(triton), to_inputs("a red kite over a hill", **{**SMALL, "seed": 6}))
    assert other_seed.data != by_http.data
    image = client.infer_grpc(triton.grpc_url, to_inputs("a kite", num_frames=1, height=32, width=64, steps=1))
    assert image.data.startswith(b"\x89PNG") and image.metadata["mime"] == "image/png"
    assert read_video(image.data).shape == (1, 32, 64, 3)


def test_defaults_apply_to_optional_inputs(triton):
    result = client.infer_http(_http(triton), to_inputs("only a prompt", steps=1))
    p = result.metadata["parameters"]  # the tiny preset's generate section (its model defaults), V2's negative prompt
    assert (p["num_frames"], p["height"], p["width"], p["seed"], p["sampler"]) == (9, 64, 64, 43, "DPM++")
    assert p["negative_prompt"].startswith("The video is not of a high quality")
    assert read_video(result.data).shape == (9, 64, 64, 3)


def test_without_the_front_a_model_checks_that_model_names_it(triton):
    """MODEL is routed by serve's front (test_models.py); a bare tritonserver's model answers to its own names only."""
    result = client.infer_http(_http(triton), to_inputs("a cat", model="tiny", steps=1))
    assert result.metadata["model"]["served_as"] == "tiny"
    with pytest.raises(client.ServerError, match="MODEL 'models:/easyanimate/9' is not served here: this model "
                                                 "serves tiny"):
        client.infer_http(_http(triton), to_inputs("a cat", model="models:/easyanimate/9", steps=1))


def test_grpc_stream_sends_progress_per_step_then_the_video(triton):
    seen = []
    result = client.infer_grpc_stream(triton.grpc_url, to_inputs("waves", **{**SMALL, "steps": 4}),
                                      on_progress=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert result.progress == [{"step": i, "total": 4} for i in range(1, 5)]
    assert result.transport == "grpc-stream" and result.metadata["triton_model"] == "easyanimate_stream"
    assert read_video(result.data).shape == (9, 48, 80, 3)
    unary = client.infer_http(_http(triton), to_inputs("waves", **{**SMALL, "steps": 4}))
    assert unary.data == result.data


def _bad_requests():
    ok = to_inputs("a cat", **SMALL)
    cases = {
        "missing PROMPT": ({k: v for k, v in ok.items() if k != "PROMPT"}, "PROMPT"),
        "unknown input": ({**ok, "FOO": np.array([1], dtype=np.int64)}, "FOO"),
        "STEPS as FP32": ({**ok, "STEPS": np.array([2.0], dtype=np.float32)}, "STEPS"),
        "PROMPT as INT64": ({**ok, "PROMPT": np.array([1], dtype=np.int64)}, "PROMPT"),
        "GUIDANCE as FP64": ({**ok, "GUIDANCE": np.array([6.0], dtype=np.float64)}, "GUIDANCE"),
        "two prompts": ({**ok, "PROMPT": np.array([b"a", b"b"], dtype=object)}, "PROMPT"),
        "frames 0": (to_inputs("a", num_frames=0), "NUM_FRAMES must be 1 or a multiple of 9 up to 144, got 0"),
        "frames 10": (to_inputs("a", num_frames=10), "NUM_FRAMES must be 1 or a multiple of 9 up to 144, got 10"),
        "frames 145": (to_inputs("a", num_frames=145), "got 145"),
        "frames 1000": (to_inputs("a", num_frames=1000), "got 1000"),
        "15x15": (to_inputs("a", height=15, width=15), "HEIGHT must be a multiple of 16 between 16 and 1280, got 15"),
        "width 1296": (to_inputs("a", width=1296), "WIDTH must be a multiple of 16"),
        "steps 0": (to_inputs("a", steps=0), "STEPS must be between 1 and 100, got 0"),
        "steps 1000": (to_inputs("a", steps=1000), "STEPS must be between 1 and 100, got 1000"),
        "NaN guidance": (to_inputs("a", guidance=float("nan")), "GUIDANCE must be a finite number"),
        "inf guidance": (to_inputs("a", guidance=float("inf")), "GUIDANCE must be a finite number"),
        "guidance 21": (to_inputs("a", guidance=21.0), "between 0 and 20, got 21"),
        "100 kB prompt": (to_inputs("x" * 100_000), "PROMPT must be at most 2000 characters, got 100000"),
        "invalid UTF-8": ({**ok, "PROMPT": np.array([b"\xff\xfe bad"], dtype=object)}, "PROMPT is not valid UTF-8"),
        "invalid UTF-8 negative": ({**ok, "NEGATIVE_PROMPT": np.array([b"\xc3"], dtype=object)},
                                   "NEGATIVE_PROMPT is not valid UTF-8"),
        "empty prompt": (to_inputs(""), "PROMPT must not be empty"),
        "unknown sampler": (to_inputs("a", sampler="LMS"), "unknown sampler 'LMS'"),
        "PNDM 2 steps": (to_inputs("a", sampler="PNDM", steps=2), "at least 4 with the PNDM sampler"),
        "negative seed": (to_inputs("a", seed=-3), "SEED must be between 0"),
        "fps 0": (to_inputs("a", fps=0), "FPS must be between 1 and 60, got 0"),
    }
    return cases


def test_bad_requests_fail_alone_and_the_server_stays_healthy(triton):
    cases = _bad_requests()
    assert len(cases) >= 20
    transports = [lambda i: client.infer_http(_http(triton), i), lambda i: client.infer_grpc(triton.grpc_url, i),
                  lambda i: client.infer_grpc_stream(triton.grpc_url, i)]
    for n, (name, (inputs, expected)) in enumerate(cases.items()):
        send = transports[n % len(transports)]
        with pytest.raises(client.ServerError) as info:
            send(inputs)
        assert expected in str(info.value), f"{name}: {info.value}"
        _healthy(triton)
    # every range violation also fails on the other transports with the same message
    with pytest.raises(client.ServerError, match=r"^NUM_FRAMES must be 1 or a multiple of 9 up to 144, got 10$"):
        client.infer_grpc_stream(triton.grpc_url, to_inputs("a", num_frames=10))
    with pytest.raises(client.ServerError, match=r"^NUM_FRAMES must be 1 or a multiple of 9 up to 144, got 10$"):
        client.infer_http(_http(triton), to_inputs("a", num_frames=10))
    # and the instance still generates
    assert read_video(client.infer_http(_http(triton), to_inputs("a cat", **SMALL)).data).shape[0] == 9


def test_accel_input_is_validated_by_the_server(triton):
    """ACCEL (an easyanimate.accel spec) is checked like every input: a bad value is HTTP 400 / gRPC INVALID_ARGUMENT
    with the reason; a setting this CPU server cannot run (fp8) is refused the same way; a good one is applied."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from serving.client import _grpc_inputs

    for spec, message in (("cache=teacache", "ACCEL: accel cache must be one of none, first_block"),
                          ("cache=first_block,threshold=high", "threshold must be a number"),
                          ("fp8=true", "ACCEL: accel fp8=true (float8 weight storage) needs a CUDA GPU")):
        inputs = to_inputs("a kite", accel=spec, **SMALL)
        http = httpclient.InferenceServerClient(_http(triton))
        tensors = []
        for name, arr in inputs.items():
            tensor = httpclient.InferInput(name, list(arr.shape), "BYTES" if arr.dtype == object else
                                           {"int64": "INT64", "float32": "FP32"}[arr.dtype.name])
            tensor.set_data_from_numpy(arr)
            tensors.append(tensor)
        with pytest.raises(InferenceServerException) as info:
            http.infer("easyanimate", tensors)
        http.close()
        assert info.value.status() == "400" and message in info.value.message(), (spec, info.value)
        grpc = grpcclient.InferenceServerClient(triton.grpc_url)
        with pytest.raises(InferenceServerException) as info:
            grpc.infer("easyanimate", _grpc_inputs(inputs))
        grpc.close()
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and message in info.value.message(), spec
        _healthy(triton)
    exact = client.infer_http(_http(triton), to_inputs("a kite", accel="exact", **{**SMALL, "steps": 4}))
    cached = client.infer_http(_http(triton), to_inputs("a kite", accel="cache=first_block,threshold=0.5",
                                                        **{**SMALL, "steps": 4}))
    assert exact.metadata["parameters"]["accel"] == "exact"
    assert cached.metadata["parameters"]["accel"] == "cache=first_block,threshold=0.5"


def test_four_concurrent_requests_succeed(triton):
    results, errors = {}, []

    def run(i):
        inputs = to_inputs(f"request {i}", **{**SMALL, "seed": 100 + i})
        try:
            if i % 2:
                results[i] = client.infer_grpc_stream(triton.grpc_url, inputs)
            else:
                results[i] = client.infer_http(_http(triton), inputs)
        except Exception as exc:  # collected: a thread's exception would be lost
            errors.append(f"{i}: {exc!r}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 4
    assert len({r.data for r in results.values()}) == 4
    for r in results.values():
        assert read_video(r.data).shape == (9, 48, 80, 3)
    _healthy(triton)


def test_cli_generate_on_the_server(triton, tmp_path):
    runner = CliRunner()
    out = tmp_path / "kite.mp4"
    res = runner.invoke(app, ["generate", "--server", f"grpc://{triton.grpc_url}", "--prompt", "a kite",
                              "--frames", "9", "--height", "48", "--width", "80", "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["transport"] == "grpc-stream" and info["model"]["name"] == "tiny"
    assert read_video(out).shape == (9, 48, 80, 3)

    # a dead gRPC address falls back to HTTP; one frame writes a PNG even when .mp4 was asked for
    res = runner.invoke(app, ["generate", "--server", f"grpc://127.0.0.1:9,{triton.http_url}", "--prompt", "a kite",
                              "--frames", "1", "--steps", "1", "--out", str(tmp_path / "still.mp4")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["transport"] == "http"
    assert (tmp_path / "still.png").read_bytes().startswith(b"\x89PNG")

    res = runner.invoke(app, ["generate", "--server", triton.http_url, "--frames", "10", "--out", str(out)])
    assert res.exit_code == 1
    assert "NUM_FRAMES must be 1 or a multiple of 9 up to 144, got 10" in res.output
    res = runner.invoke(app, ["generate", "--server", triton.http_url, "--model", "tiny"])
    assert res.exit_code == 2 and "--model apply to local generation" in res.output


def test_a_failed_reload_keeps_the_loaded_version_serving(triton, tmp_path):
    with pytest.raises(TritonLaunchError, match="is not a pipeline folder"):
        triton.load("easyanimate", str(tmp_path / "missing"))
    _healthy(triton)
    assert client.infer_http(_http(triton), to_inputs("a cat", steps=1)).metadata["model"]["source"] == "tiny"


# ---------------------------------------------------------------------------------------------------------------------
# served from the MLflow registry; the watcher follows the alias and revives a crashed stub


def _served_version(server) -> str:
    result = client.infer_http(_http(server), to_inputs("a cat", steps=1))
    return result.metadata["model"]["version"]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_served_from_mlflow_alias_and_reloaded_when_it_moves(mlflow_server, tiny_pipeline_folder, tmp_path):

    from serving.registry import promote_if_better, register_pipeline

    name = "easyanimate-triton-test"
    defaults = {"num_frames": 9, "height": 32, "width": 48, "steps": 2, "fps": 8}
    v1 = register_pipeline(tiny_pipeline_folder, tracking_uri=mlflow_server, name=name, generate_defaults=defaults,
                           tags={"preset": "tiny"})
    assert promote_if_better(name, v1.version, {"psnr": 25.0}, {"psnr": {"min": 20.0}},
                             tracking_uri=mlflow_server)[0]
    v2 = register_pipeline(tiny_pipeline_folder, tracking_uri=mlflow_server, name=name,
                           generate_defaults={**defaults, "fps": 12}, tags={"preset": "tiny"})

    server = TritonServer(f"models:/{name}@champion", models=("easyanimate",), tracking_uri=mlflow_server,
                          watch_alias=True, poll_interval=1.0, exit_timeout=5, parameters={"torch_threads": "1"},
                          env={"EASYANIMATE_MODEL_CACHE": str(tmp_path / "cache")})
    with server:
        pid, pgid, prefix = server.pid, server.pid, server.shm_prefix
        result = client.infer_http(_http(server), to_inputs("a cat"))
        meta = result.metadata
        assert meta["model"]["name"] == name and meta["model"]["version"] == str(v1.version)
        assert meta["model"]["alias_uri"] == f"models:/{name}@champion"
        assert meta["model"]["weights_sha256"] == v1.tags["weights_sha256"]
        assert (meta["parameters"]["height"], meta["parameters"]["width"], meta["parameters"]["fps"]) == (32, 48, 8)
        assert read_video(result.data).shape == (9, 32, 48, 3)

        assert promote_if_better(name, v2.version, {"psnr": 25.0}, {"psnr": {"min": 20.0}},
                                 tracking_uri=mlflow_server)[0]  # only a gated version is served
        _wait_for(lambda: _served_version(server) == str(v2.version), 180, f"version {v2.version} to be served")
        assert server.pid == pid and server.served_version == str(v2.version)  # same server, new weights
        assert client.infer_http(_http(server), to_inputs("a cat", steps=1)).metadata["parameters"]["fps"] == 12
        assert any(r["reason"].startswith("alias champion moved") and r["ok"] for r in server.reloads)

        # a stub that dies hard is not restarted by Triton (the model even stays READY): the watcher reloads it
        # (the previous version's stub exits a few seconds after the swap: wait for the one that serves)
        stubs = _wait_for(lambda: (lambda p: p if len(p) == 1 else None)(server.stub_pids("easyanimate")), 60,
                          "a single stub process")
        os.kill(stubs[0], signal.SIGKILL)
        _wait_for(lambda: any("stub process died" in r["reason"] and r["ok"] for r in server.reloads), 180,
                  "the watcher to reload the crashed model")
        assert _served_version(server) == str(v2.version)
        assert server.is_live() and server.is_ready("easyanimate")
    _assert_nothing_left(pgid, prefix)
    assert server.tmp is None and server.proc is None

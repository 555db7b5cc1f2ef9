"""Several registered versions behind one ``serve`` endpoint (issue 16, item 3): a request names one in ``MODEL``;
the front routes it to that version's Triton models, loaded on demand through the repository API, with at most
``--max-loaded`` (here 1) loaded at once; ``generate --server --model-version``; the web UI lists the allowed models,
sends the choice, shows which version answered and takes each version's generate defaults.

One endpoint (front + supervised tritonserver) serves two registered tiny versions of different init seeds and
defaults: ``models:/ea-multi/1`` (the default) and ``models:/ea-multi@champion`` (version 2).
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from easyanimate.video import read_video
from serving import client
from serving.request import to_inputs

NAME = "ea-multi"
GATES = {"psnr": {"min": 20.0}}
DEFAULTS = {1: {"num_frames": 9, "height": 32, "width": 48, "steps": 2, "fps": 8, "guidance": 6.0},
            2: {"num_frames": 9, "height": 48, "width": 32, "steps": 3, "fps": 12, "guidance": 4.0,
                "sampler": "Euler"}}
SMALL = {"num_frames": 9, "height": 32, "width": 32, "steps": 2, "seed": 5}


def test_model_values_name_allowed_sources_by_version_alias_or_uri():
    from serving.request import RequestError, model_names, parse_model_choice

    assert model_names("models:/ea/3") == {"models:/ea/3", "3", "ea/3"}
    assert model_names("models:/ea@champion") == {"models:/ea@champion", "champion", "@champion", "ea@champion"}
    assert model_names("/srv/models/pipe") == {"/srv/models/pipe", "pipe"} and model_names("tiny") == {"tiny"}
    for good in ("3", "champion", "@champion", "models:/ea/3", "models:/ea@champion", "tiny"):
        assert parse_model_choice(f" {good} ") == good
    for bad in ("", "0", "3.5", "a/b", "models:/ea", "models:/ea/x", "../x", "x" * 600, "a\nb"):
        with pytest.raises(RequestError, match="MODEL must be"):
            parse_model_choice(bad)


@pytest.fixture(scope="module")
def versions(mlflow_server, tiny_pipeline_folder, tmp_path_factory):
    """v1 (init seed 0), v2 (init seed 7, better: champion), v3 (failed its gates)."""
    from easyanimate.config import load_config
    from easyanimate.pipeline import build_pipeline
    from serving.registry import promote_if_better, register_pipeline

    other = tmp_path_factory.mktemp("seed7") / "tiny_pipe"
    build_pipeline(load_config("tiny", ["model.init_seed=7"]).model).save_pretrained(other)
    out = []
    for i, (folder, psnr) in enumerate(((tiny_pipeline_folder, 25.0), (other, 26.0), (other, 12.0)), start=1):
        mv = register_pipeline(folder, tracking_uri=mlflow_server, name=NAME, generate_defaults=DEFAULTS.get(i),
                               tags={"preset": "tiny"}, by_reference=i == 3)
        promote_if_better(NAME, mv.version, {"psnr": psnr}, GATES, tracking_uri=mlflow_server)
        out.append(str(mv.version))
    from mlflow.tracking import MlflowClient

    assert MlflowClient(mlflow_server).get_model_version_by_alias(NAME, "champion").version == out[1]
    return out


@pytest.fixture(scope="module")
def endpoint(mlflow_server, versions, lora_dir, tmp_path_factory):
    from serving.launch import TritonServer
    from serving.supervisor import Endpoint

    tmp = tmp_path_factory.mktemp("models_endpoint")
    server = TritonServer(f"models:/{NAME}/{versions[0]}", allow_models=[f"models:/{NAME}@champion"], max_loaded=1,
                          tracking_uri=mlflow_server, exit_timeout=5, parameters={"torch_threads": "1"},
                          lora_dir=lora_dir,
                          env={"EASYANIMATE_MODEL_CACHE": str(tmp / "cache")}, log=str(tmp / "tritonserver.log"))
    with Endpoint(server, backoff=(0.5,)) as ep:
        yield ep


def _states(ep) -> dict[str, str]:
    return {row["name"]: row.get("state", "") for row in ep.server.repository_index()}


def _http_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_each_allowed_version_answers_and_one_stays_loaded(endpoint, versions):
    v1, v2, _ = versions
    http = endpoint.http_url.removeprefix("http://")
    first = client.infer_http(http, to_inputs("a red kite", **SMALL))
    assert first.metadata["model"]["version"] == v1 and first.metadata["model"]["served_as"] == f"models:/{NAME}/{v1}"
    assert first.metadata["parameters"]["fps"] == 8  # version 1's own defaults
    assert _states(endpoint)["easyanimate"] == "READY" and _states(endpoint).get("easyanimate__1") != "READY"

    second = client.infer_http(http, to_inputs("a red kite", model="champion", **SMALL))
    meta = second.metadata["model"]
    assert meta["version"] == v2 and meta["served_as"] == f"models:/{NAME}@champion", meta
    assert second.metadata["parameters"]["fps"] == 12 and second.metadata["parameters"]["sampler"] == "Euler"
    a, b = read_video(first.data).astype(np.int16), read_video(second.data).astype(np.int16)
    assert a.shape == b.shape == (9, 32, 32, 3) and np.abs(a - b).mean() > 1.0  # other weights, other video
    states = _states(endpoint)  # --max-loaded 1: version 2's load unloaded version 1 (Triton's repository index)
    assert states["easyanimate__1"] == "READY" and states["easyanimate_stream__1"] == "READY", states
    assert states["easyanimate"] == "UNAVAILABLE" and states["easyanimate_stream"] == "UNAVAILABLE", states
    assert [e["model"] for e in endpoint.server.evictions] == [f"models:/{NAME}/{v1}"]

    # the full URI of the resolved version names the same loaded model: no load; gRPC streaming reaches it too
    streamed = client.infer_grpc_stream(endpoint.grpc_url, to_inputs("a red kite", model=f"models:/{NAME}/{v2}",
                                                                      **SMALL))
    assert streamed.metadata["model"]["version"] == v2 and streamed.data == second.data
    assert len(endpoint.server.evictions) == 1

    # what clients learn: the public config lists allowed and loaded models and their defaults, without paths
    status, config = _http_json(f"{endpoint.http_url}/v2/models/easyanimate/config")
    assert status == 200, config
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert json.loads(params["allowed_models"]) == [f"models:/{NAME}/{v1}", f"models:/{NAME}@champion"]
    assert json.loads(params["loaded_models"]) == [f"models:/{NAME}@champion"] and params["max_loaded"] == "1"
    defaults = json.loads(params["generate_defaults"])
    assert defaults[f"models:/{NAME}@champion"]["steps"] == 3 and defaults[f"models:/{NAME}/{v1}"]["steps"] == 2
    assert "/" not in "".join(v for k, v in params.items() if k not in ("allowed_models", "loaded_models",
                                                                        "model_versions", "generate_defaults",
                                                                        "default_model")), params
    assert str(endpoint.server.tmp) not in json.dumps(config)
    status, metadata = _http_json(f"{endpoint.http_url}/v2/models/easyanimate")  # the default is unloaded
    assert status == 200 and metadata["name"] == "easyanimate" and "MODEL" in {i["name"] for i in metadata["inputs"]}


def test_a_model_that_is_not_allowed_is_refused_by_name(endpoint, versions):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    allowed = f"allowed models:/{NAME}/{versions[0]} (default), models:/{NAME}@champion"
    http = endpoint.http_url.removeprefix("http://")
    for bad in (f"models:/{NAME}/{versions[2]}", "challenger", "../../etc"):
        with pytest.raises(client.ServerError, match="is not served here") as info:
            client.infer_http(http, to_inputs("a cat", model=bad, **SMALL))
        assert f"MODEL {bad!r} is not served here: {allowed}" in str(info.value)
    body = json.dumps({"inputs": [{"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": ["a cat"]},
                                  {"name": "MODEL", "datatype": "BYTES", "shape": [1], "data": ["9"]}]}).encode()
    req = urllib.request.Request(f"{endpoint.http_url}/v2/models/easyanimate/infer", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 400 and "is not served here" in info.value.read().decode()
    grpc = grpcclient.InferenceServerClient(endpoint.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            grpc.infer("easyanimate", client._grpc_inputs(to_inputs("a cat", model="7", **SMALL)))
        assert "INVALID_ARGUMENT" in str(info.value.status()) and allowed in info.value.message()
    finally:
        grpc.close()
    assert endpoint.front.stats.refused["model_choice"] >= 5


def test_a_version_that_failed_its_gates_is_not_allowed(mlflow_server, versions):
    from serving.launch import TritonLaunchError, TritonServer

    server = TritonServer(f"models:/{NAME}/{versions[0]}", allow_models=[f"models:/{NAME}/{versions[2]}"],
                          tracking_uri=mlflow_server)
    with pytest.raises(TritonLaunchError, match=f"allowed model models:/{NAME}/{versions[2]} .* is not served: "
                                                f"version {versions[2]} failed its evaluation gates"):
        server.start()
    assert server.proc is None and server.tmp is None


def _cli(capsys, argv) -> tuple[int, list[str], str]:
    from easyanimate.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return info.value.code, [ln for ln in captured.err.splitlines() if ln.strip()], captured.out


def test_cli_generate_model_version(endpoint, versions, tmp_path, capsys):
    server = f"grpc://{endpoint.grpc_url}"
    out = tmp_path / "v.mp4"
    code, err, stdout = _cli(capsys, ["generate", "--server", server, "--model-version", "champion", "--prompt",
                                      "a cat", "--frames", "9", "--height", "32", "--width", "32", "--steps", "1",
                                      "--out", str(out)])
    assert code == 0, err
    info = json.loads(stdout.strip().splitlines()[-1])
    assert info["model"]["version"] == versions[1] and read_video(out).shape == (9, 32, 32, 3)
    for bad, expected in (("models:/", "expected a version number (3), an alias (champion) or models:/NAME/VERSION"),
                          ("a/b", "got 'a/b'"),
                          ("7", f"MODEL '7' is not served here: allowed models:/{NAME}/{versions[0]} (default)")):
        code, err, _ = _cli(capsys, ["generate", "--server", server, "--model-version", bad, "--out",
                                     str(tmp_path / "bad.mp4")])
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--model-version" in err[0], err
        assert expected in err[0], err
    code, err, _ = _cli(capsys, ["generate", "--model-version", "2", "--out", str(tmp_path / "local.mp4")])
    assert code == 2 and len(err) == 1 and "use it with --server" in err[0], err
    assert not (tmp_path / "bad.mp4").exists() and not (tmp_path / "local.mp4").exists()


# ---------------------------------------------------------------------------------------------------------------------
# the web UI against this endpoint: headless Chromium (see test_webui.py)


@pytest.fixture(scope="module")
def ui(endpoint, mlflow_server, lora_dir, tmp_path_factory):
    from serving import webui
    from serving.launch import free_port

    root = tmp_path_factory.mktemp("webui_models")
    demo, url = webui.launch(f"grpc://{endpoint.grpc_url}", port=free_port(), samples_dir=root / "samples",
                             mlflow_uri=mlflow_server, lora_dir=lora_dir, block=False, timeout=180)
    try:
        yield {"url": url, "samples": root / "samples"}
    finally:
        demo.close()


@pytest.mark.slow
def test_the_web_ui_switches_between_the_allowed_models(ui, versions, endpoint):
    from tests.serving.test_webui import CHROMIUM, CHROMIUM_ARGS, _all_logs, _wait_status

    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make test installs it: apt-get install -y chromium)")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    v1, v2, v3 = versions
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 1500}).new_page()
            page.set_default_timeout(60_000)
            page.goto(ui["url"])
            page.wait_for_selector("#generate")
            note = page.locator("#served-model").inner_text()
            assert f"models:/{NAME}/{v1}" in note and f"models:/{NAME}@champion" in note, note
            # the page starts from the served default's generate defaults, not V2's 144 x 672 x 384 x 50
            assert page.locator("#steps input[type=number]").input_value() == "2"
            assert page.locator("#width input[type=number]").input_value() == "48"
            page.locator("#model input").click()  # allowed models first, then the registry's other versions
            options = [o.replace("✓", "").strip() for o in page.get_by_role("option").all_inner_texts()]
            assert options[:3] == ["(as served)", f"models:/{NAME}/{v1}", f"models:/{NAME}@champion"], options
            assert f"models:/{NAME}/{v3}" in options
            page.locator("#prompt textarea").click()  # closes the list
            answered = []
            for choice, version, steps in ((f"models:/{NAME}@champion", v2, "3"), (f"models:/{NAME}/{v1}", v1, "2")):
                page.locator("#model input").click()
                page.get_by_role("option", name=choice, exact=True).click()
                page.wait_for_function(f"document.querySelector('#steps input[type=number]').value === '{steps}'")
                page.locator("#prompt textarea").fill("a red kite over a green hill")
                if version == v1:  # and a LoRA from the server's folder, applied by the server for this request
                    page.locator("#lora input").click()
                    page.get_by_role("option", name="style.safetensors").click()
                count = len(_all_logs(ui["samples"]))
                page.locator("#generate").click()
                expected = f"Answered by {choice} — {NAME} version {version},"  # which version answered
                try:
                    page.wait_for_function("t => document.querySelector('#served-model').innerText.includes(t)",
                                           arg=expected, timeout=150_000)
                except PlaywrightTimeout:
                    raise AssertionError(f"{expected!r} not shown; status: {_wait_status(page, 1)!r}") from None
                assert "Saved" in _wait_status(page)
                logs = _all_logs(ui["samples"])
                assert len(logs) == count + 1
                answered.append(logs[-1])
            assert [e["model"]["version"] for e in answered] == [v2, v1]
            assert [e["model_applied"] for e in answered] == [True, True]
            assert answered[0]["steps"] == 3 and answered[0]["width"] == 32  # each version's own defaults
            assert answered[0]["model"]["served_as"] == f"models:/{NAME}@champion"
            assert answered[1]["served_parameters"]["lora"] == "style.safetensors" and answered[1]["lora_applied"]
            assert "LoRA style.safetensors applied by the server" in page.locator("#status-box").inner_text()
            page.wait_for_selector("#result-video video")
            with contextlib.suppress(PlaywrightTimeout):
                page.wait_for_function("[...document.querySelectorAll('video')].every(v => v.readyState >= 2)",
                                       timeout=10_000)
            from tests.serving.test_webui import ARTIFACTS

            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "webui_models.png"), full_page=True)
        finally:
            browser.close()

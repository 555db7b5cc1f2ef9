"""Serving under real traffic, against the real ``tritonserver`` on the tiny model (issue 12).

Admission (over-budget refused at once, naming cost and budget), Triton's queue policy (excess refused with 503),
cancellation (an abandoned gRPC client's request stops within 2 steps, read from our metrics; the request queued
behind it is served), the per-request deadline, two instances in parallel, a wedged instance failing readiness and
being reloaded, a clean stop of ``easyanimate serve`` on SIGTERM mid-request, and no orphan after SIGKILL of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serving import client
from serving.launch import TritonServer, _group_alive, _proc_children, set_queue_policy, sweep_orphan_shm
from serving.request import (
    Admission,
    GenerationRequest,
    OverBudget,
    check_budget,
    default_admission,
    merge_defaults,
    request_cost,
    to_inputs,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"num_frames": 9, "height": 48, "width": 48, "steps": 2, "seed": 3}
LARGE = {"num_frames": 9, "height": 256, "width": 256, "steps": 60, "seed": 4}  # ~0.2-0.5 s a step on 2 cores
STEPS = "easyanimate_denoise_steps_total"
LONGEST = {"num_frames": 36, "height": 256, "width": 256, "steps": 100}  # what the test server's budget allows
BUDGET = request_cost(**LONGEST, guidance=6.0)


# ---------------------------------------------------------------------------------------------------------------------
# pure: cost, budget, queue policy


def test_cost_counts_cfg_and_the_default_budget_fits_the_hardware():
    assert request_cost(9, 64, 64, 5, 6.0) == 2 * request_cost(9, 64, 64, 5, 1.0) == 368_640
    tiny = {"num_frames": 9, "height": 64, "width": 64, "steps": 5, "guidance_scale": 6.0}
    assert default_admission(tiny, "cpu").max_cost == 4 * 368_640  # a few default requests on CPU
    gpu = default_admission({}, "cuda")  # V2's defaults: 50 steps; one 144-frame 768x768 request with CFG fits
    assert gpu.max_cost >= request_cost(144, 768, 768, 50, 6.0)
    assert default_admission({**tiny, "max_cost": 10, "deadline_s": 7}, "cpu") == Admission(10, 7.0)
    assert default_admission({**tiny, "max_cost": 10}, "cpu", max_cost=99, deadline_s=3).max_cost == 99
    req = GenerationRequest(prompt="p", **{**merge_defaults(tiny), "steps": 50})
    with pytest.raises(OverBudget, match=r"request cost 3,686,400 \(9 frames x 64 x 64 x 50 steps x 2 \(CFG.*"
                                         r"budget of 1,474,560"):
        check_budget(req, default_admission(tiny, "cpu"))


def test_queue_policy_is_set_in_the_staged_config():
    text = (ROOT / "serving/model_repository/easyanimate/config.pbtxt").read_text()
    out = set_queue_policy(text, max_queue_size=3, queue_timeout=1.5)
    assert "max_queue_size: 3" in out and "default_timeout_microseconds: 1500000" in out
    assert "timeout_action: REJECT" in out
    with pytest.raises(ValueError, match="max_queue_size must be >= 0"):
        set_queue_policy(text, max_queue_size=-1)


# ---------------------------------------------------------------------------------------------------------------------
# one instance, a small queue, a short deadline


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    server = TritonServer("tiny", models=["easyanimate"], exit_timeout=5, parameters={"torch_threads": "1"},
                          max_cost=BUDGET, deadline_s=8, max_queue=1, queue_timeout=60,
                          env={"EASYANIMATE_MODEL_CACHE": str(tmp_path_factory.mktemp("cache"))})
    with server:
        pgid, prefix = server.pid, server.shm_prefix
        yield server
    assert not _group_alive(pgid) and not list(Path("/dev/shm").glob(f"{prefix}*")), "left behind after stop()"


def _http_json(server, inputs: dict, timeout: float = 60) -> tuple[int, dict]:
    body = {"inputs": [{"name": k, "datatype": "BYTES" if v.dtype == object else
                        ("FP32" if v.dtype.kind == "f" else "INT64"), "shape": [1],
                        "data": [v[0].decode() if isinstance(v[0], bytes) else v[0].item()]} for k, v in inputs.items()],
            "outputs": [{"name": "METADATA"}]}
    req = urllib.request.Request(f"{server.http_url}/v2/models/easyanimate/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _wait(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_over_budget_is_refused_at_once_naming_cost_and_budget(busy_server):
    huge = to_inputs("a red kite", num_frames=144, height=1280, width=1280, steps=100)
    begin = time.perf_counter()
    status, body = _http_json(busy_server, huge)
    elapsed = time.perf_counter() - begin
    assert status == 400, f"expected HTTP 400 for an over-budget request, got {status}: {body}"
    assert "request cost 47,185,920,000" in body["error"] and f"work budget of {BUDGET:,}" in body["error"], body
    assert elapsed < 1.0, f"an over-budget request must be refused in under 1 s, took {elapsed:.2f} s"
    with pytest.raises(client.ServerError, match="exceeds this server's work budget"):
        client.infer_grpc(busy_server.grpc_url, huge)
    assert busy_server.metric("easyanimate_requests_total", outcome="over_budget") == 2


def _abandon(server, code: str, run_timeout: float, stop_timeout: float, what: str, while_running=lambda: None):
    """Run ``code`` (a client asking for a long video) in a process; once its request has run 2 steps, call
    ``while_running()``, kill the client, and wait until the server counts the request as cancelled.

    Returns ``(steps the stopped request did, steps it ran after its client was killed)``."""
    steps0 = server.metric(STEPS)
    cancelled0 = server.metric("easyanimate_requests_total", outcome="cancelled")
    stopped0 = server.metric("easyanimate_stopped_request_steps_total")
    abandoned = subprocess.Popen([sys.executable, "-c", code])
    try:
        _wait(lambda: server.metric(STEPS) >= steps0 + 2, run_timeout, f"the {what} to run")
        while_running()
        left_at = server.metric(STEPS)
        abandoned.kill()
    finally:
        abandoned.kill()
        abandoned.wait()
    _wait(lambda: server.metric("easyanimate_requests_total", outcome="cancelled") > cancelled0, stop_timeout,
          f"the {what} to stop")
    done = server.metric("easyanimate_stopped_request_steps_total") - stopped0
    return done, done - (left_at - steps0)


@pytest.mark.slow
def test_abandoned_request_stops_within_two_steps_and_the_queued_one_is_served(busy_server):
    """A gRPC client process asks for a long video and is killed mid-way; a small HTTP request waits behind it in
    the queue (queue size 1), a third one is refused at once (503); the long one stops within 2 steps of its
    client's death and the small one is served."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from serving import client; "
            f"from serving.request import to_inputs; "
            f"client.infer_grpc({busy_server.grpc_url!r}, to_inputs('a long walk', **{LARGE!r}))")
    small: dict = {}
    waiter = threading.Thread(target=lambda: small.update(
        result=client.infer_http(busy_server.http_url.removeprefix("http://"), to_inputs("a dot", **SMALL))))

    def queue_behind_it():
        waiter.start()
        _wait(lambda: busy_server.metric("nv_inference_pending_request_count", model="easyanimate") >= 1, 10,
              "the small request to be queued")
        status, body = _http_json(busy_server, to_inputs("one too many", **SMALL), timeout=10)
        assert status == 503 and "queue" in body["error"], (status, body)  # full queue: refused at once

    # every step until the kill is the long request's: the small one waits
    done, ran_after = _abandon(busy_server, code, 60, 30, "long request", while_running=queue_behind_it)
    assert ran_after <= 2, f"the abandoned request ran {ran_after:g} steps after its client left (expected <= 2)"
    assert done < LARGE["steps"]
    waiter.join(timeout=60)
    assert small["result"].metadata["parameters"]["steps"] == SMALL["steps"], "the queued small request was not served"


@pytest.mark.slow
def test_an_http_client_that_hangs_up_stops_its_request_through_the_front(tmp_path):
    """Triton 2.51 keeps computing an HTTP request whose client has gone; through serve's front (which gives each
    HTTP inference an id and marks it when its client hangs up) the request stops within 2 steps."""
    from serving.supervisor import Endpoint

    server = TritonServer("tiny", models=["easyanimate"], exit_timeout=5, parameters={"torch_threads": "1"},
                          max_cost=BUDGET, env={"EASYANIMATE_MODEL_CACHE": str(tmp_path / "cache")})
    with Endpoint(server, backoff=(0.5,)) as ep:
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from serving import client; "
                f"from serving.request import to_inputs; "
                f"client.infer_http({ep.http_url.removeprefix('http://')!r}, "
                f"to_inputs('a long walk', accel='exact', **{LARGE!r}))")
        done, ran_after = _abandon(server, code, 120, 60, "long HTTP request")
        assert ran_after <= 2, f"it ran {ran_after:g} steps after its client left"
        assert done < LARGE["steps"] and ep.front.stats.cancelled == 1
        small = client.infer_http(ep.http_url.removeprefix("http://"), to_inputs("a dot", **SMALL))
        assert small.metadata["parameters"]["steps"] == SMALL["steps"], "the instance was not freed"


@pytest.mark.slow
def test_a_request_past_its_deadline_stops_at_the_next_step(busy_server):
    # exact: no step cache, so the denoising surely outlasts the 8 s deadline on a quiet machine too
    with pytest.raises(client.ServerError, match=r"deadline of 8 s exceeded \(deadline: stopped after denoising step"):
        client.infer_grpc(busy_server.grpc_url, to_inputs("too slow", **LONGEST, accel="exact"))
    assert busy_server.metric("easyanimate_requests_total", outcome="deadline") == 1
    assert busy_server.is_ready("easyanimate")


# ---------------------------------------------------------------------------------------------------------------------
# two instances; a wedged instance


@pytest.mark.slow
def test_two_instances_serve_two_requests_in_parallel(tmp_path):
    with TritonServer("tiny", models=["easyanimate"], instance_count=2, exit_timeout=5,
                      parameters={"torch_threads": "1"}, stall_timeout=4, poll_interval=0.5,
                      max_cost=BUDGET) as server:
        assert len(server.stub_pids("easyanimate")) == 2
        results: list = [None, None]

        def call(i):
            results[i] = client.infer_grpc(server.grpc_url, to_inputs(f"clip {i}", **{**SMALL, "steps": 5}))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        meta = [r.metadata for r in results]
        assert {m["instance"] for m in meta} == {"easyanimate_0_0", "easyanimate_0_1"}
        assert max(m["started_at"] for m in meta) < min(m["finished_at"] for m in meta), \
            f"the two requests did not overlap: {[(m['started_at'], m['finished_at']) for m in meta]}"

        # a wedged instance (its stub frozen mid-request): readiness fails, the watcher kills and reloads it
        def frozen():
            try:
                client.infer_grpc(server.grpc_url, to_inputs("frozen", **LARGE))
            except Exception:  # its instance is killed: this request fails, the next ones are served
                pass

        waiting = threading.Thread(target=frozen, daemon=True)
        steps0 = server.metric(STEPS)
        waiting.start()
        _wait(lambda: server.metric(STEPS) > steps0, 30, "the request to start")
        busy = [lab for (name, lab), v in server.metrics().items() if name == "easyanimate_inflight" and v == 1]
        instance = dict(busy[0])["instance"]
        stub = next(pid for pid, argv in _proc_children(server.pid) if instance in argv)
        os.kill(stub, signal.SIGSTOP)
        _wait(lambda: not server.is_ready("easyanimate"), 30, "readiness to fail on the wedged instance")
        _wait(lambda: server.is_ready("easyanimate") and len(server.stub_pids("easyanimate")) == 2, 60,
              "the model to be reloaded")
        assert server.wedged and server.wedged[0]["instance"] == instance
        assert client.infer_grpc(server.grpc_url, to_inputs("after", **SMALL)).data[4:8] == b"ftyp"


# ---------------------------------------------------------------------------------------------------------------------
# `easyanimate serve`: SIGTERM mid-request, SIGKILL


def _serve(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    log = tmp_path / "serve.err"
    proc = subprocess.Popen([sys.executable, "-m", "easyanimate", "serve", "--model", "tiny", "--models", "easyanimate",
                             "--log", str(tmp_path / "triton.log"), *extra],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def info():
        assert proc.poll() is None, f"serve exited with {proc.returncode}: {log.read_text()[-2000:]}"
        for line in log.read_text().splitlines():
            if line.startswith("{") and '"grpc"' in line:
                return json.loads(line)
        return None

    return proc, _wait(info, 120, "easyanimate serve to be ready", interval=0.2)


def _tree_gone(pids: list[int]) -> bool:
    return not any(Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z"
                   for p in pids)


@pytest.mark.slow
def test_sigterm_mid_request_stops_the_tree_within_exit_timeout(tmp_path):
    exit_timeout = 5
    proc, info = _serve(tmp_path, "--exit-timeout", str(exit_timeout), "--max-cost", str(BUDGET))
    tree = [proc.pid, info["pid"], *[p for p, _ in _proc_children(info["pid"])]]
    grpc = info["grpc"].removeprefix("grpc://")
    outcome: dict = {}

    def long_request():
        try:
            client.infer_grpc(grpc, to_inputs("a long walk", **{**LARGE, "steps": 100}))
        except Exception as exc:
            outcome["error"] = str(exc)

    threading.Thread(target=long_request, daemon=True).start()
    metrics = info["metrics"]

    def running():
        with urllib.request.urlopen(metrics, timeout=5) as resp:
            return any(line.startswith(STEPS) and not line.endswith(" 0") for line in resp.read().decode().splitlines())

    _wait(running, 60, "the long request to run", interval=0.2)
    # over budget while the only instance is busy: refused by the front at once, not after waiting in the queue
    huge = to_inputs("a red kite", num_frames=144, height=1280, width=1280, steps=100)
    for call in (lambda: client.infer_http(info["http"].removeprefix("http://"), huge, timeout=30),
                 lambda: client.infer_grpc(grpc, huge, timeout=30)):
        begin = time.perf_counter()
        with pytest.raises(client.ServerError, match=f"request cost 47,185,920,000 .* work budget of {BUDGET:,}"):
            call()
        assert time.perf_counter() - begin < 1.0, "an over-budget request must be refused in under 1 s"
    begin = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _wait(lambda: proc.poll() is not None and _tree_gone(tree), exit_timeout + 5,
          f"serve and tritonserver to exit within exit_timeout + 5 s ({tree})", interval=0.1)
    took = time.monotonic() - begin
    assert proc.returncode == 0, (tmp_path / "serve.err").read_text()[-2000:]
    assert not list(Path("/dev/shm").glob(f"ea{proc.pid}_*")), "a /dev/shm segment was left behind"
    err = (tmp_path / "serve.err").read_text()
    assert "SIGTERM: stopping tritonserver" in err and "stopped" in err, err[-2000:]
    _wait(lambda: outcome.get("error"), 10, "the in-flight request's answer")
    # the request is answered with an error at once: UNAVAILABLE "server is stopping" from the model, or the
    # validating front's own gRPC shutdown ("Cancelling all calls") when the front stops first
    assert any(s in outcome["error"].lower() for s in ("server is stopping", "unavailable", "cancel")), outcome
    print(json.dumps({"sigterm_to_exit_s": round(took, 2)}))


@pytest.mark.slow
def test_sigkill_of_serve_takes_tritonserver_with_it(tmp_path):
    proc, info = _serve(tmp_path)
    tree = [info["pid"], *[p for p, _ in _proc_children(info["pid"])]]
    assert len(tree) >= 2, "expected tritonserver and at least one stub"
    proc.kill()
    proc.wait()
    _wait(lambda: _tree_gone(tree), 5, f"tritonserver and its stubs to die with serve ({tree})", interval=0.1)
    # the tree must be gone in 5 s (above). A stub killed before its watchdog ran leaves its /dev/shm region: the
    # next start sweeps the regions of dead launchers (sweep_orphan_shm), so nothing accumulates.
    try:
        _wait(lambda: not list(Path("/dev/shm").glob(f"ea{proc.pid}_*")), 10, "the stubs to remove /dev/shm segments")
    except AssertionError:
        sweep_orphan_shm()
    assert not list(Path("/dev/shm").glob(f"ea{proc.pid}_*")), "regions of a dead launcher survived the sweep"


def test_sweep_removes_only_the_regions_of_dead_launchers(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"ea{gone.pid}_0123abcd_region"
    alive = tmp_path / f"ea{os.getpid()}_0123abcd_region"
    other = tmp_path / "not_ours_region"
    for path in (dead, alive, other):
        path.write_bytes(b"x")
    assert sweep_orphan_shm(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and other.exists()

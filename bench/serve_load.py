"""Load and fault bench of ``easyanimate serve`` (tiny model, loopback only): mixed traffic, then a SIGTERM.

    .venv/bin/python bench/serve_load.py [--clients 4] [--duration 60] [--max-requests 400] [--seed 0]
    .venv/bin/python bench/serve_load.py --soak            # 10 minutes of the same mix, RSS sampled every 30 s

Starts ``easyanimate serve --model tiny`` on 127.0.0.1 (free ports), then ``--clients`` threads (at most 8) send a
seeded mix until ``--duration`` seconds or ``--max-requests`` requests: small valid requests (HTTP, gRPC, gRPC
stream), large valid ones (within the work budget), invalid ones (NUM_FRAMES 10), over-budget ones, and abandoned
ones (a large gRPC request cancelled, or a stream closed, after 0.3-1.5 s). At the end one large request is in flight
when the server gets SIGTERM, and the time until the whole process tree is gone is measured.

Prints one JSON object: requests sent / served / refused by reason, latency p50/p95 of small requests while a large
one ran (and of all small ones), server RSS (serve + tritonserver + stubs) at start and end (+ samples in soak mode),
crashes (tritonserver or stub processes that died or were replaced while serving: must be 0), restarts of models
the watcher did, SIGTERM-to-exit seconds, /dev/shm segments left.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import client  # noqa: E402
from serving.request import request_cost, to_inputs  # noqa: E402
from serving.triton_model import _alive  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num_frames": 9, "height": 48, "width": 48, "steps": 3}
LARGE = {"num_frames": 9, "height": 128, "width": 128, "steps": 20}
OVER = {"num_frames": 144, "height": 512, "width": 512, "steps": 50}
INVALID = {"num_frames": 10}
MIX = [("small", 45), ("large", 10), ("invalid", 15), ("over_budget", 10), ("abandoned", 20)]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
                children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
            except (OSError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def _classify(message: str) -> str:
    text = message.lower()
    for key, reason in (("work budget", "over_budget"), ("maximum queue size", "queue_full"),
                        ("timeout expired", "queue_timeout"), ("deadline of", "deadline"),
                        ("server is stopping", "shutdown"), ("cancel", "cancelled"), ("num_frames", "invalid"),
                        ("must be", "invalid")):
        if key in text:
            return reason
    return "other"


class Load:
    def __init__(self, grpc: str, http: str, seed: int):
        self.grpc, self.http, self.seed = grpc, http, seed
        self.lock = threading.Lock()
        self.sent = 0
        self.served: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.abandoned = 0
        self.small: list[tuple[float, float]] = []  # (start, end) of served small requests
        self.large: list[tuple[float, float]] = []  # (start, end) of large requests, also the abandoned ones
        self.unexpected: list[str] = []

    def _count(self, table: dict, key: str) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + 1

    def one(self, rng: random.Random, kind: str, n: int) -> None:
        seed = rng.randrange(1 << 31)
        start = time.monotonic()
        with self.lock:
            self.sent += 1
        try:
            if kind == "small":
                transport = ("http", "grpc", "grpc-stream")[n % 3]
                inputs = to_inputs(f"small {n}", seed=seed, **SMALL)
                if transport == "http":
                    client.infer_http(self.http, inputs, timeout=120)
                elif transport == "grpc":
                    client.infer_grpc(self.grpc, inputs, timeout=120)
                else:
                    client.infer_grpc_stream(self.grpc, inputs, timeout=120)
                with self.lock:
                    self.small.append((start, time.monotonic()))
            elif kind == "large":
                try:
                    client.infer_grpc(self.grpc, to_inputs(f"large {n}", seed=seed, **LARGE), timeout=300)
                finally:
                    with self.lock:
                        self.large.append((start, time.monotonic()))
            elif kind == "invalid":
                client.infer_http(self.http, to_inputs(f"invalid {n}", **INVALID), timeout=30)
            elif kind == "over_budget":
                client.infer_grpc(self.grpc, to_inputs(f"over {n}", **OVER), timeout=30)
            else:
                self._abandon(rng, n, seed, start)
                return
            self._count(self.served, kind)
            if kind in ("invalid", "over_budget"):
                self.unexpected.append(f"{kind} request {n} was served")
        except (client.ServerError, ConnectionError) as exc:
            reason = _classify(str(exc))
            self._count(self.refused, reason)
            if reason == "other":
                self.unexpected.append(f"{kind} request {n}: {exc}")
            if kind in ("small", "large") and reason not in ("queue_full", "queue_timeout", "shutdown"):
                self.unexpected.append(f"{kind} request {n}: {exc}")

    def _abandon(self, rng: random.Random, n: int, seed: int, start: float) -> None:
        import tritonclient.grpc as grpcclient

        inputs = client._grpc_inputs(to_inputs(f"abandoned {n}", seed=seed, **LARGE))
        conn = grpcclient.InferenceServerClient(self.grpc)
        try:
            if n % 2:
                ctx = conn.async_infer(client.MODEL, inputs, callback=lambda result, error: None)
                time.sleep(rng.uniform(0.3, 1.5))
                ctx.cancel()
            else:
                conn.start_stream(callback=lambda result, error: None)
                conn.async_stream_infer(client.STREAM_MODEL, inputs)
                time.sleep(rng.uniform(0.3, 1.5))
                conn.stop_stream(cancel_requests=True)
        finally:
            conn.close()
            with self.lock:
                self.abandoned += 1
                self.large.append((start, time.monotonic()))


def _percentiles(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return {"n": len(ordered), "p50": round(statistics.median(ordered), 3),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    parser.add_argument("--max-requests", type=int, default=400)
    parser.add_argument("--soak", action="store_true", help="10 minutes of traffic, RSS sampled every 30 s")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--exit-timeout", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.clients <= 8:
        parser.error("--clients must be between 1 and 8")
    duration = 600.0 if args.soak else args.duration
    max_requests = 100_000 if args.soak else args.max_requests
    max_cost = request_cost(**LARGE, guidance=6.0)

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    err = tmp / "serve.err"
    proc = subprocess.Popen(
        [sys.executable, "-m", "easyanimate", "serve", "--model", "tiny", "--host", "127.0.0.1",
         "--max-cost", str(max_cost), "--deadline", "60", "--max-queue", "8", "--queue-timeout", "60",
         "--exit-timeout", str(args.exit_timeout), "--instances", str(args.instances), "--log", str(tmp / "triton.log")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err.open("wb"),
        env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.instances))})
    info = None
    deadline = time.monotonic() + 300
    while info is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"serve did not start: {err.read_text()[-3000:]}")
        info = next((json.loads(line) for line in err.read_text().splitlines()
                     if line.startswith("{") and '"grpc"' in line), None)
        time.sleep(0.2)
    grpc, http = info["grpc"].removeprefix("grpc://"), info["http"].removeprefix("http://")
    load = Load(grpc, http, args.seed)
    client.infer_http(http, to_inputs("warm-up", **SMALL))  # first requests pay lazy imports and grow the
    client.infer_grpc_stream(grpc, to_inputs("warm-up", **LARGE))  # allocator pools to the large size: RSS after
    triton_pid = info["pid"]
    stubs0 = set(_descendants(triton_pid)) - {triton_pid}
    rss_start = _rss_mb(_descendants(proc.pid))
    samples = [{"t": 0.0, "rss_mb": rss_start}]

    stop_at = time.monotonic() + duration
    counter = iter(range(max_requests))
    counter_lock = threading.Lock()

    def worker(index: int) -> None:
        rng = random.Random(args.seed * 1000 + index)
        kinds, weights = zip(*MIX, strict=True)
        while time.monotonic() < stop_at and proc.poll() is None:
            with counter_lock:
                n = next(counter, None)
            if n is None:
                return
            load.one(rng, rng.choices(kinds, weights)[0], n)

    crashes: list[str] = []
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    last_sample = began
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        if proc.poll() is not None:
            crashes.append(f"serve exited with {proc.returncode}")
            break
        if not _alive(triton_pid):
            crashes.append(f"tritonserver {triton_pid} died")
            break
        gone = [p for p in stubs0 if not _alive(p)]
        if gone:
            crashes.append(f"stub processes {gone} died")
            stubs0 -= set(gone)
        if args.soak and time.monotonic() - last_sample >= 30:
            last_sample = time.monotonic()
            samples.append({"t": round(last_sample - began, 1), "rss_mb": _rss_mb(_descendants(proc.pid))})
    for t in threads:
        t.join(timeout=330)
    traffic_s = time.monotonic() - began
    rss_end = _rss_mb(_descendants(proc.pid))
    samples.append({"t": round(traffic_s, 1), "rss_mb": rss_end})

    # SIGTERM with one large request in flight
    tree = _descendants(proc.pid)
    in_flight: dict = {}
    threading.Thread(target=lambda: in_flight.update(
        error=_try(lambda: client.infer_grpc(grpc, to_inputs("in flight at SIGTERM", **LARGE)))), daemon=True).start()
    time.sleep(1.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    while (proc.poll() is None or any(_alive(p) for p in tree)) and time.monotonic() - t0 < args.exit_timeout + 30:
        time.sleep(0.05)
    sigterm_to_exit = time.monotonic() - t0
    shm_left = sorted(p.name for p in Path("/dev/shm").glob(f"ea{proc.pid}_*"))

    small_during_large = [e - s for s, e in load.small
                          if any(ls < e and s < le for ls, le in load.large)]
    print(json.dumps({
        "clients": args.clients, "instances": args.instances, "traffic_s": round(traffic_s, 1), "soak": args.soak,
        "mix_percent": dict(MIX), "sizes": {"small": SMALL, "large": LARGE, "over_budget": OVER},
        "work_budget": max_cost,
        "requests": {"sent": load.sent, "served": load.served, "refused": load.refused,
                     "abandoned": load.abandoned},
        "small_latency_s_while_large_ran": _percentiles(small_during_large),
        "small_latency_s_all": _percentiles([e - s for s, e in load.small]),
        "rss_mb": {"start": rss_start, "end": rss_end,
                   "growth_percent": round(100 * (rss_end - rss_start) / rss_start, 1) if rss_start else None,
                   **({"samples": samples} if args.soak else {})},
        "load_average_1min": round(os.getloadavg()[0], 1), "cpus": os.cpu_count(),
        "crashes": len(crashes), "crash_details": crashes, "unexpected": load.unexpected[:10],
        "sigterm_to_exit_s": round(sigterm_to_exit, 2), "exit_code": proc.returncode,
        "in_flight_at_sigterm": (in_flight.get("error") or "served")[:160], "shm_left": shm_left,
    }))


def _try(fn) -> str | None:
    try:
        fn()
    except Exception as exc:  # the answer is what we report
        return str(exc)
    return None


if __name__ == "__main__":
    main()

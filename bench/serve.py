"""Serving overhead and throughput: the tiny model through Triton (HTTP, gRPC, gRPC streaming) against a direct
in-process call of the same generation function on the same inputs, all in one run on one machine.

    .venv/bin/python bench/serve.py [--requests 10] [--steps 5] [--frames 9] [--size 64] [--instances 1]

Latency: ``--requests`` sequential requests per path after ``--warmup`` unmeasured ones, the paths taking turns
(p50/p95 in seconds);
``overhead`` is each Triton path's p50 over the direct p50. Throughput: videos/s with 1, 2 and 4 concurrent HTTP
clients, each sending ``--requests`` requests. The server and the direct call use the same number of torch threads,
and are never measured at the same time. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import client  # noqa: E402
from serving.launch import TritonServer  # noqa: E402
from serving.request import parse_request, to_inputs  # noqa: E402
from serving.triton_model import generate, load_model  # noqa: E402


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:  # nearest-rank
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]

    return {"p50": round(statistics.median(ordered), 4), "p95": round(pick(0.95), 4), "mean": round(
        statistics.fmean(ordered), 4), "n": len(ordered)}


def _interleaved(paths: dict, count: int, warmup: int) -> dict[str, list[float]]:
    """Latencies of every path, measured round-robin (rotating the order) so that load from elsewhere on a shared
    machine falls on all paths alike."""
    names = list(paths)
    for _ in range(warmup):
        for name in names:
            paths[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(count):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            paths[name]()
            out[name].append(time.perf_counter() - start)
    return out


def _throughput(fn, clients: int, per_client: int) -> dict[str, float]:
    errors: list[str] = []

    def worker():
        for _ in range(per_client):
            try:
                fn()
            except Exception as exc:  # counted, not raised: one bad response must not hide the numbers
                errors.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done = clients * per_client - len(errors)
    return {"clients": clients, "videos": done, "errors": len(errors), "seconds": round(wall, 3),
            "videos_per_s": round(done / wall, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=20, help="measured requests per path (and per client)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--instances", type=int, default=1, help="Triton instances per model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    params = {"num_frames": args.frames, "height": args.size, "width": args.size, "steps": args.steps, "seed": 43}
    inputs = to_inputs("a red kite flies over a green hill", **params)

    # direct: the function the Triton model runs, in this process (parse included, as the server does it)
    model = load_model("tiny")

    def direct():
        return generate(model, parse_request(inputs, model.defaults, model.limits))[0]

    with TritonServer("tiny", instance_count=args.instances, exit_timeout=5,
                      parameters={"torch_threads": str(threads)}) as server:
        http = server.http_url.removeprefix("http://")
        paths = {
            "direct": direct,
            "http": lambda: client.infer_http(http, inputs).data,
            "grpc": lambda: client.infer_grpc(server.grpc_url, inputs).data,
            "grpc_stream": lambda: client.infer_grpc_stream(server.grpc_url, inputs).data,
        }
        outputs = {name: fn() for name, fn in paths.items()}
        same_bytes = len(set(outputs.values())) == 1
        latency = _interleaved(paths, args.requests, args.warmup)
        throughput = [_throughput(paths["http"], c, args.requests) for c in (1, 2, 4)]
    direct = latency.pop("direct")

    direct_stats = _percentiles(direct)
    result = {
        "bench": "serve",
        "model": "tiny",
        "request": params,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "triton_instances": args.instances,
        "same_bytes_as_direct": same_bytes,
        "latency_s": {"direct": direct_stats, **{k: _percentiles(v) for k, v in latency.items()}},
        "overhead_ratio_p50": {k: round(_percentiles(v)["p50"] / direct_stats["p50"], 3) for k, v in latency.items()},
        "overhead_s_p50": {k: round(_percentiles(v)["p50"] - direct_stats["p50"], 4) for k, v in latency.items()},
        "throughput_http": throughput,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

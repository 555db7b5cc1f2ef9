"""Context-/CFG-parallel DiT denoising step: 1 vs N processes. Per-step time, per-rank peak memory, bytes sent.

    .venv/bin/python bench/parallel.py --layers 4 --height 256 --width 256 --frames 9 --steps 3
    python bench/parallel.py --layers 28 --height 768 --width 768 --frames 144 --dtype bf16   # on GPUs

One "step" is one transformer forward on the CFG batch (2 samples: unconditional + conditional), what a denoising
step costs, at the V2 XL-2 width (1152 wide, 16 heads, T5 4096 captions; ``--layers`` reduces the depth). Modes:
``none`` (1 process), ``ulysses=N`` and ``cfg`` (N / 2 processes, torch.multiprocessing, gloo on CPU, NCCL on GPUs
when there are enough of them). Communication is counted by wrapping the collectives the step uses
(funcol all-to-all / all-gather, dist all-reduce / all-gather): bytes each rank sends per step. Peak memory per rank:
``ru_maxrss`` on CPU (the whole process: weights included), ``max_memory_allocated`` on CUDA. Prints JSON lines,
one per mode, then a summary with the compute/communication split.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _count_collectives(counter: dict) -> None:
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    def wrap(mod, name, nbytes):
        orig = getattr(mod, name)

        def fn(*args, **kwargs):
            world = dist.get_world_size()  # the 2-process modes use one group of all ranks
            counter["bytes"] += nbytes(args, world)
            counter["calls"] += 1
            return orig(*args, **kwargs)

        setattr(mod, name, fn)

    # bytes this rank sends: all-to-all (N-1)/N of its tensor; all-gather its tensor to N-1 peers; all-reduce
    # (ring) 2 (N-1)/N of the tensor
    wrap(funcol, "all_to_all_single", lambda a, n: a[0].numel() * a[0].element_size() * (n - 1) // n)
    wrap(funcol, "all_gather_tensor", lambda a, n: a[0].numel() * a[0].element_size() * (n - 1))
    wrap(dist, "all_reduce", lambda a, n: 2 * a[0].numel() * a[0].element_size() * (n - 1) // n)
    wrap(dist, "all_gather", lambda a, n: a[1].numel() * a[1].element_size() * (n - 1))


def worker(rank: int, world: int, port: int, out_dir: str, args: dict) -> None:
    import torch
    import torch.distributed as dist

    from easyanimate.config import load_config
    from easyanimate.models.transformer3d import Transformer3DModel
    from easyanimate.parallel import apply_parallel
    from easyanimate.runtime import tune_allocator

    tune_allocator()
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    if not cuda and args["threads"]:
        torch.set_num_threads(args["threads"])
    counter = {"bytes": 0, "calls": 0}
    _count_collectives(counter)
    dtype = torch.bfloat16 if args["dtype"] == "bf16" else torch.float32
    cfg = load_config("v2_512", [f"model.transformer.num_layers={args['layers']}"])
    torch.manual_seed(0)
    model = Transformer3DModel(**cfg.model.transformer.to_model_kwargs()).to(device, dtype).eval()
    setting = apply_parallel(model, args["mode"])
    t = cfg.model.transformer
    g = torch.Generator().manual_seed(0)
    lf = 1 if args["frames"] == 1 else args["frames"] // 9 * 3
    inputs = {"hidden_states": torch.randn(2, t.in_channels, lf, args["height"] // 8, args["width"] // 8,
                                           generator=g).to(device, dtype),
              "timestep": torch.tensor([500, 500], device=device),
              "encoder_hidden_states": torch.randn(2, 120, t.caption_channels, generator=g).to(device, dtype),
              "encoder_attention_mask": torch.ones(2, 120, dtype=torch.long, device=device)}
    times = []
    with torch.no_grad():
        for i in range(args["warmup"] + args["steps"]):
            if i == args["warmup"]:
                counter.update(bytes=0, calls=0)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
            if world > 1:
                dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**inputs, return_dict=False)
            if cuda:
                torch.cuda.synchronize()
            if i >= args["warmup"]:
                times.append(time.perf_counter() - t0)
    rec = {"rank": rank, "seconds_per_step": statistics.median(times), "parallel": str(setting),
           "bytes_sent_per_step": counter["bytes"] // args["steps"], "collectives_per_step": counter["calls"] // args["steps"],
           "peak_memory_gb": round((torch.cuda.max_memory_allocated() if cuda else
                                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30, 3),
           "device": torch.cuda.get_device_name() if cuda else "cpu", "threads": torch.get_num_threads()}
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(rec))
    if world > 1:
        dist.destroy_process_group()


def run_mode(mode: str, args: dict) -> dict:
    import torch.multiprocessing as mp

    from easyanimate.parallel import parse_parallel

    world = parse_parallel(mode).world_size
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp(prefix="bench-parallel-")
    mp.spawn(worker, args=(world, port, out, {**args, "mode": mode}), nprocs=world, join=True)
    ranks = [json.loads(Path(out, f"rank-{r}.json").read_text()) for r in range(world)]
    return {"mode": mode, "processes": world, "seconds_per_step": max(r["seconds_per_step"] for r in ranks),
            "peak_memory_gb_per_rank": [r["peak_memory_gb"] for r in ranks],
            "bytes_sent_per_step_per_rank": [r["bytes_sent_per_step"] for r in ranks],
            "collectives_per_step": ranks[0]["collectives_per_step"], "device": ranks[0]["device"],
            "threads_per_rank": ranks[0]["threads"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU (same for 1 and N)")
    ap.add_argument("--modes", default="none,ulysses=2,cfg")
    a = ap.parse_args()
    args = {k: getattr(a, k) for k in ("layers", "height", "width", "frames", "steps", "warmup", "dtype", "threads")}
    tokens = (1 if a.frames == 1 else a.frames // 9 * 3) * (a.height // 16) * (a.width // 16)
    results = []
    for mode in a.modes.split(","):
        rec = {**run_mode(mode, args), **args, "tokens_per_sample": tokens, "load_average": os.getloadavg()}
        print(json.dumps(rec), flush=True)
        results.append(rec)
    base = results[0]["seconds_per_step"]
    print(json.dumps({"summary": True, "speedup_vs_first": {r["mode"]: round(base / r["seconds_per_step"], 3)
                                                            for r in results},
                      "bytes_sent_per_step": {r["mode"]: max(r["bytes_sent_per_step_per_rank"]) for r in results}}))


if __name__ == "__main__":
    main()

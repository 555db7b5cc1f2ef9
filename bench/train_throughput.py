"""DiT training-step throughput: samples/s, tokens/s, peak memory; on a GPU also achieved TFLOP/s and MFU.

    .venv/bin/python bench/train_throughput.py --preset tiny --height 64 --width 64 --frames 9
    python bench/train_throughput.py --preset v2_512 --height 512 --width 512 --frames 9,36,144 \\
        --dtype bf16 --gradient-checkpointing            # on a GPU

One training step = forward + ε/VLB-style MSE loss + backward + AdamW step, on random latents and caption embeddings
of the preset's shapes (the VAE and text encoder are frozen and cached in real training, so they are not timed).
Model FLOPs are counted once per shape with torch's FlopCounterMode on a forward pass (matmuls + SDPA) and a step
is 3× that (forward + backward, recompute from checkpointing NOT counted, the usual MFU convention). Prints JSON.

Per-phase breakdown: every case reports forward / backward / optimizer (clip + AdamW + zero_grad) separately, each
as wall seconds, CPU seconds (user + system, from getrusage) and minor page faults per step; CPU time and faults are
what to compare on a busy machine, where wall time is noisy.

Variants (``--variant``): ``ours`` = what the trainers do (``easyanimate.runtime``: glibc allocator tuning + fused
AdamW where supported); ``plain`` = a plain PyTorch loop over the same module (default AdamW, default allocator).
``--compare R`` runs both R times each in fresh processes, interleaved (plain, ours, plain, ours, ...), and prints
one JSON line per run plus a summary line with the medians and the plain/ours ratios:

    .venv/bin/python bench/train_throughput.py --preset v2_512 --set model.transformer.num_layers=4 \\
        --height 128 --width 128 --frames 9 --steps 3 --warmup 2 --compare 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate.config import load_config  # noqa: E402
from easyanimate.models.transformer3d import Transformer3DModel  # noqa: E402
from easyanimate.runtime import adamw, allocator_state, tune_allocator  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets
PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def device_peak(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def forward_flops(model, inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs, return_dict=False)
    return int(counter.get_total_flops())


def make_inputs(cfg, batch, frames, height, width, device, dtype):
    t = cfg.model.transformer
    latent_frames = 1 if frames == 1 else frames // 9 * 3
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(batch, t.in_channels, latent_frames, height // 8, width // 8, generator=g)
        .to(device, dtype),
        "timestep": torch.randint(0, 1000, (batch,), generator=g).to(device),
        "encoder_hidden_states": torch.randn(batch, cfg.model.text_encoder.max_length, t.caption_channels,
                                             generator=g).to(device, dtype),
        "encoder_attention_mask": torch.ones(batch, cfg.model.text_encoder.max_length, dtype=torch.long).to(device),
    }


def run_case(model, opt, cfg, args, frames, device, dtype) -> dict:
    inputs = make_inputs(cfg, args.batch, frames, args.height, args.width, device, dtype)
    lat = inputs["hidden_states"]
    p = cfg.model.transformer.patch_size
    tokens = lat.shape[2] * (lat.shape[3] // p) * (lat.shape[4] // p) * args.batch
    flops = forward_flops(model, inputs) * 3
    target = torch.randn(lat.shape[0], cfg.model.transformer.out_channels, *lat.shape[2:], device=device, dtype=dtype)

    def usage():
        r = resource.getrusage(resource.RUSAGE_SELF)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter(), r.ru_utime + r.ru_stime, r.ru_minflt

    phases = {"forward": [], "backward": [], "optimizer": []}

    def step(record: bool):
        u0 = usage()
        out = model(**inputs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        u1 = usage()
        loss.backward()
        u2 = usage()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        u3 = usage()
        if record:
            for name, a, b in (("forward", u0, u1), ("backward", u1, u2), ("optimizer", u2, u3)):
                phases[name].append((b[0] - a[0], b[1] - a[1], b[2] - a[2]))

    for _ in range(args.warmup):
        step(False)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    breakdown = {name: {"wall_s": round(statistics.median(v[0] for v in vals), 4),
                        "cpu_s": round(statistics.median(v[1] for v in vals), 4),
                        "minor_faults": int(statistics.median(v[2] for v in vals))}
                 for name, vals in phases.items()}
    res = {"frames": frames, "latent_shape": list(lat.shape), "tokens_per_sample": tokens // args.batch,
           "seconds_per_step": round(dt, 4), "samples_per_s": round(args.batch / dt, 4),
           "tokens_per_s": round(tokens / dt, 1), "model_gflop_per_step": round(flops / 1e9, 3),
           "achieved_tflops": round(flops / dt / 1e12, 5),
           "phases": breakdown}
    if device.type == "cuda":
        res["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        peak = device_peak(torch.cuda.get_device_name())
        if peak:
            res["mfu"] = round(flops / dt / 1e12 / peak, 4)
    else:
        res["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return res


def compare(args, argv: list[str]) -> None:
    """Run ``plain`` and ``ours`` R times each, interleaved, each in a fresh process; print lines + a summary."""
    base, skip = [], False
    for a in argv:  # drop "--compare R" / "--compare=R"
        if skip or a.startswith("--compare="):
            skip = False
            continue
        if a == "--compare":
            skip = True
            continue
        base.append(a)
    runs: dict[str, list[dict]] = {"plain": [], "ours": []}
    for r in range(args.compare):
        for variant in ("plain", "ours"):
            cmd = [sys.executable, __file__, *base, "--variant", variant, "--json-line"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rec = json.loads(out)
            rec["repeat"] = r
            print(json.dumps(rec), flush=True)
            runs[variant].append(rec)

    def med(variant, key, phase=None):
        vals = []
        for rec in runs[variant]:
            case = rec["cases"][0]
            vals.append(case[key] if phase is None else case["phases"][phase][key])
        return statistics.median(vals)

    summary = {"summary": True, "repeats": args.compare, "load_average": os.getloadavg()}
    for variant in runs:
        summary[variant] = {"step_wall_s": med(variant, "seconds_per_step"),
                            **{f"{ph}_{k}": med(variant, k, ph) for ph in ("forward", "backward", "optimizer")
                               for k in ("wall_s", "cpu_s", "minor_faults")}}
    summary["plain_over_ours"] = {k: round(summary["plain"][k] / summary["ours"][k], 2)
                                  for k in summary["ours"] if summary["ours"][k]}
    print(json.dumps(summary), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--frames", default="9", help="comma-separated frame counts (1 or multiples of 9)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. model.transformer.num_layers=4 (repeatable)")
    ap.add_argument("--variant", default="ours", choices=["ours", "plain"],
                    help="ours: easyanimate.runtime (allocator tuning + fused AdamW); plain: a plain PyTorch loop")
    ap.add_argument("--plain", dest="variant", action="store_const", const="plain", help="= --variant plain")
    ap.add_argument("--compare", type=int, default=0, metavar="R",
                    help="run plain and ours R times each in fresh processes, interleaved, and summarise")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json-line", action="store_true", help="print one JSON line instead of indented JSON")
    args = ap.parse_args()
    if args.compare:
        compare(args, sys.argv[1:])
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant == "ours":
        tune_allocator()

    cfg = load_config(args.preset, args.set)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    model = Transformer3DModel(**cfg.model.transformer.to_model_kwargs()).to(device, dtype)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    if args.variant == "ours":
        opt = adamw(model.parameters(), lr=1e-5, eps=1e-10)
    else:  # what a plain loop writes (on CUDA torch picks foreach itself)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-10)
    runner = torch.compile(model) if args.compile else model
    cases = []
    for frames in (int(f) for f in args.frames.split(",")):
        try:
            cases.append(run_case(runner, opt, cfg, args, frames, device, dtype))
        except torch.OutOfMemoryError as exc:
            cases.append({"frames": frames, "error": f"out of memory: {exc}".splitlines()[0]})
            torch.cuda.empty_cache()
    print(json.dumps({
        "variant": args.variant, "allocator": allocator_state(),
        "optimizer": {k: opt.defaults.get(k) for k in ("fused", "foreach")},
        "preset": args.preset, "overrides": args.set,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
        "height": args.height, "width": args.width, "batch": args.batch,
        "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile,
        "params": sum(p.numel() for p in model.parameters()), "cases": cases,
    }, indent=None if args.json_line else 2))


if __name__ == "__main__":
    main()

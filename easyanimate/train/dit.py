"""Train the EasyAnimate V2 DiT (the trainable modules, or a LoRA): V2's ``train_t2iv.py`` recipe on accelerate.

``train_dit(cfg, data, output)`` reads top to bottom:

1. accelerator (devices, mixed precision, DDP/DeepSpeed, per-rank seeds) and tracker;
2. the pipeline from ``cfg.model`` (a folder, or random weights of the configured shapes); VAE and text encoder frozen;
3. what trains: parameters whose name contains one of ``train.trainable_modules`` (V2: transformer_blocks, proj_out,
   pos_embed, long_connect_fc), or only LoRA adapters on every Linear (``lora=True``);
4. AdamW + a diffusers LR schedule + optional EMA (diffusers ``EMAModel``, checkpointed as ``transformer_ema``);
5. data: held-out validation clips, this rank's shard of bucketed batches, caption embeddings computed once;
6. resume (``"latest"`` or a folder): weights, optimizer, LR schedule, EMA, RNG and the data position;
7. the loop: VAE latents (9-frame chunks, ``.sample()`` × scaling factor) → ``t ~ U{0..999}`` → DDPM noising →
   ε (+ learned-range variance) prediction → ``loss = mean_flat((ε − ε̂)²) + VLB`` (guided-diffusion's
   LEARNED_RANGE loss, mean detached inside the VLB) → clip → step; logging, fixed-timestep validation loss, sample
   MP4s and checkpoints on their cadences;
8. ``output/final/``: a pipeline folder (EMA weights when EMA is on), or with LoRA ``lora.safetensors`` (official
   format) + ``peft/``.

Every rank appends what it trained on to ``output/rank-<r>-samples.jsonl`` (and the digest of its final weights), so
a run can be audited for disjoint shards and identical replicas.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import Config
from ..data.dataset import build_dataloader, load_train_validation, with_frame_rule
from ..fsutil import replace_dir
from ..pipeline import build_pipeline
from ..schedulers import make_scheduler, sampler_name, training_scheduler_kwargs
from ..tracking import JsonlTracker, NullTracker, Tracker
from ..video import write_video
from .common import (
    Throughput,
    drop_metrics_after,
    fill_deepspeed_config,
    grad_norm,
    latent_tokens,
    load_checkpoint,
    load_tree,
    progress_bar,
    resolve_resume,
    save_checkpoint,
    setup_accelerator,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# the diffusion loss (guided-diffusion: linear betas, ε-prediction, LEARNED_RANGE variance, MSE + VLB)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood (nats) of ``x`` under a Gaussian discretised into 2/255-wide bins on [-1, 1]
    (guided-diffusion)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    """The training-side quantities of a DDPM schedule (float64 tables, gathered per sample as float32).

    ``betas``: ``(T,)`` — take them from the ``DDPMScheduler`` that noises the latents so both agree.
    """

    def __init__(self, betas: torch.Tensor, prediction_type: str = "epsilon") -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type: expected epsilon, v_prediction or sample, got {prediction_type!r}")
        self.prediction_type = prediction_type
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D schedule of at least 2 steps, got shape {tuple(betas.shape)}")
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.betas = betas
        self.alphas_cumprod = ac
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # the variance at t=0 is 0: its log is clipped to the t=1 value (guided-diffusion)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * torch.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / ac - 1.0)
        self.log_betas = torch.log(betas)

    @classmethod
    def from_scheduler(cls, scheduler, prediction_type: str = "epsilon") -> GaussianDiffusion:
        return cls(scheduler.betas.double(), prediction_type)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = table.to(t.device)[t].float()
        return out.view(-1, *([1] * (like.ndim - 1))).to(like.device)

    def q_posterior(self, x_start, x_t, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x_start + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t)

    def p_mean_logvar(self, model_output, x_t, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Model mean (from ε̂, no clipping — as in training) and learned-range log-variance.

        ``model_output``: ``(B, 2C, …)`` = ε̂ (C channels) and v (C channels, in [-1, 1] ideally); the log variance is
        ``frac · log β_t + (1 − frac) · log β̃_t`` with ``frac = (v + 1) / 2``.
        """
        eps, v = model_output.chunk(2, dim=1)
        min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._at(self.log_betas, t, x_t)
        frac = (v + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
        pred_xstart = self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t \
            - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        mean, _ = self.q_posterior(pred_xstart, x_t, t)
        return mean, log_var

    def vlb_terms(self, model_output, x_start, x_t, t) -> torch.Tensor:
        """Per-sample VLB in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the discretised decoder NLL
        at t = 0 (both mean over non-batch dims, divided by log 2). Gradients flow into whatever ``model_output``
        carries; the trainer detaches the ε half (frozen mean)."""
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        mean, log_var = self.p_mean_logvar(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def to_epsilon(self, model_output, x_t, t) -> torch.Tensor:
        """The noise that the first C channels of ``model_output`` (x0, v or ε, by ``prediction_type``) imply."""
        pred = model_output[:, :x_t.shape[1]]
        if self.prediction_type == "epsilon":
            return pred
        ac = self._at(self.alphas_cumprod, t, x_t)
        if self.prediction_type == "v_prediction":
            return ac.sqrt() * pred + (1.0 - ac).sqrt() * x_t
        return (x_t - ac.sqrt() * pred) / (1.0 - ac).sqrt()

    def training_losses(self, model_output, x_start, x_t, t, noise) -> dict[str, torch.Tensor]:
        """V2's loss per sample: ``mse = mean_flat((ε − ε̂)²)``, ``vb`` = VLB with ε̂ detached, ``loss = mse + vb``.

        A model without learned variance (``model_output`` with C channels) gets ``loss = mse``, ``vb = 0``. With
        ``prediction_type`` "v_prediction" or "sample" the first C channels are compared with v = √ᾱ·ε − √(1−ᾱ)·x0 or
        with x0, and ``vb = 0`` (any variance channels get no loss).
        """
        c = x_start.shape[1]
        if model_output.shape[1] not in (c, 2 * c):
            raise ValueError(f"model output has {model_output.shape[1]} channels; expected {c} or {2 * c}")
        if self.prediction_type != "epsilon":
            ac = self._at(self.alphas_cumprod, t, x_start)
            target = x_start if self.prediction_type == "sample" else ac.sqrt() * noise - (1.0 - ac).sqrt() * x_start
            mse = mean_flat((target - model_output[:, :c]) ** 2)
            return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
        if model_output.shape[1] == 2 * c:
            eps, v = model_output[:, :c], model_output[:, c:]
            vb = self.vlb_terms(torch.cat([eps.detach(), v], dim=1), x_start, x_t, t)
        elif model_output.shape[1] == c:
            eps, vb = model_output, torch.zeros(len(x_start), device=model_output.device)
        else:
            raise ValueError(f"model output has {model_output.shape[1]} channels; expected {c} or {2 * c}")
        mse = mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def make_noise_scheduler(num_train_timesteps: int, zero_terminal_snr: bool = False):
    """guided-diffusion's linear schedule (β 1e-4 → 0.02 at 1000 steps, scaled by 1000/T otherwise), as diffusers'
    ``DDPMScheduler`` (its ``add_noise`` noises the latents; its betas feed ``GaussianDiffusion``); with
    ``zero_terminal_snr`` its betas are rescaled so that ᾱ at the last step is 0 (pure noise)."""
    from diffusers import DDPMScheduler

    scale = 1000.0 / num_train_timesteps
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=scale * 1e-4, beta_end=scale * 0.02,
                         beta_schedule="linear", rescale_betas_zero_snr=zero_terminal_snr)


# ---------------------------------------------------------------------------------------------------------------------
# caption embeddings, computed once


class TextEmbeddingCache:
    """caption → (embeds ``(L, D)``, mask ``(L,)``), computed once per unique caption by the frozen text encoder.

    Stored in ``<folder>/text_embeddings.safetensors`` (keyed by the caption's sha1; the encoder and max length in the
    metadata), so a resumed run reuses them. Disabled (``enabled=False``): every batch is encoded on the fly.
    """

    FILE = "text_embeddings.safetensors"

    def __init__(self, pipe, entries: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, dtype: torch.dtype):
        self.pipe = pipe
        self.entries = entries
        self.dtype = dtype

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    @classmethod
    def build(cls, pipe, captions: Iterable[str], folder: Path, accelerator, enabled: bool = True,
              dtype: torch.dtype = torch.float32, batch_size: int = 8) -> TextEmbeddingCache:
        if not enabled:
            return cls(pipe, None, dtype)
        path = folder / cls.FILE
        ident = {"encoder": str(getattr(pipe, "text_encoder_ref", "") or type(pipe.text_encoder).__name__),
                 "max_length": str(pipe.max_sequence_length), "lowercase": str(pipe.lowercase_prompts),
                 "dtype": str(dtype)}
        wanted = sorted(set(captions))
        if accelerator.is_main_process:
            stored: dict[str, torch.Tensor] = {}
            if path.is_file():
                from safetensors import safe_open

                with safe_open(str(path), "pt") as fh:
                    if (fh.metadata() or {}) == ident:
                        stored = {k: fh.get_tensor(k) for k in fh.keys()}
            missing = [t for t in wanted if f"{cls.key(t)}.embeds" not in stored]
            for i in range(0, len(missing), batch_size):
                chunk = missing[i:i + batch_size]
                with torch.no_grad():
                    embeds, mask = pipe.encode_prompt(chunk, device="cpu", dtype=dtype)
                for text, e, m in zip(chunk, embeds, mask, strict=True):
                    stored[f"{cls.key(text)}.embeds"] = e.contiguous()
                    stored[f"{cls.key(text)}.mask"] = m.contiguous()
            if missing or not path.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{cls.FILE}.", dir=folder)
                os.close(fd)
                save_file(stored, tmp, metadata=ident)
                os.replace(tmp, path)
        accelerator.wait_for_everyone()
        tensors = load_file(str(path))
        entries = {}
        for text in wanted:
            k = cls.key(text)
            entries[text] = (tensors[f"{k}.embeds"], tensors[f"{k}.mask"])
        return cls(pipe, entries, dtype)

    def __call__(self, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked ``(B, L, D)`` embeddings and ``(B, L)`` mask for a batch of captions."""
        if self.entries is None:
            with torch.no_grad():
                return self.pipe.encode_prompt(list(texts), device=device, dtype=self.dtype)
        missing = [t for t in texts if t not in self.entries]
        if missing:
            raise KeyError(f"caption not in the embedding cache: {missing[0]!r}")
        embeds = torch.stack([self.entries[t][0] for t in texts]).to(device)
        mask = torch.stack([self.entries[t][1] for t in texts]).to(device)
        return embeds, mask


# ---------------------------------------------------------------------------------------------------------------------
# named steps


def load_pipeline(cfg: Config, device: torch.device):
    """The pipeline of ``cfg.model``; the transformer trains in float32 (master weights), VAE/text encoder frozen.
    A fresh pipeline (no ``model.pretrained``) takes its VAE from ``train.vae.init_from`` when set (the demo preset's
    ``bundled:demo_vae``): a DiT run without a VAE stage trains on the VAE the config starts from, not on random
    weights."""
    pipe = build_pipeline(cfg.model, sampler=cfg.generate.sampler)
    if not cfg.model.pretrained and cfg.train.vae.init_from:
        from .vae import build_vae

        pipe.register_modules(vae=build_vae(cfg).to(pipe.vae.dtype))
    if pipe.transformer.config.in_channels != pipe.vae.config.latent_channels:
        raise ValueError(f"transformer in_channels={pipe.transformer.config.in_channels} but the VAE has "
                         f"{pipe.vae.config.latent_channels} latent channels")
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
    pipe.vae.to(device)
    pipe.transformer.to(device=device, dtype=torch.float32)
    pipe.transformer.train()
    return pipe


def select_trainable(transformer: torch.nn.Module, train_cfg, lora: bool) -> list[torch.nn.Parameter]:
    """V2's selection: parameters whose name contains a ``trainable_modules`` entry; with ``lora`` only the adapters."""
    if lora:
        from .lora import add_lora

        add_lora(transformer, train_cfg.lora_rank, train_cfg.lora_alpha)
    else:
        for name, p in transformer.named_parameters():
            p.requires_grad_(any(s in name for s in train_cfg.trainable_modules))
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no trainable parameters: train.trainable_modules={list(train_cfg.trainable_modules)} "
                         "matches no parameter name of the transformer")
    if train_cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return params


def make_optimizer(params: list[torch.nn.Parameter], train_cfg, lora: bool, num_processes: int):
    """AdamW (V2's β, weight decay, ε) + a diffusers LR schedule.

    accelerate steps a prepared scheduler once per process per optimizer step, so warmup/total are scaled by the
    number of processes (as V2's script does).
    """
    from diffusers.optimization import get_scheduler

    from easyanimate.runtime import adamw

    lr = train_cfg.lora_learning_rate if lora else train_cfg.learning_rate
    # fused AdamW where the device has the kernel (CUDA, CPU): one pass per tensor, no param-sized temporaries
    optimizer = adamw(params, lr=lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                      weight_decay=train_cfg.adam_weight_decay, eps=train_cfg.adam_epsilon)
    scheduler = get_scheduler(train_cfg.lr_scheduler, optimizer=optimizer,
                              num_warmup_steps=train_cfg.lr_warmup_steps * num_processes,
                              num_training_steps=train_cfg.max_steps * num_processes)
    return optimizer, scheduler


class LatentEncoder:
    """Pixels ``(B, 3, F, H, W)`` in [-1, 1] → scaled latents, through the frozen VAE's 9-frame chunks.

    Training draws ``posterior.sample()`` (global RNG, restored on resume). ``cache=True`` encodes each dataset index
    once with a generator seeded by ``(seed, index)`` and reuses it (fixes that clip's frames and VAE sample).
    Validation uses the posterior mean, cached per validation index.
    """

    def __init__(self, vae, device, cache: bool, seed: int) -> None:
        self.vae, self.device, self.cache, self.seed = vae, device, cache, int(seed)
        self.scale = float(vae.config.scaling_factor)
        self._train: dict[tuple, torch.Tensor] = {}
        self._val: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def train(self, pixels: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        pixels = pixels.to(self.device, self.vae.dtype)
        if not self.cache:
            return self.vae.encode_chunked(pixels, sample=True).float() * self.scale
        out = []
        for x, idx in zip(pixels, indices, strict=True):
            key = (int(idx), tuple(x.shape))  # the same index may come with another clip length next epoch
            if key not in self._train:
                g = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + int(idx))
                self._train[key] = (self.vae.encode_chunked(x[None], sample=True, generator=g)[0].float()
                                    * self.scale).cpu()
            out.append(self._train[key])
        return torch.stack(out).to(self.device)

    @torch.no_grad()
    def validation(self, dataset, index: int) -> torch.Tensor:
        if index not in self._val:
            pixels = dataset[index]["pixel_values"][None].to(self.device, self.vae.dtype)
            self._val[index] = (self.vae.encode_chunked(pixels, sample=False).float() * self.scale).cpu()
        return self._val[index].to(self.device)


def diffusion_loss(model, batch_latents, embeds, mask, noise_scheduler, diffusion) -> dict[str, torch.Tensor]:
    """One training forward: noise at ``t ~ U{0..T-1}``, predict, V2's loss (per sample)."""
    latents = batch_latents
    noise = torch.randn_like(latents)
    t = torch.randint(0, diffusion.num_timesteps, (latents.shape[0],), device=latents.device)
    x_t = noise_scheduler.add_noise(latents, noise, t)
    out = model(x_t, t, encoder_hidden_states=embeds, encoder_attention_mask=mask, return_dict=False)[0]
    return diffusion.training_losses(out.float(), latents, x_t, t, noise)


@torch.no_grad()
def validation_loss(transformer, val_ds, latents: LatentEncoder, texts: TextEmbeddingCache, noise_scheduler,
                    diffusion, timesteps: Sequence[int], seed: int, device) -> dict[str, float]:
    """Mean loss over the held-out clips at FIXED timesteps with FIXED noise (comparable from step to step).

    Always in V2's ε terms, whatever the model predicts (x0 and v are turned into the noise they imply, without a
    VLB), so gates and champion comparisons hold across ``train.prediction_type``."""
    as_epsilon = GaussianDiffusion(diffusion.betas)
    was_training = transformer.training
    transformer.eval()
    per_t: dict[int, list[float]] = {int(t): [] for t in timesteps}
    parts: dict[str, list[float]] = {"mse": [], "vb": []}
    try:
        for i in range(len(val_ds)):
            x0 = latents.validation(val_ds, i)
            embeds, mask = texts([val_ds[i]["text"]], device)
            gen = torch.Generator("cpu").manual_seed(int(seed) * 7919 + i)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            for t_val in per_t:
                t = torch.full((1,), t_val, device=device, dtype=torch.long)
                x_t = noise_scheduler.add_noise(x0, noise, t)
                out = transformer(x_t.to(transformer.dtype), t, encoder_hidden_states=embeds.to(transformer.dtype),
                                  encoder_attention_mask=mask, return_dict=False)[0]
                if diffusion.prediction_type != "epsilon":
                    out = diffusion.to_epsilon(out.float(), x_t, t)
                terms = as_epsilon.training_losses(out.float(), x0, x_t, t, noise)
                per_t[t_val].append(float(terms["loss"].mean()))
                parts["mse"].append(float(terms["mse"].mean()))
                parts["vb"].append(float(terms["vb"].mean()))
    finally:
        transformer.train(was_training)
    result = {f"val_loss_t{t}": float(np.mean(v)) for t, v in per_t.items()}
    result["val_loss"] = float(np.mean([x for v in per_t.values() for x in v]))
    result["val_mse"] = float(np.mean(parts["mse"]))
    result["val_vb"] = float(np.mean(parts["vb"]))
    return result


@torch.no_grad()
def render_samples(pipe, cfg: Config, step: int, output: Path, device, tracker: Tracker) -> list[Path]:
    """A few sampler steps of the pipeline on ``train.sample_prompts`` (or ``generate.prompt``) → MP4s."""
    prompts = list(cfg.train.sample_prompts) or [cfg.generate.prompt]
    g = cfg.generate
    te_device = pipe.text_encoder.device
    pipe.text_encoder.to(device)
    was_training = pipe.transformer.training
    pipe.transformer.eval()
    paths = []
    try:
        for k, prompt in enumerate(prompts):
            video = pipe(prompt, negative_prompt=g.negative_prompt, num_frames=g.num_frames, height=g.height,
                         width=g.width, num_inference_steps=cfg.train.sample_steps, guidance_scale=g.guidance_scale,
                         generator=torch.Generator("cpu").manual_seed(g.seed + k), show_progress=False).videos[0]
            suffix = ".png" if g.num_frames == 1 else ".mp4"
            path = output / "samples" / (f"step-{step}{suffix}" if k == 0 else f"step-{step}-{k}{suffix}")
            write_video(path, video, fps=g.fps)
            tracker.log_artifact(path, "samples")
            paths.append(path)
    finally:
        pipe.transformer.train(was_training)
        pipe.text_encoder.to(te_device)
    return paths


def export_final(pipe, cfg: Config, output: Path, lora: bool, ema, params) -> Path:
    """``output/final``: the pipeline folder (full training) or the LoRA files; EMA weights when EMA is on."""
    final = output / "final"
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        if not lora:
            return pipe.save_pretrained(final)
        from .lora import save_lora_official, save_lora_peft

        tmp = Path(tempfile.mkdtemp(prefix=".final.", dir=output))
        try:
            save_lora_official(pipe.transformer, tmp / "lora.safetensors")
            save_lora_peft(pipe.transformer, tmp / "peft")
            base = {"pretrained": cfg.model.pretrained, "init_seed": cfg.model.init_seed,
                    "model": cfg.to_dict()["model"],
                    "note": "apply with easyanimate.models.lora.merge_lora(base.transformer, lora.safetensors, 1.0)"}
            (tmp / "base_model.json").write_text(json.dumps(base, indent=1))
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
    finally:
        if ema is not None:
            ema.restore(params)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): equal digests = identical replicas."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _config_drift(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    a, b = _flatten(stored), _flatten(now)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# main


def train_dit(cfg: Config, data: Path | str | None, output: Path | str, resume: str | None = None,
              lora: bool = False, *, tracker: Tracker | None = None) -> dict[str, Any]:
    """Train the DiT on the meta file ``data`` into ``output``; returns a summary (see the module docstring).

    Args:
        cfg: the resolved config (``cfg.model`` what to train, ``cfg.data`` how to read, ``cfg.train`` how to train).
        data: meta JSON/CSV (None → ``cfg.data.meta``).
        output: run folder: ``checkpoints/``, ``samples/``, ``final/``, ``cache/``, ``metrics.jsonl``.
        resume: None, ``"latest"`` (newest checkpoint under ``output``, or a fresh start) or a checkpoint folder.
        lora: train LoRA adapters (``train.lora_rank/alpha``, lr ``train.lora_learning_rate``) instead of the
            trainable modules.
        tracker: where params/metrics/artifacts go (default: ``JsonlTracker(output)`` on the main process).
    """
    from easyanimate.runtime import tune_allocator

    tune_allocator()  # keep freed large CPU blocks in the heap: no page-fault storm per step (easyanimate.runtime)
    t_start = time.perf_counter()
    output = Path(output)
    tc = cfg.train

    # 1. accelerator and tracker
    accelerator = setup_accelerator(tc, output)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    if not main:
        tracker = NullTracker()  # one process logs
    elif tracker is None:
        tracker = JsonlTracker(output)

    # 2. model (the init is seeded by model.init_seed, identical on every rank; training noise is per rank)
    pipe = load_pipeline(cfg, device)
    from accelerate.utils import set_seed

    set_seed(tc.seed, device_specific=True)
    transformer = pipe.transformer

    # 3. what trains
    params = select_trainable(transformer, tc, lora)

    # 4. optimizer, LR schedule, EMA; accelerate wraps model/optimizer/scheduler (not the loader: it shards itself)
    optimizer, lr_scheduler = make_optimizer(params, tc, lora, world)
    ema = None
    if tc.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=tc.ema_decay)
    fill_deepspeed_config(accelerator, tc, cfg.data.batch_size)
    model, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)

    # 5. data and caption embeddings
    train_ds, val_ds = load_train_validation(with_frame_rule(cfg.data, pipe.vae.frame_rule), data)  # the VAE's clip rule
    captions = [it["entry"].get("text", "") for it in train_ds.items] + [""]
    if val_ds is not None:
        captions += [it["entry"].get("text", "") for it in val_ds.items]
    texts = TextEmbeddingCache.build(pipe, captions, output / "cache", accelerator, enabled=tc.cache_text_embeddings,
                                     dtype=torch.float32)
    if tc.cache_text_embeddings and device.type != "cpu":
        pipe.text_encoder.to("cpu")  # not needed on the accelerator until samples are rendered
    else:
        pipe.text_encoder.to(device)
    latents = LatentEncoder(pipe.vae, device, tc.cache_latents, tc.seed)
    bad_t = [t for t in tc.validation_timesteps if not 0 <= t < tc.num_train_timesteps]
    if bad_t:
        raise ValueError(f"train.validation_timesteps must lie in [0, {tc.num_train_timesteps}), got {bad_t}")
    noise_scheduler = make_noise_scheduler(tc.num_train_timesteps, tc.zero_terminal_snr)
    diffusion = GaussianDiffusion.from_scheduler(noise_scheduler, tc.prediction_type)
    sampling = training_scheduler_kwargs(tc.prediction_type, tc.zero_terminal_snr)
    if sampling:  # samples, validation renders and the exported pipeline sample what this run trains
        name = sampler_name(pipe.scheduler)
        pipe.scheduler = make_scheduler("DDIM" if name in (None, "PNDM") else name, **sampling)

    # 6. resume
    step, epoch, data_state = 0, 0, None
    ckpt = resolve_resume(output, resume)
    if ckpt is not None:
        if bool(load_tree(ckpt, "extra").get("lora")) != bool(lora):
            raise ValueError(f"{ckpt} was written by a {'full' if lora else 'LoRA'} run; this run has lora={lora} "
                             "(resume with the same --lora setting)")
        extra = load_checkpoint(ckpt, models={"transformer": model}, optimizers={"transformer": optimizer},
                                schedulers={"transformer": lr_scheduler},
                                ema={"transformer": ema} if ema is not None else None, accelerator=accelerator)
        step, epoch, data_state = int(extra["step"]), int(extra["epoch"]), extra.get("data")
        if main:
            drop_metrics_after(output, step)  # rows a killed run logged after this checkpoint are logged again
        drift = _config_drift(extra.get("config", {}), cfg.to_dict())
        if drift and main:
            logger.warning("resuming %s with a changed config: %s", ckpt, ", ".join(drift[:10]))
    loader = build_dataloader(train_ds, cfg.data, rank=rank, world_size=world, epoch=epoch)
    if loader.batch_sampler.num_batches == 0:
        raise ValueError(f"no training batches for rank {rank}: {len(train_ds)} samples, batch_size "
                         f"{cfg.data.batch_size}, {world} processes")
    # each iter(loader) draws a worker base seed; from its own generator it leaves the training RNG alone, so a
    # resumed run (which starts a new iterator mid-epoch) consumes the same random numbers as an uninterrupted one
    loader.generator = torch.Generator().manual_seed(cfg.data.seed)
    if data_state:
        loader.batch_sampler.load_state_dict(data_state)
    if main:
        tracker.log_params({**_flatten(cfg.to_dict()), "lora": lora, "world_size": world, "data": str(data),
                            "trainable_params": sum(p.numel() for p in params),
                            "resumed_from": str(ckpt) if ckpt else ""})
        (output / "config.yaml").write_text(cfg.to_yaml())

    def checkpoint() -> Path:
        return save_checkpoint(
            output, step, models={"transformer": model}, optimizers={"transformer": optimizer},
            schedulers={"transformer": lr_scheduler}, ema={"transformer": ema} if ema is not None else None,
            extra={"step": step, "epoch": epoch, "data": loader.batch_sampler.state_dict(), "lora": lora,
                   "config": cfg.to_dict()},
            accelerator=accelerator, keep_last=tc.checkpoints_total_limit, trainable_only=lora)

    def evaluate() -> dict[str, float]:
        """Validation loss + sample videos on the main process (its own RNG streams: training RNG untouched)."""
        result: dict[str, float] = {}
        if main:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if val_ds is not None:
                    result = validation_loss(transformer, val_ds, latents, texts, noise_scheduler, diffusion,
                                             tc.validation_timesteps, tc.seed, device)
                    tracker.log_metrics(result, step)
                render_samples(pipe, cfg, step, output, device, tracker)
        accelerator.wait_for_everyone()
        return result

    # 7. the loop
    samples_log = output / f"rank-{rank}-samples.jsonl"
    meter = Throughput()
    bar = progress_bar(tc.max_steps, initial=step, accelerator=accelerator, desc="train-dit")
    patch = transformer.config.patch_size
    losses: list[float] = []
    window: dict[str, list[float]] = {"loss": [], "mse": [], "vb": [], "grad_norm": []}
    acc_loss: list[torch.Tensor] = []
    val: dict[str, float] = {}
    evaluated_at = -1
    last_ckpt: Path | None = ckpt
    while step < tc.max_steps:
        loader.batch_sampler.set_epoch(epoch)  # same epoch keeps a pending resume position
        for batch in loader:
            with accelerator.accumulate(model):
                x0 = latents.train(batch["pixel_values"], batch["index"].tolist())
                embeds, mask = texts(batch["text"], device)
                terms = diffusion_loss(model, x0, embeds, mask, noise_scheduler, diffusion)
                loss = terms["loss"].mean()
                accelerator.backward(loss)
                gn = None
                if accelerator.sync_gradients:
                    if tc.max_grad_norm > 0:
                        norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm)  # DeepSpeed clips itself
                        gn = float(norm) if norm is not None else float("nan")
                    else:
                        gn = grad_norm(params)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            _append_jsonl(samples_log, {"step": step + 1, "epoch": epoch, "index": batch["index"].tolist(),
                                        "file_path": batch["file_path"], "loss": loss.item()})
            stats = accelerator.gather(torch.stack([loss.detach(), terms["mse"].detach().mean(),
                                                    terms["vb"].detach().mean()])[None]).mean(0)
            acc_loss.append(stats)
            meter.update(x0.shape[0] * world, latent_tokens(x0.shape, patch) * world)
            if not accelerator.sync_gradients:
                continue

            # an optimizer step happened
            step += 1
            if ema is not None:
                ema.step(params)
            means = torch.stack(acc_loss).mean(0).tolist()  # over micro-batches and ranks
            acc_loss.clear()
            losses.append(means[0])
            for k, v in zip(("loss", "mse", "vb", "grad_norm"), (*means, gn if gn is not None else 0.0), strict=True):
                window[k].append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{means[0]:.4f}")
            if main and (step % tc.log_every == 0 or step == tc.max_steps):
                tracker.log_metrics({**{k: float(np.mean(v)) for k, v in window.items()},
                                     "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch,
                                     "samples_per_s": meter.samples_per_s, "tokens_per_s": meter.tokens_per_s}, step)
                window = {k: [] for k in window}
            if tc.validation_steps > 0 and step % tc.validation_steps == 0:
                val, evaluated_at = evaluate() or val, step
                meter.reset_clock()
            if tc.checkpointing_steps > 0 and step % tc.checkpointing_steps == 0:
                last_ckpt = checkpoint()
                meter.reset_clock()
            if step >= tc.max_steps:
                break
        else:
            epoch += 1  # the epoch ran out before max_steps
            continue
        break
    bar.close()
    if evaluated_at != step:
        val = evaluate() or val

    # 8. final artifacts
    _append_jsonl(samples_log, {"final_step": step, "weights_sha256": weights_digest(transformer)})
    final = output / "final"
    if main:
        final = export_final(pipe, cfg, output, lora, ema, params)
        tracker.log_artifact(final, "final")
    accelerator.wait_for_everyone()
    n = max(1, len(losses) // 5)
    summary = {
        "steps": step,
        "steps_this_run": len(losses),
        "final_loss": losses[-1] if losses else None,
        "loss_first_20pct": float(np.mean(losses[:n])) if losses else None,
        "loss_last_20pct": float(np.mean(losses[-n:])) if losses else None,
        "val_loss": val.get("val_loss"),
        "seconds": time.perf_counter() - t_start,
        "samples_per_s": meter.total_samples / max(1e-9, time.perf_counter() - t_start),
        "output": str(output),
        "final": str(final),
        "lora": str(final / "lora.safetensors") if lora else None,
        "last_checkpoint": str(last_ckpt) if last_ckpt else None,
        "resumed_from": str(ckpt) if ckpt else None,
        "world_size": world,
    }
    if main:
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}, step)
        tracker.close()
    accelerator.end_training()
    return summary


__all__ = ["GaussianDiffusion", "TextEmbeddingCache", "discretized_gaussian_log_likelihood", "make_noise_scheduler",
           "mean_flat", "normal_kl", "train_dit", "validation_loss"]

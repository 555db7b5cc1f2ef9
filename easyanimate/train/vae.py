"""Train (or fine-tune) the MagViT video VAE with V2's recipe; ``train_vae`` reads top to bottom.

Recipe (EasyAnimate V2 ``autoencoder_kl_32x32x4_mag.yaml`` + ``LPIPSWithDiscriminator``, in our own code):

- clips of ``train.vae.num_frames`` (9) frames, images as 1-frame clips, in [-1, 1]; a slice VAE
  (``slice_compression_vae``, the official slice configs) takes clips of 1 + 8k frames (e.g. 17) instead; with
  ``train.vae.crop`` (ours) a step trains on one random window of the batch, validation on whole clips;
- autoencoder loss = L1 (1.0) + L2 (0.1) + optional LPIPS (``perceptual_weight``, local weights) + KL (1e-6), see
  :mod:`easyanimate.train.losses` for the normalisation (and why V2's learned NLL log-variance is fixed at 0);
- from optimizer step ``disc_start`` on, hinge GAN with a 2D PatchGAN on frames and a 3D discriminator on clips;
  the generator term is weighted adaptively (ratio of gradient norms at the decoder's last conv × ``disc_weight``);
- Adam(β = 0.5, 0.9) at ``train.vae.learning_rate`` for the autoencoder and for the discriminators, each with the
  ``train.lr_scheduler`` schedule; mixed precision, gradient accumulation and clipping through accelerate.

Run folder (``output``)::

    params.json, metrics.jsonl, artifacts.jsonl   the default JsonlTracker (when no tracker is passed)
    samples/recon-<step>.mp4                        first validation clip: original | reconstruction
    checkpoints/checkpoint-<step>/                  vae/ (a VAE folder), discriminators/, both optimizers and
                                                    schedulers, RNG, data position (train/common.py)
    final/                                          the trained VAE (``AutoencoderKLMagvit.from_pretrained``)

Validation: PSNR/SSIM of ``decode(encode(x).latent_dist.mode())`` on the held-out clips (``data.validation_count``)
at step 0, every ``train.validation_steps`` and at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..config import BUNDLED_DIR, BUNDLED_PREFIX, Config, DataConfig, VAETrainConfig
from ..data.dataset import VideoTextDataset, build_dataloader, load_train_validation, with_frame_rule
from ..fsutil import replace_dir
from ..models.autoencoder_magvit import AutoencoderKLMagvit
from ..tracking import JsonlTracker, NullTracker
from ..video import write_video
from .common import (
    Throughput,
    drop_metrics_after,
    grad_norm,
    load_checkpoint,
    progress_bar,
    resolve_resume,
    save_checkpoint,
    setup_accelerator,
)
from .discriminators import Discriminator3D, NLayerDiscriminator2D
from .losses import (
    PerceptualLoss,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    kl_loss,
    psnr,
    reconstruction_loss,
    ssim,
)

logger = logging.getLogger(__name__)


def train_vae(cfg: Config, data: str | Path, output: str | Path, resume: str | None = None, *,
              tracker=None) -> dict[str, Any]:
    """Train the VAE on the meta JSON ``data``; write checkpoints, samples and ``output/final``; return a summary.

    ``resume``: None (fresh), ``"latest"`` (newest checkpoint under ``output``, or fresh when there is none) or a
    checkpoint folder. ``tracker``: any ``Tracker`` (default: ``JsonlTracker(output)``); only the main process logs.
    Summary: ``psnr_step0``, ``ssim_step0``, ``psnr_final``, ``ssim_final`` (None without validation clips, and on
    every process but the main one, which alone validates),
    ``steps``, ``resumed_from``, ``seconds``, ``final``, ``samples``, ``checkpoint``, ``output``.
    """
    started = time.time()
    output = Path(output)
    if cfg.train.vae.max_steps:  # the VAE's own step count (train.max_steps is the DiT's)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=cfg.train.vae.max_steps))
    from easyanimate.runtime import tune_allocator

    tune_allocator()  # keep freed large CPU blocks in the heap (easyanimate.runtime)
    accelerator = setup_accelerator(cfg.train, output)
    tracker = _main_tracker(tracker, output, accelerator)
    run = _build_run(cfg, Path(data), output, accelerator, tracker)
    checkpoint = resolve_resume(output, resume)
    if checkpoint is not None:
        _restore(run, checkpoint)
    tracker.log_params({**cfg.to_dict(), "run": {"task": "train_vae", "data": str(data), "output": str(output),
                                                 "resumed_from": str(checkpoint or "")}})
    if run.step == 0:
        run.val_step0 = _validate(run)
    _train_loop(run)
    final_metrics = run.last_val if run.last_val_step == run.step else _validate(run)
    last_ckpt = run.last_checkpoint if run.last_checkpoint_step == run.step else _checkpoint(run)
    final = _save_final(run)
    tracker.close()
    return {
        "psnr_step0": run.val_step0.get("val_psnr"), "ssim_step0": run.val_step0.get("val_ssim"),
        "psnr_final": final_metrics.get("val_psnr"), "ssim_final": final_metrics.get("val_ssim"),
        "steps": run.step, "resumed_from": str(checkpoint) if checkpoint else None,
        "seconds": round(time.time() - started, 3), "final": str(final), "samples": [str(p) for p in run.samples],
        "checkpoint": str(last_ckpt), "output": str(output),
    }


# --- the parts of a run ----------------------------------------------------------------------------------------------


class VAEWithPosterior(nn.Module):
    """encode → sample (or mode) → decode as ONE forward, so DDP sees a single call; returns
    ``(reconstruction [B, C, T, H, W], posterior mean, posterior logvar)``."""

    def __init__(self, vae: AutoencoderKLMagvit) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


class Discriminators(nn.Module):
    """The 2D PatchGAN (per frame) and, optionally, the 3D discriminator (per clip; 1-frame clips included).

    ``score(x)`` → ``{"2d": logits, "3d": logits}``; ``forward(real, fake)`` → ``{name: (real logits, fake logits)}``
    (one call, so DDP sees both passes as one forward and BatchNorm keeps separate real/fake statistics).
    The generator pass calls ``score`` on the unwrapped module, so under DDP the PatchGAN's BatchNorm running
    statistics drift apart between ranks (parameters stay identical); they are never used (the discriminators always
    run in train mode), DDP re-broadcasts rank 0's buffers at every discriminator forward, and rank 0's are saved.
    """

    def __init__(self, vcfg: VAETrainConfig) -> None:
        super().__init__()
        self.disc2d = NLayerDiscriminator2D(3, vcfg.disc_channels, vcfg.disc_layers)
        self.disc3d = Discriminator3D(3, vcfg.disc_3d_channels) if vcfg.disc_3d else None

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"2d": self.disc2d(x)}
        if self.disc3d is not None:
            out["3d"] = self.disc3d(x)
        return out

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        r, f = self.score(real), self.score(fake)
        return {k: (r[k], f[k]) for k in r}


@dataclass
class _Run:
    """Everything the loop touches (prepared objects and their unwrapped modules) and its position."""

    cfg: Config
    output: Path
    accelerator: Any
    tracker: Any
    ae: nn.Module  # prepared VAEWithPosterior
    vae: AutoencoderKLMagvit  # the unwrapped VAE inside it (saved, validated)
    discs: nn.Module  # prepared Discriminators
    discs_raw: Discriminators
    perceptual: PerceptualLoss | None
    opt_ae: Any
    opt_disc: Any
    sched_ae: Any
    sched_disc: Any
    loader: Any
    val_ds: VideoTextDataset | None
    step: int = 0
    val_step0: dict[str, float] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)
    last_val_step: int = -1
    last_checkpoint: Path | None = None
    last_checkpoint_step: int = -1
    samples: list[Path] = field(default_factory=list)
    throughput: Throughput = field(default_factory=Throughput)


def _main_tracker(tracker, output: Path, accelerator):
    if not accelerator.is_main_process:
        return NullTracker()
    return tracker if tracker is not None else JsonlTracker(output)


def _build_run(cfg: Config, data: Path, output: Path, accelerator, tracker) -> _Run:
    vcfg = cfg.train.vae
    if cfg.train.gradient_accumulation_steps < 1:
        raise ValueError(f"train.gradient_accumulation_steps must be >= 1, got {cfg.train.gradient_accumulation_steps}")
    vae = build_vae(cfg)
    with torch.random.fork_rng(devices=[]):  # same discriminators on every rank, global RNG untouched
        torch.manual_seed(cfg.model.init_seed + 1)
        discs = Discriminators(vcfg)
    perceptual = build_perceptual(vcfg)
    if perceptual is not None:
        perceptual.to(accelerator.device)
    data_cfg = vae_data_config(cfg, vae)
    train_ds, val_ds = load_train_validation(data_cfg, data, data_cfg.root or None)
    loader = build_dataloader(train_ds, data_cfg, rank=accelerator.process_index,
                              world_size=accelerator.num_processes)
    # every iter() draws a worker base seed; from the global RNG it would shift the posterior noise of a resumed run
    loader.generator = torch.Generator().manual_seed(data_cfg.seed)
    opt_ae, opt_disc = build_optimizers(vcfg, vae, discs)
    sched_ae, sched_disc = (build_scheduler(cfg, opt, accelerator.num_processes) for opt in (opt_ae, opt_disc))
    ae, discs_p, opt_ae, opt_disc, sched_ae, sched_disc = accelerator.prepare(
        VAEWithPosterior(vae), discs, opt_ae, opt_disc, sched_ae, sched_disc)
    return _Run(cfg=cfg, output=output, accelerator=accelerator, tracker=tracker, ae=ae,
                vae=accelerator.unwrap_model(ae).vae, discs=discs_p, discs_raw=accelerator.unwrap_model(discs_p),
                perceptual=perceptual, opt_ae=opt_ae, opt_disc=opt_disc, sched_ae=sched_ae, sched_disc=sched_disc,
                loader=loader, val_ds=val_ds)


def vae_source(source: str) -> Path:
    """``train.vae.init_from`` as a folder: ``bundled:<name>`` is a VAE that ships inside the package
    (``easyanimate/presets/weights/<name>/``, e.g. the demo's, made by ``make demo-vae``), anything else a path."""
    if not source.startswith(BUNDLED_PREFIX):
        return Path(source)
    return BUNDLED_DIR / source[len(BUNDLED_PREFIX):]  # an unknown name: the config check (or build_vae) says so


def build_vae(cfg: Config) -> AutoencoderKLMagvit:
    """``train.vae.init_from`` (a VAE folder, or a pipeline folder's ``vae/``), else ``model.vae`` shapes, random
    (seeded by ``model.init_seed`` without touching the global RNG)."""
    source = cfg.train.vae.init_from
    if source:
        path = vae_source(source)
        if (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"train.vae.init_from={source!r}: expected a VAE folder (config.json + "
                                    "*.safetensors) or a pipeline folder with vae/ inside")
        return AutoencoderKLMagvit.from_pretrained(str(path), torch_dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.model.init_seed)
        return AutoencoderKLMagvit(**cfg.model.vae.to_model_kwargs())


def build_perceptual(vcfg: VAETrainConfig) -> PerceptualLoss | None:
    """The LPIPS network when ``perceptual_weight > 0`` (it then needs ``perceptual_model``), else None."""
    if vcfg.perceptual_weight <= 0:
        return None
    if not vcfg.perceptual_model:
        raise ValueError(f"train.vae.perceptual_weight={vcfg.perceptual_weight} needs train.vae.perceptual_model "
                         "(a local LPIPS-VGG16 .safetensors file; none ships offline), or set perceptual_weight=0")
    return PerceptualLoss(vcfg.perceptual_model)


def vae_data_config(cfg: Config, vae: AutoencoderKLMagvit | None = None) -> DataConfig:
    """The data section for VAE training: fixed ``train.vae.num_frames`` clips (V2's VAE trainer takes fixed-length
    clips, so no random frame crop) and no caption dropout (captions are unused). The clip-length rule is the
    trained VAE's layout (``vae``, else ``model.vae``): 9k frames for V2's chunks, 1 + 8k for the slice VAE."""
    if vae is not None:
        rule = vae.frame_rule
    else:
        mv = cfg.model.vae
        rule = (1 if mv.slice_compression_vae else 0, mv.mini_batch_encoder)
    data_cfg = dataclasses.replace(cfg.data, num_frames=cfg.train.vae.num_frames, random_frame_crop=False,
                                   caption_dropout=0.0)
    return with_frame_rule(data_cfg, rule)


def build_optimizers(vcfg: VAETrainConfig, vae: nn.Module, discs: nn.Module):
    """Adam(β1, β2) = V2's (0.5, 0.9) at the same learning rate for the autoencoder and the discriminators."""
    betas = (vcfg.adam_beta1, vcfg.adam_beta2)
    return (torch.optim.Adam(vae.parameters(), lr=vcfg.learning_rate, betas=betas),
            torch.optim.Adam(discs.parameters(), lr=vcfg.learning_rate, betas=betas))


def build_scheduler(cfg: Config, optimizer, num_processes: int):
    """``train.lr_scheduler`` with ``train.lr_warmup_steps``; steps are multiplied by the process count because an
    accelerate-prepared scheduler advances once per process at every optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.train.lr_scheduler, optimizer,
                         num_warmup_steps=cfg.train.lr_warmup_steps * num_processes,
                         num_training_steps=max(1, cfg.train.max_steps) * num_processes)


# --- training ---------------------------------------------------------------------------------------------------------


def _batches(run: _Run):
    """Endless training batches; a new epoch reshuffles (the sampler's position is what checkpoints store)."""
    sampler = run.loader.batch_sampler
    empty_epochs = 0  # one empty pass is normal: a run resumed at the very end of an epoch
    while True:
        yielded = False
        for batch in run.loader:
            yielded = True
            yield batch
        empty_epochs = 0 if yielded else empty_epochs + 1
        if empty_epochs >= 2:
            raise ValueError("the training loader yields no batches (fewer clips than data.batch_size with "
                             "drop_last, or an empty dataset)")
        sampler.set_epoch(sampler.epoch + 1)


def _train_loop(run: _Run) -> None:
    tcfg, acc = run.cfg.train, run.accelerator
    if run.step >= tcfg.max_steps:
        return
    bar = progress_bar(tcfg.max_steps, initial=run.step, accelerator=acc, desc="train-vae")
    run.throughput.reset_clock()
    batches = _batches(run)
    while run.step < tcfg.max_steps:
        gan_on = run.step >= run.cfg.train.vae.disc_start  # V2: GAN factor on from global step disc_start
        with acc.accumulate(run.ae, run.discs):
            metrics = train_step(run, next(batches), gan_on)
        if not acc.sync_gradients:
            continue
        run.step += 1
        run.throughput.update(metrics.pop("batch_samples") * acc.num_processes * acc.gradient_accumulation_steps)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if run.step % max(1, tcfg.log_every) == 0 or run.step == tcfg.max_steps:
            metrics.update(samples_per_s=run.throughput.samples_per_s, epoch=run.loader.batch_sampler.epoch)
            run.tracker.log_metrics(metrics, step=run.step)
        if tcfg.validation_steps > 0 and run.step % tcfg.validation_steps == 0:
            _validate(run)
            run.throughput.reset_clock()
        if tcfg.checkpointing_steps > 0 and run.step % tcfg.checkpointing_steps == 0:
            _checkpoint(run)
            run.throughput.reset_clock()
    bar.close()


def train_step(run: _Run, batch: dict[str, Any], gan_on: bool) -> dict[str, float]:
    """One autoencoder update, then (with the GAN on) one discriminator update; returns the step's scalars (with
    gradient accumulation: one micro-batch, the optimizers step on the last one of each group)."""
    acc, vcfg = run.accelerator, run.cfg.train.vae
    x = random_crop(batch["pixel_values"], vcfg.crop, (run.cfg.data.seed, run.step)).to(acc.device)
    # autoencoder
    run.discs_raw.requires_grad_(False)  # the generator pass must not leave gradients in the discriminators
    with acc.autocast():
        recon, mean, logvar = run.ae(x, sample_posterior=vcfg.sample_posterior)
        rec, l1, l2 = reconstruction_loss(x, recon, vcfg.l1_weight, vcfg.l2_weight)
        nll = rec
        metrics: dict[str, float] = {}
        if run.perceptual is not None:
            p_loss = run.perceptual(x, recon).mean()
            nll = nll + vcfg.perceptual_weight * p_loss
            metrics["perceptual"] = p_loss.item()
        kl = kl_loss(mean, logvar, pixels_per_sample=x[0].numel())
        loss = nll + vcfg.kl_weight * kl
        if gan_on:
            g_loss = sum(hinge_g_loss(logits) for logits in run.discs_raw.score(recon).values())
            d_weight = adaptive_weight(nll, g_loss, run.vae.decoder.conv_out.weight, vcfg.disc_weight)
            loss = loss + d_weight * g_loss
            metrics.update(g_loss=g_loss.item(), d_weight=d_weight.item())
    acc.backward(loss)
    metrics["grad_norm"] = _clip(run, run.ae)
    metrics["lr"] = run.sched_ae.get_last_lr()[0]  # the rate this update uses
    run.opt_ae.step()
    run.sched_ae.step()
    run.opt_ae.zero_grad(set_to_none=True)
    metrics.update({name: value.item() for name, value in
                    (("loss", loss), ("rec_loss", rec), ("l1", l1), ("l2", l2), ("kl", kl), ("nll", nll))})
    metrics["batch_samples"] = int(x.shape[0])
    # discriminators
    run.discs_raw.requires_grad_(True)
    if gan_on:
        with acc.autocast():
            logits = run.discs(x, recon.detach())
            d_loss = sum(hinge_d_loss(real, fake) for real, fake in logits.values())
        acc.backward(d_loss)
        metrics["disc_grad_norm"] = _clip(run, run.discs)
        metrics["lr_disc"] = run.sched_disc.get_last_lr()[0]
        run.opt_disc.step()
        run.sched_disc.step()
        run.opt_disc.zero_grad(set_to_none=True)
        metrics["d_loss"] = d_loss.item()
        for name, (real, fake) in logits.items():
            metrics[f"logits_real_{name}"] = real.detach().float().mean().item()
            metrics[f"logits_fake_{name}"] = fake.detach().float().mean().item()
    return metrics


def random_crop(x: torch.Tensor, size: int, seed: tuple[int, ...]) -> torch.Tensor:
    """One ``size × size`` window of the batch ``x`` (``(B, C, F, H, W)``), the same for every clip, placed by
    ``seed`` (the data seed and the step: a resumed run crops where it would have); ``x`` itself when ``size`` is 0
    or covers the frame. A side smaller than ``size`` is kept whole."""
    h, w = x.shape[-2:]
    if size <= 0 or (size >= h and size >= w):
        return x
    rng = np.random.default_rng([int(s) for s in seed])
    th, tw = min(size, h), min(size, w)
    top, left = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
    return x[..., top:top + th, left:left + tw]


def _clip(run: _Run, model: nn.Module) -> float:
    """Clip at ``train.max_grad_norm`` (when > 0) on optimizer steps; the norm before clipping (nan between
    accumulation micro-steps)."""
    acc = run.accelerator
    if not acc.sync_gradients:
        return math.nan
    if run.cfg.train.max_grad_norm > 0:
        return float(acc.clip_grad_norm_(model.parameters(), run.cfg.train.max_grad_norm))
    return grad_norm(model.parameters())


# --- validation, checkpoints, final -----------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(vae: AutoencoderKLMagvit, x: torch.Tensor) -> torch.Tensor:
    """``decode(encode(x).latent_dist.mode())`` clamped to [-1, 1] (the validation reconstruction)."""
    return vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1.0, 1.0)


def _validate(run: _Run) -> dict[str, float]:
    """PSNR/SSIM over the validation clips (main process) and the side-by-side MP4 of the first one."""
    acc = run.accelerator
    metrics: dict[str, float] = {}
    if acc.is_main_process and run.val_ds is not None and len(run.val_ds):
        was_training = run.vae.training
        run.vae.eval()
        scores = []
        for i in range(len(run.val_ds)):
            x = run.val_ds[i]["pixel_values"][None].to(acc.device)
            with acc.autocast():
                y = reconstruct(run.vae, x).float()
            scores.append((psnr(x, y), ssim(x, y)))
            if i == 0:
                run.samples.append(_write_sample(run, x[0], y[0]))
        run.vae.train(was_training)
        metrics = {"val_psnr": sum(s[0] for s in scores) / len(scores),
                   "val_ssim": sum(s[1] for s in scores) / len(scores)}
        run.tracker.log_metrics(metrics, step=run.step)
        logger.info("step %d: validation PSNR %.2f dB, SSIM %.4f", run.step, metrics["val_psnr"], metrics["val_ssim"])
    acc.wait_for_everyone()
    run.last_val, run.last_val_step = metrics, run.step
    return metrics


def _write_sample(run: _Run, original: torch.Tensor, recon: torch.Tensor) -> Path:
    """``output/samples/recon-<step>.mp4``: original | reconstruction side by side (``(C, F, H, W)`` in [-1, 1])."""
    both = torch.cat([original.float().cpu(), recon.float().cpu()], dim=-1)
    path = write_video(run.output / "samples" / f"recon-{run.step:06d}.mp4", (both + 1.0) / 2.0,
                       fps=run.cfg.generate.fps)
    run.tracker.log_artifact(path, "samples")
    return path


def _checkpoint(run: _Run) -> Path:
    extra = {"step": run.step, "sampler": run.loader.batch_sampler.state_dict(), "val_step0": run.val_step0,
             "samples": [str(p) for p in run.samples], "config": run.cfg.to_dict()}
    path = save_checkpoint(run.output, run.step, models={"vae": run.vae, "discriminators": run.discs_raw},
                           optimizers={"ae": run.opt_ae, "disc": run.opt_disc},
                           schedulers={"ae": run.sched_ae, "disc": run.sched_disc}, extra=extra,
                           accelerator=run.accelerator, keep_last=run.cfg.train.checkpoints_total_limit)
    run.last_checkpoint, run.last_checkpoint_step = path, run.step
    return path


def _restore(run: _Run, checkpoint: Path) -> None:
    extra = load_checkpoint(checkpoint, models={"vae": run.vae, "discriminators": run.discs_raw},
                            optimizers={"ae": run.opt_ae, "disc": run.opt_disc},
                            schedulers={"ae": run.sched_ae, "disc": run.sched_disc}, accelerator=run.accelerator)
    run.step = int(extra["step"])
    sampler = run.loader.batch_sampler
    sampler.load_state_dict(extra["sampler"])
    run.val_step0 = dict(extra.get("val_step0") or {})
    run.samples = [Path(p) for p in extra.get("samples", [])]
    run.last_checkpoint, run.last_checkpoint_step = checkpoint, run.step
    if run.accelerator.is_main_process:
        drop_metrics_after(run.output, run.step)  # rows a killed run logged after this checkpoint are logged again
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, run.step, sampler.epoch,
                sampler.consumed)


@torch.no_grad()
def fitted_scaling_factor(vae: AutoencoderKLMagvit, dataset, max_clips: int = 16) -> float:
    """``1 / std`` of the posterior means of up to ``max_clips`` clips of ``dataset`` (V2's chunked encode), so the
    scaled latents the DiT sees have unit variance."""
    was_training = vae.training
    vae.eval()
    means = []
    for i in range(min(len(dataset), max_clips)):
        x = dataset[i]["pixel_values"][None].to(next(vae.parameters()).device, vae.dtype)
        means.append(vae.encode_chunked(x, sample=False).float().flatten())
    vae.train(was_training)
    std = float(torch.cat(means).std()) if means else 0.0
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"cannot fit the VAE scaling factor: latent std of {len(means)} clips is {std}")
    return 1.0 / std


def _save_final(run: _Run) -> Path:
    """``output/final``: the VAE as a ``save_pretrained`` folder (safetensors), written to a temp name and renamed."""
    final = run.output / "final"
    if run.accelerator.is_main_process:
        if run.cfg.train.vae.fit_scaling_factor:
            run.vae.register_to_config(scaling_factor=fitted_scaling_factor(run.vae, run.loader.dataset))
            run.tracker.log_metrics({"scaling_factor": run.vae.config.scaling_factor}, step=run.step)
        tmp = run.output / f".tmp-final-{uuid.uuid4().hex[:8]}"
        try:
            run.vae.save_pretrained(str(tmp), safe_serialization=True)
            replace_dir(tmp, final, old_name=f".tmp-final-old-{uuid.uuid4().hex[:8]}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        run.tracker.log_artifact(final, "vae")
    run.accelerator.wait_for_everyone()
    return final


__all__ = ["Discriminators", "VAEWithPosterior", "build_optimizers", "build_perceptual", "build_scheduler", "build_vae",
           "fitted_scaling_factor", "random_crop", "reconstruct", "train_step", "train_vae", "vae_data_config", "vae_source"]

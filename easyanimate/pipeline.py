"""``EasyAnimatePipeline``: prompt → text encoder → latents → denoise with CFG → chunked VAE decode → frames.

The pipeline loads our own folders and the official ``EasyAnimateV2-XL-2-*`` folders as they are (their
``model_index.json`` names PixArt classes; the transformer/VAE are always built with our classes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .accel import AccelRuntime
from .accel import resolve as resolve_accel
from .config import AccelConfig
from .fsutil import replace_dir
from .models.autoencoder_magvit import AutoencoderKLMagvit
from .models.text_encoder import load_encoder, load_tokenizer, resolve_text_encoder_dirs
from .models.transformer3d import Transformer3DModel
from .schedulers import SAMPLERS, make_scheduler, model_scheduler_kwargs, sampler_name

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # torch.save / pickle containers


def refuse_pickle_weights(folder: Path, part: str) -> None:
    """Raise ``ValueError`` when a component folder holds pickle weights (``*.bin``, ``*.pt``, …) and no
    ``.safetensors``: loading a pickle runs code from the file, so only ``.safetensors`` weights are ever loaded
    (a folder holding both loads its ``.safetensors``; the loaders are called with ``use_safetensors=True``)."""
    if not folder.is_dir():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not any(folder.glob("*.safetensors")):
        raise ValueError(f"{part}/{pickles[0]} is a pickle weight file, which is never loaded; expected .safetensors "
                         f"weights in {part}/ (convert them once with safetensors.torch.save_file)")


@dataclass
class EasyAnimatePipelineOutput(BaseOutput):
    """``videos``: (B, 3, F, H, W) float in [0, 1] ("pt"), (B, F, H, W, 3) array ("np"), or latents ("latent")."""

    videos: Any


class EasyAnimatePipeline(DiffusionPipeline):
    """Text-to-video with EasyAnimate V2.

    Args:
        tokenizer: a transformers tokenizer (T5 for V2; any for tests).
        text_encoder: a transformers encoder whose hidden size equals ``transformer.config.caption_channels``.
        vae (`AutoencoderKLMagvit`): the video VAE.
        transformer (`Transformer3DModel`): the DiT.
        scheduler: a diffusers scheduler (see ``easyanimate.schedulers``).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, tokenizer, text_encoder, vae: AutoencoderKLMagvit, transformer: Transformer3DModel, scheduler):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        self.max_sequence_length = 120
        self.lowercase_prompts = True
        self.accel: AccelConfig | str | None = None  # a call's accel when it passes none (None = exact)
        self._accel_runtime = AccelRuntime(self)

    # -----------------------------------------------------------------------------------------------------------------
    # properties derived from the components

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.ch_mult) - 1)

    @property
    def size_multiple(self) -> int:
        """Height/width must be multiples of this (VAE ×8 times the DiT patch)."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a clip, by the VAE's rule: V2 9k → 3k; slice VAE 1 + 8k → 1 + 2k (8× variant 1 + k);
        1 → 1. A count the VAE cannot make is a ``ValueError`` that names the rule."""
        return self.vae.video_latent_frames(num_frames)

    def set_sampler(self, name: str) -> None:
        """Swap the scheduler for a V2 sampler name ("Euler", "Euler A", "DPM++", "PNDM", "DDIM"), keeping what the
        model was trained for (its prediction type and noise schedule, ``schedulers.MODEL_SCHEDULER_KEYS``)."""
        self.scheduler = make_scheduler(name, **model_scheduler_kwargs(self.scheduler))

    def set_parallel(self, parallel: str | None) -> None:
        """Split the DiT across the torchrun process group (easyanimate.parallel): ``"ulysses=N"``, ``"ring=N"``
        (GPU), ``"cfg"`` (2 ranks), ``"cfg,ulysses=N"``. Joins the group if needed (gloo on CPU, NCCL on GPUs); move
        the pipeline to this rank's device first. Every rank then runs each call and gets the same videos."""
        from .parallel import apply_parallel, init_distributed

        init_distributed()
        self.parallel = apply_parallel(self.transformer, parallel)

    def set_accel(self, accel: AccelConfig | str | None) -> None:
        """The acceleration setting of later calls that pass no ``accel`` (spec string such as ``"default"``,
        ``"cache=first_block,threshold=0.08"``, or an ``AccelConfig``; None = exact). Checked now for this device."""
        resolve_accel(accel, str(self._execution_device))
        self.accel = accel

    @property
    def current_timestep(self) -> float:
        """The timestep of the running denoising step (what PAB / FasterCache key their skipping on)."""
        return self._accel_runtime.current_timestep

    # -----------------------------------------------------------------------------------------------------------------
    # loading and saving

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | str | None = None,
        sampler: str | None = None,
        text_encoder_path: str | os.PathLike | None = None,
        text_encoder_dtype: torch.dtype | str | None = None,
        **components,
    ) -> EasyAnimatePipeline:
        """Load a pipeline folder: ours, or the official V2 release layout, as is.

        Args:
            pretrained_model_name_or_path: local folder with ``model_index.json``, ``transformer/``, ``vae/``,
                ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` (no hub downloads).
            torch_dtype: dtype of transformer and VAE (default: as stored).
            sampler: replace the stored scheduler with a V2 sampler name.
            text_encoder_path: take the text encoder from another folder (a folder may also record one by reference
                in ``model_index.json`` under ``"_text_encoder_ref"``).
            components: already-built components to use instead of loading them (e.g. ``transformer=...``).
        """
        root = Path(pretrained_model_name_or_path)
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(f"{root} is not a pipeline folder: expected {root / 'model_index.json'}")
        index = json.loads((root / "model_index.json").read_text())
        dtype = resolve_dtype(torch_dtype)
        for part in ("transformer", "vae", "text_encoder"):
            if part not in components:
                refuse_pickle_weights(root / part, part)

        transformer = components.pop("transformer", None) or Transformer3DModel.from_pretrained(
            root / "transformer", torch_dtype=dtype, use_safetensors=True
        )
        vae = components.pop("vae", None) or AutoencoderKLMagvit.from_pretrained(root / "vae", torch_dtype=dtype,
                                                                                use_safetensors=True)

        te_ref = text_encoder_path or index.get("_text_encoder_ref")
        tokenizer, text_encoder = components.pop("tokenizer", None), components.pop("text_encoder", None)
        if tokenizer is None or text_encoder is None:
            if te_ref:  # "minilm", an encoder folder, or another pipeline folder
                enc, tok = resolve_text_encoder_dirs(te_ref)
            else:
                tok, enc = root / "tokenizer", root / "text_encoder"
            tokenizer = load_tokenizer(tok) if tokenizer is None else tokenizer
            text_encoder = load_encoder(enc, resolve_dtype(text_encoder_dtype)) if text_encoder is None else text_encoder

        scheduler = components.pop("scheduler", None)
        if scheduler is None:
            scheduler = cls._load_scheduler(root / "scheduler")
            if sampler:
                scheduler = make_scheduler(sampler, **model_scheduler_kwargs(scheduler))
        if components:
            raise TypeError(f"unexpected components {sorted(components)}")
        pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                   scheduler=scheduler)
        pipe.max_sequence_length = int(index.get("_max_sequence_length", 120))
        if te_ref:
            pipe.text_encoder_ref = str(te_ref)
        return pipe

    @staticmethod
    def _load_scheduler(folder: Path):
        cfg_path = folder / "scheduler_config.json"
        if not cfg_path.is_file():
            logger.info("no scheduler in %s; using V2's DPM++", folder)
            return make_scheduler("DPM++")
        name = json.loads(cfg_path.read_text()).get("_class_name")
        known = {c.__name__: c for c in SAMPLERS.values()}
        if name not in known:
            raise ValueError(f"{cfg_path}: scheduler {name!r} is not one of {sorted(known)}")
        return known[name].from_pretrained(str(folder))

    def save_pretrained(self, save_directory: str | os.PathLike, text_encoder_by_reference: str | None = None,
                        **_: Any) -> Path:
        """Write the pipeline folder (diffusers layout, safetensors only) atomically: temp folder, then rename.

        ``text_encoder_by_reference``: record this path instead of copying the (possibly 19 GB) text encoder.
        """
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            self.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
            self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            self.scheduler.save_pretrained(tmp / "scheduler")
            index = {
                "_class_name": type(self).__name__,
                "_diffusers_version": __import__("diffusers").__version__,
                "_max_sequence_length": self.max_sequence_length,
                "transformer": ["easyanimate", type(self.transformer).__name__],
                "vae": ["easyanimate", type(self.vae).__name__],
                "scheduler": ["diffusers", type(self.scheduler).__name__],
                "text_encoder": ["transformers", type(self.text_encoder).__name__],
                "tokenizer": ["transformers", type(self.tokenizer).__name__],
            }
            ref = text_encoder_by_reference or getattr(self, "text_encoder_ref", None)
            if ref:
                index["_text_encoder_ref"] = str(ref)
            else:
                self.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
                self.tokenizer.save_pretrained(tmp / "tokenizer")
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    # -----------------------------------------------------------------------------------------------------------------
    # the steps of __call__

    def check_inputs(self, prompt, num_frames: int, height: int, width: int, num_inference_steps: int) -> None:
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt)):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        self.vae.check_num_frames(num_frames)  # the frame rule comes from the VAE (V2 chunks or slices)
        m = self.size_multiple
        if height % m or width % m or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {m}, got {height}x{width}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if getattr(self.scheduler.config, "skip_prk_steps", True) is False and num_inference_steps < 4:
            raise ValueError(f"the PNDM sampler needs at least 4 steps (its Runge-Kutta warm-up), got {num_inference_steps}")
        max_len = self.transformer.config.motion_module_kwargs.get("temporal_position_encoding_max_len", 4096)
        if self.latent_frames(num_frames) > max_len:
            raise ValueError(f"{num_frames} frames give {self.latent_frames(num_frames)} latent frames, more than the "
                             f"motion module's temporal table ({max_len})")

    def encode_prompt(self, prompt: str | list[str], device, dtype, max_sequence_length: int | None = None):
        """Tokenise (lower-cased as V2's pipeline does, padded to 120) and encode → (embeds (B,L,D), mask (B,L))."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if self.lowercase_prompts:
            prompts = [p.lower().strip() for p in prompts]
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=max_sequence_length or self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.text_encoder.device)
        mask = tokens.attention_mask.to(self.text_encoder.device)
        embeds = self.text_encoder(ids, attention_mask=mask)[0]
        return embeds.to(device=device, dtype=dtype), mask.to(device)

    def prepare_latents(self, batch: int, num_frames: int, height: int, width: int, dtype, device, generator,
                        latents=None) -> torch.Tensor:
        shape = (batch, self.transformer.config.in_channels, self.latent_frames(num_frames),
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            # drawn on the CPU so a seed gives the same video on every device
            latents = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return (latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma).to(dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, smooth: bool = False, generator=None) -> torch.Tensor:
        """Latents (scaled) → frames (B,3,F,H,W) in [0,1], decoding 3 latent frames at a time (flat peak memory)."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        frames = self.vae.decode_chunked(latents, smooth=smooth, generator=generator)
        return (frames.float() / 2 + 0.5).clamp(0, 1)

    # -----------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        num_frames: int = 144,
        height: int = 384,
        width: int = 672,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        smooth_decode: bool = False,
        callback_on_step_end: Callable[[EasyAnimatePipeline, int, Any, dict], dict | None] | None = None,
        max_sequence_length: int | None = None,
        show_progress: bool = True,
        return_dict: bool = True,
        accel: AccelConfig | str | None = None,
    ):
        """Generate videos.

        Args:
            prompt / negative_prompt: text(s); a negative prompt is used only when ``guidance_scale > 1``.
            num_frames: 1 (an image), or what the VAE makes: a multiple of 9 (V2), 1 + 8k (slice VAE).
            height, width: multiples of 16.
            num_inference_steps, guidance_scale: sampler steps and classifier-free guidance weight.
            generator: a ``torch.Generator`` (CPU) for reproducible noise.
            output_type: "pt" (B,3,F,H,W) in [0,1], "np" (B,F,H,W,3) in [0,1], or "latent".
            smooth_decode: V2's seam-smoothing pass after the chunked decode.
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": ...})`` after every step; it may return a
                dict with replacement ``latents``; set ``pipe.interrupt = True`` inside it to stop early.
            accel: acceleration for this call (``easyanimate.accel``: ``"exact"``, ``"default"``,
                ``"cache=mag,threshold=0.1"``, an ``AccelConfig``); None = ``pipe.accel`` (exact unless set).
        """
        # 1. check inputs
        self.check_inputs(prompt, num_frames, height, width, num_inference_steps)
        if output_type not in ("pt", "np", "latent"):
            raise ValueError(f"output_type must be 'pt', 'np' or 'latent', got {output_type!r}")
        batch = 1 if isinstance(prompt, str) else len(prompt)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        accel_settings = resolve_accel(accel if accel is not None else self.accel, str(device))
        dtype = self._accel_runtime.prepare(accel_settings, num_inference_steps, do_cfg, device)
        self.interrupt = False

        # 2. encode prompts (negative first, so CFG's chunk(2) gives uncond, cond)
        embeds, mask = self.encode_prompt(prompt, device, dtype, max_sequence_length)
        if do_cfg:
            neg = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(neg) != batch:
                raise ValueError(f"negative_prompt has {len(neg)} entries, prompt has {batch}")
            neg_embeds, neg_mask = self.encode_prompt(neg, device, dtype, max_sequence_length)
            embeds, mask = torch.cat([neg_embeds, embeds]), torch.cat([neg_mask, mask])

        # 3. timesteps and 4. initial noise
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(batch, num_frames, height, width, torch.float32, device, generator, latents)
        step_kwargs = {"generator": generator} if "generator" in _step_params(self.scheduler) else {}

        # 5. denoise
        in_ch = self.transformer.config.in_channels
        bar = self.progress_bar(total=len(timesteps)) if show_progress else None
        for i, t in enumerate(timesteps):
            if self.interrupt:
                break
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            t_in = t.expand(model_in.shape[0]) if torch.is_tensor(t) else torch.full((model_in.shape[0],), t)
            with self._accel_runtime.step_context(t):
                noise_pred = self.transformer(
                    model_in.to(dtype), timestep=t_in.to(device), encoder_hidden_states=embeds,
                    encoder_attention_mask=mask, return_dict=False,
                )[0].float()
            if do_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            if self.transformer.config.out_channels // 2 == in_ch:  # learned variance: keep the noise channels
                noise_pred = noise_pred[:, :in_ch]
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                result = callback_on_step_end(self, i, t, {"latents": latents})
                if result and "latents" in result:
                    latents = result["latents"]
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        self._accel_runtime.finish()

        # 6. decode
        if output_type == "latent":
            videos = latents
        else:
            videos = self.decode_latents(latents, smooth=smooth_decode, generator=generator)
            if output_type == "np":
                videos = videos.permute(0, 2, 3, 4, 1).cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (videos,)
        return EasyAnimatePipelineOutput(videos=videos)


def _step_params(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


# ---------------------------------------------------------------------------------------------------------------------
# building a pipeline from a config


def build_pipeline(model_cfg, sampler: str = "DPM++") -> EasyAnimatePipeline:
    """A pipeline from ``config.ModelConfig``: the pretrained folder, or random weights of the configured shapes."""
    from .models.text_encoder import hidden_size, load_text_encoder

    dtype = resolve_dtype(model_cfg.dtype)
    te_path = model_cfg.text_encoder.path
    if model_cfg.pretrained:
        pipe = EasyAnimatePipeline.from_pretrained(
            model_cfg.pretrained, torch_dtype=dtype, sampler=sampler, text_encoder_path=te_path or None
        )
    else:
        if not te_path:
            raise ValueError("model.text_encoder.path is empty and model.pretrained is empty: nothing to load text from")
        tokenizer, text_encoder = load_text_encoder(te_path)
        tkw = model_cfg.transformer.to_model_kwargs()
        if tkw["caption_channels"] != hidden_size(text_encoder):
            raise ValueError(
                f"model.transformer.caption_channels={tkw['caption_channels']} but the text encoder {te_path!r} "
                f"gives {hidden_size(text_encoder)}-d embeddings"
            )
        torch.manual_seed(model_cfg.init_seed)
        transformer = Transformer3DModel(**tkw).to(dtype)
        vae = AutoencoderKLMagvit(**model_cfg.vae.to_model_kwargs()).to(dtype)
        pipe = EasyAnimatePipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                   scheduler=make_scheduler(sampler))
        # frozen encoders are recorded by reference in saved folders instead of being copied into each one
        pipe.text_encoder_ref = te_path if te_path == "minilm" else str(Path(te_path).resolve())
    if model_cfg.vae_path:  # a separately trained VAE (train-vae's final/, or another pipeline's vae/)
        folder = Path(model_cfg.vae_path)
        folder = folder / "vae" if (folder / "model_index.json").is_file() else folder
        pipe.vae = AutoencoderKLMagvit.from_pretrained(folder, torch_dtype=dtype).eval()
    pipe.max_sequence_length = model_cfg.text_encoder.max_length
    pipe.lowercase_prompts = model_cfg.text_encoder.lowercase
    return pipe


def frames_to_numpy(videos: torch.Tensor) -> np.ndarray:
    """(B,3,F,H,W) [0,1] → uint8 (B,F,H,W,3)."""
    return (videos.permute(0, 2, 3, 4, 1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


__all__ = ["EasyAnimatePipeline", "EasyAnimatePipelineOutput", "build_pipeline", "resolve_dtype", "sampler_name"]

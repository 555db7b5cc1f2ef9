"""Evaluate a pipeline folder: the numbers a version must show before it may become ``champion``.

``evaluate(cfg, model, data, output)`` reads top to bottom:

1. the pipeline folder (``EasyAnimatePipeline.from_pretrained``, sampler ``evaluate.sampler``); the optional CLIP and
   FVD networks are opened first, so a wrong path fails before minutes of work;
2. held-out clips: the validation split of ``data`` exactly as the trainers hold it out (``data.validation_count``
   entries chosen by ``data.seed``), at most ``evaluate.max_clips``, loaded once;
3. VAE reconstruction: posterior mean of 9-frame chunks (``encode_chunked(sample=False)``) → ``decode_chunked`` →
   ``vae_psnr`` (dB) and ``vae_ssim``, mean over clips (each clip weighs the same);
4. DiT validation loss at the fixed timesteps ``evaluate.validation_timesteps`` with fixed noise (seeded by
   ``evaluate.seed``): ``val_loss``, ``val_loss_t<t>``, ``val_mse``, ``val_vb`` — the trainer's own
   ``train.dit.validation_loss`` on the same latents, so the numbers compare with its logs;
5. generated samples for the fixed prompt set ``evaluate.prompts`` (prompt ``k`` seeded ``evaluate.seed + k``):
   ``flicker`` (VBench temporal flickering: mean absolute difference of consecutive frames on [0, 255]; 0 = frozen),
   ``flicker_score`` (VBench's normalised ``(255 − flicker) / 255``, 1 = no flicker) and ``motion`` (mean DIS
   optical-flow magnitude, pixels per frame at the sample size; the preprocessing motion filter's measure), means over
   prompts; ``output/samples/prompt-<k>.mp4`` (+ ``prompts.json``) and ``output/contact_sheet.png`` (rows = prompts,
   columns = evenly spaced frames);
   for the prompts that are captions of training clips (the demo preset lists them): ``similarity_*`` — how much
   each generated video looks like its caption's clip against every other clip of ``data`` (cosine of
   :func:`scene_features`, the time-averaged frame as an 8×8 colour thumbnail; ``similarity_rank1_frac`` = share of
   those prompts whose own clip ranks first) — and ``accel_psnr`` (the same prompts rendered with ``accel=default``
   against exact); ``output/similarity.csv`` (prompt × clip) and ``output/side_by_side/prompt-<k>.png`` (training
   clip | generated, exact | generated, accelerated, labelled);
6. optional: ``clip_score`` (CLIPScore, ``100 · max(cos(image, text), 0)`` averaged over frames then prompts) with the
   local transformers CLIP folder ``evaluate.clip_model``; ``fvd`` (Fréchet distance of I3D features of generated vs
   held-out clips) with the local TorchScript network ``evaluate.fvd_model``. Nothing is ever downloaded;
7. gates (:func:`gates_passed`): ``val_loss <= gate_max_val_loss``, ``vae_psnr >= gate_min_vae_psnr``,
   ``flicker <= gate_max_flicker``; a missing or non-finite metric fails its gate;
8. ``output/metrics.json`` — a flat JSON object of floats (DVC's metrics file), written atomically — and the same
   metrics plus paths and gate reasons as the return value. Params, metrics and files go to the ``tracker`` too.

Without ``data`` (and no ``data.meta``) steps 2-4 are skipped: only generated-sample metrics are produced, and the
``val_loss``/``vae_psnr`` gates fail as missing. FVD on a handful of clips is a smoke signal, not a benchmark number
(the feature covariance of n < feature-dim samples is singular; FVD is biased upward at small n).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, EvalConfig
from .tracking import NullTracker, Tracker
from .video import atomic_write_bytes, to_uint8_frames, write_video

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CONTACT_SHEET = "contact_sheet.png"
SHEET_COLUMNS = 8  # frames per contact-sheet row (fewer when a sample is shorter)
FVD_SIZE = 224  # I3D input resolution (StyleGAN-V / fvd-comparison resize every frame to 224x224)


# ---------------------------------------------------------------------------------------------------------------------
# per-video metrics (pure functions on frames)


def temporal_flicker(frames) -> float:
    """VBench's temporal flickering: mean absolute difference of consecutive frames, on [0, 255].

    ``frames``: uint8 ``(F, H, W, 3)`` or anything :func:`easyanimate.video.to_uint8_frames` takes (e.g. a ``(C, F, H,
    W)`` tensor in [0, 1]). A frozen video scores 0; frames alternating black/white score 255. One frame → 0.0.
    VBench reports ``(255 − x) / 255`` (:func:`flicker_score`).
    """
    x = to_uint8_frames(frames).astype(np.float32)
    if len(x) < 2:
        return 0.0
    return float(np.abs(np.diff(x, axis=0)).mean())


def flicker_score(flicker: float) -> float:
    """VBench's normalised temporal-flickering score: ``(255 − flicker) / 255`` (1 = no flicker)."""
    return (255.0 - float(flicker)) / 255.0


def motion_magnitude(frames, method: str = "dis") -> float:
    """Mean optical-flow magnitude (pixels per frame) over consecutive frames, on luma at the frames' own size.

    The preprocessing motion filter's measure (:func:`easyanimate.preprocess.filters.flow_magnitude`). One frame → 0.
    """
    import cv2

    from .preprocess.filters import flow_magnitude

    x = to_uint8_frames(frames)
    if len(x) < 2:
        return 0.0
    return flow_magnitude([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in x], method)


def contact_sheet(videos: Sequence[np.ndarray], columns: int = SHEET_COLUMNS, gap: int = 2) -> np.ndarray:
    """One uint8 image: a row per video (uint8 ``(F, H, W, 3)``, all the same H×W), ``min(columns, F)`` evenly spaced
    frames per row (first and last included), ``gap`` white pixels between tiles."""
    if not videos:
        raise ValueError("contact_sheet needs at least one video, got none")
    shapes = {v.shape[1:] for v in videos}
    if len(shapes) != 1:
        raise ValueError(f"contact_sheet needs videos of one frame size, got {sorted(shapes)}")
    h, w, _ = next(iter(shapes))
    cols = max(1, min(columns, max(len(v) for v in videos)))
    sheet = np.full((len(videos) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for r, video in enumerate(videos):
        picks = np.linspace(0, len(video) - 1, min(cols, len(video))).round().astype(int)
        for c, i in enumerate(picks):
            sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = video[i]
    return sheet


# ---------------------------------------------------------------------------------------------------------------------
# optional networks (local paths only)


class ClipScorer:
    """CLIPScore with a local transformers CLIP folder (``CLIPModel`` + its tokenizer + ``preprocessor_config.json``).

    ``scorer(frames, prompt)``: uint8 frames ``(F, H, W, 3)`` → ``100 · max(cos(E_img, E_txt), 0)`` averaged over
    frames (torchmetrics' CLIPScore convention). Loading never downloads; a wrong folder raises an error naming what
    was expected.
    """

    LAYOUT = ("expected a local transformers CLIP folder: config.json (CLIPModel), model.safetensors, tokenizer files "
              "and preprocessor_config.json, e.g. openai/clip-vit-base-patch32 saved with save_pretrained")

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        folder = Path(folder).expanduser()
        for name in ("config.json", "preprocessor_config.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"evaluate.clip_model {str(folder)!r}: {folder / name} does not exist; "
                                        f"{self.LAYOUT}")
        try:
            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"evaluate.clip_model {str(folder)!r}: cannot load it ({exc}); {self.LAYOUT}") from exc
        self.device = torch.device(device)

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        # transformers 5 may wrap projected features in a model output; 4.x returns the tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, prompt: str) -> float:
        from PIL import Image

        images = self.processor(images=[Image.fromarray(f) for f in frames], return_tensors="pt")
        max_len = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer([prompt], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        img = self._tensor(self.model.get_image_features(pixel_values=images["pixel_values"].to(self.device)))
        txt = self._tensor(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                        attention_mask=tokens["attention_mask"].to(self.device)))
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return float((100.0 * cos.clamp(min=0)).mean())


class FvdNetwork:
    """The FVD feature network: a local TorchScript I3D file (StyleGAN-V's ``i3d_torchscript.pt``, as used by
    fvd-comparison and most FVD code), called as ``net(x, rescale=False, resize=False, return_features=True)`` on
    ``x`` ``(B, 3, T, 224, 224)`` in [-1, 1]; a TorchScript module without those keywords is called as ``net(x)``.
    Features are flattened to ``(B, D)``."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"evaluate.fvd_model {str(path)!r} does not exist; expected a local TorchScript "
                                    "I3D feature network file (e.g. StyleGAN-V's i3d_torchscript.pt); none ships "
                                    "offline, and it is never downloaded")
        try:
            with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the public I3D is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"evaluate.fvd_model {str(path)!r} is not a TorchScript module "
                             f"(torch.jit.load failed: {exc})") from exc
        self.device = torch.device(device)

    @torch.no_grad()
    def features(self, videos: Sequence[torch.Tensor]) -> np.ndarray:
        """``videos``: ``(3, T, H, W)`` tensors in [-1, 1], equal T → features ``(N, D)`` float64."""
        feats = []
        for v in videos:
            frames = v.float().permute(1, 0, 2, 3)  # (T, 3, H, W)
            frames = torch.nn.functional.interpolate(frames, size=(FVD_SIZE, FVD_SIZE), mode="bilinear",
                                                     align_corners=False).clamp(-1, 1)
            x = frames.permute(1, 0, 2, 3)[None].to(self.device)
            try:
                out = self.net(x, rescale=False, resize=False, return_features=True)
            except RuntimeError:  # a network with a plain forward(x)
                out = self.net(x)
            feats.append(out.float().flatten(1).cpu().numpy())
        return np.concatenate(feats).astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to feature sets ``a`` ``(N, D)`` and ``b`` ``(M, D)`` (N, M ≥ 2):
    ``‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½)`` (the FID/FVD formula)."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FVD needs at least 2 videos on each side, got {len(a)} generated and {len(b)} real")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: offset the diagonals (as in FID code)
        eps = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------------------------------
# gates


GATES = (  # (metric, comparison, EvalConfig field)
    ("val_loss", "<=", "gate_max_val_loss"),
    ("vae_psnr", ">=", "gate_min_vae_psnr"),
    ("flicker", "<=", "gate_max_flicker"),
)


def gates_passed(metrics: dict[str, Any], ecfg: EvalConfig) -> tuple[bool, list[str]]:
    """``(passed, reasons)``: every gate of :data:`GATES` holds; ``reasons`` names each failing gate (empty when
    passed). A metric that is missing or not finite fails its gate (a version must show its numbers)."""
    reasons = []
    for name, op, field_name in GATES:
        limit = float(getattr(ecfg, field_name))
        value = metrics.get(name)
        if value is None:
            reasons.append(f"{name} is missing (gate: {name} {op} {limit:g}; evaluate with --data for held-out "
                           "metrics)")
            continue
        value = float(value)
        if not math.isfinite(value):
            reasons.append(f"{name} is {value} (gate: {name} {op} {limit:g})")
        elif (op == "<=" and value > limit) or (op == ">=" and value < limit):
            reasons.append(f"{name} = {value:.6g} violates {name} {op} {limit:g} (evaluate.{field_name})")
    return not reasons, reasons


# ---------------------------------------------------------------------------------------------------------------------
# the steps


def check_eval_config(cfg: Config) -> None:
    """Fail before loading anything when the evaluate section cannot work."""
    e = cfg.evaluate
    if not e.prompts:
        raise ValueError("evaluate.prompts is empty: expected at least one prompt for the generated-sample metrics")
    n = e.num_frames  # the model's VAE decides which of the two layouts applies (checked again by the pipeline)
    if n != 1 and (n < 9 or (n % 9 and (n - 1) % 8)):
        raise ValueError(f"evaluate.num_frames must be 1, a multiple of 9 (V2 VAE) or 1 + 8k (slice VAE), got {n}")
    bad = [t for t in e.validation_timesteps if not 0 <= t < cfg.train.num_train_timesteps]
    if bad or not e.validation_timesteps:
        raise ValueError(f"evaluate.validation_timesteps must be a non-empty list in [0, "
                         f"{cfg.train.num_train_timesteps}), got {list(e.validation_timesteps)}")
    if e.max_clips < 0:
        raise ValueError(f"evaluate.max_clips must be >= 0, got {e.max_clips}")


def load_pipeline(cfg: Config, model: str | Path, device: torch.device):
    """The pipeline folder with the evaluation sampler, frozen, on ``device``."""
    from .pipeline import EasyAnimatePipeline
    from .schedulers import canonical_sampler

    pipe = EasyAnimatePipeline.from_pretrained(model, torch_dtype=cfg.model.dtype,
                                               sampler=canonical_sampler(cfg.evaluate.sampler))
    pipe.lowercase_prompts = cfg.model.text_encoder.lowercase
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
        part.eval()
    return pipe.to(device)


def held_out_clips(cfg: Config, data: str | Path | None, frame_rule: tuple[int, int] | None = None
                   ) -> list[dict[str, Any]]:
    """The validation split of ``data`` (as the trainers hold it out), at most ``evaluate.max_clips`` samples
    (``{"pixel_values": (3, F, H, W) in [-1, 1], "text", "type", …}``), loaded once. Empty without data.
    ``frame_rule``: the model VAE's clip-length rule (``vae.frame_rule``; 1 + 8k frames for a slice VAE)."""
    from .data.dataset import load_train_validation, with_frame_rule

    if data is None and not cfg.data.meta:
        return []
    _, val_ds = load_train_validation(with_frame_rule(cfg.data, frame_rule) if frame_rule else cfg.data, data)
    if val_ds is None:
        logger.warning("no held-out clips in %s (data.validation_count=%d): reconstruction and validation-loss "
                       "metrics are skipped", data or cfg.data.meta, cfg.data.validation_count)
        return []
    return [val_ds[i] for i in range(min(len(val_ds), cfg.evaluate.max_clips))]


@torch.no_grad()
def reconstruction_metrics(vae, clips: Sequence[dict], latents) -> dict[str, float]:
    """``vae_psnr``/``vae_ssim`` of posterior-mean reconstructions (``latents``: a ``LatentEncoder``, whose cached
    mean latents the DiT loss reuses)."""
    from .train.losses import psnr, ssim

    scores: dict[str, list[float]] = {"vae_psnr": [], "vae_ssim": []}
    for i, clip in enumerate(clips):
        z = latents.validation(clips, i) / latents.scale
        recon = vae.decode_chunked(z.to(vae.dtype)).float().cpu()
        x = clip["pixel_values"][None].float()
        scores["vae_psnr"].append(psnr(x, recon))
        scores["vae_ssim"].append(ssim(x, recon))
    return {k: float(np.mean(v)) for k, v in scores.items()}


def dit_validation_loss(pipe, clips: Sequence[dict], latents, cfg: Config, device) -> dict[str, float]:
    """The trainer's fixed-timestep, fixed-noise validation loss on the held-out clips, for what the model predicts
    (the prediction type and noise schedule its saved scheduler records)."""
    from .schedulers import model_scheduler_kwargs
    from .train.dit import GaussianDiffusion, TextEmbeddingCache, make_noise_scheduler, validation_loss

    trained = model_scheduler_kwargs(pipe.scheduler)
    noise_scheduler = make_noise_scheduler(cfg.train.num_train_timesteps, trained.get("rescale_betas_zero_snr", False))
    diffusion = GaussianDiffusion.from_scheduler(noise_scheduler, trained.get("prediction_type", "epsilon"))
    texts = TextEmbeddingCache(pipe, None, torch.float32)  # no cache: each held-out caption is encoded once anyway
    return validation_loss(pipe.transformer, clips, latents, texts, noise_scheduler, diffusion,
                           cfg.evaluate.validation_timesteps, cfg.evaluate.seed, device)


@torch.no_grad()
def generate_samples(pipe, cfg: Config, *, accel: str | None = None, only: Sequence[int] | None = None
                     ) -> list[np.ndarray]:
    """One video per ``evaluate.prompts`` entry (prompt ``k`` seeded ``evaluate.seed + k``) → uint8 ``(F, H, W, 3)``.

    ``accel``: the acceleration setting (``easyanimate.accel``; None = the pipeline's, exact unless set); ``only``:
    the prompt indices to render (default: all), each still seeded by its own index."""
    e = cfg.evaluate
    videos = []
    for k in (range(len(e.prompts)) if only is None else only):
        out = pipe(e.prompts[k], negative_prompt=cfg.generate.negative_prompt, num_frames=e.num_frames,
                   height=e.height, width=e.width, num_inference_steps=e.steps, guidance_scale=e.guidance_scale,
                   generator=torch.Generator("cpu").manual_seed(e.seed + k), show_progress=False, accel=accel)
        videos.append(to_uint8_frames(out.videos[0]))
    return videos


# ---------------------------------------------------------------------------------------------------------------------
# does generation show what the model was trained on? (generated video vs its caption's clip; exact vs accelerated)

SIMILARITY_GRID = 8  # scene features: the time-averaged frame shrunk to this many pixels a side
SIMILARITY_FILE = "similarity.csv"
SIDE_BY_SIDE_DIR = "side_by_side"
SHEET_SCALE = 2  # side-by-side tiles are enlarged (nearest) by this factor
SHEET_LABEL_WIDTH = 150  # pixels of the label column


def scene_features(frames, grid: int = SIMILARITY_GRID) -> np.ndarray:
    """A video's colour-and-layout signature: the mean of its frames (uint8 ``(F, H, W, 3)``, or anything
    :func:`easyanimate.video.to_uint8_frames` takes) shrunk to ``grid × grid`` by area averaging, as one vector of
    ``grid² · 3`` RGB values minus their own mean, scaled to unit length.

    The cosine of two such vectors (:func:`similarity_matrix`) is the Pearson correlation of the two thumbnails: what
    counts is where which colour sits; overall brightness and contrast do not, nor does motion (the frames are
    averaged, so an image and a clip of the same scene compare directly). A flat frame gives the zero vector."""
    import cv2

    mean = to_uint8_frames(frames).astype(np.float32).mean(axis=0)
    thumb = cv2.resize(mean, (grid, grid), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    thumb -= thumb.mean()
    norm = float(np.linalg.norm(thumb))
    return thumb / norm if norm > 1e-9 else np.zeros_like(thumb)


def similarity_matrix(videos: Sequence[np.ndarray], clips: Sequence[np.ndarray]) -> np.ndarray:
    """Cosine similarity of :func:`scene_features`, ``(len(videos), len(clips))``, each in [-1, 1]."""
    a = np.stack([scene_features(v) for v in videos])
    b = np.stack([scene_features(c) for c in clips])
    return a @ b.T


def own_clip_ranks(sim: np.ndarray, own: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
    """Per row of ``sim`` (a generated video): its similarity to its own clips (``own[i]``: the columns whose caption
    is the video's prompt; the best of them counts) against the best of every other column.

    Returns one dict per row: ``own`` (best own similarity), ``own_index``, ``other`` (best other), ``other_index``,
    ``rank`` (1 + how many other clips score higher than the best own one; 1 = its own clip looks most alike)."""
    rows = []
    for i, cols in enumerate(own):
        cols = sorted(set(int(c) for c in cols))
        if not cols:
            raise ValueError(f"own_clip_ranks: row {i} has no own clip; expected at least one column index")
        others = [c for c in range(sim.shape[1]) if c not in cols]
        best = max(cols, key=lambda c: sim[i, c])
        rival = max(others, key=lambda c: sim[i, c]) if others else None
        rows.append({"own": float(sim[i, best]), "own_index": best,
                     "other": float(sim[i, rival]) if rival is not None else float("nan"),
                     "other_index": rival, "rank": 1 + sum(1 for c in others if sim[i, c] > sim[i, best])})
    return rows


def similarity_metrics(ranks: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``similarity_own`` (mean best own similarity), ``similarity_other`` (mean best other), ``similarity_margin``
    (mean own − other), ``similarity_rank1_frac`` (share of prompts whose own clip ranks first), ``similarity_prompts``."""
    if not ranks:
        return {}
    own = np.array([r["own"] for r in ranks])
    other = np.array([r["other"] for r in ranks])
    return {"similarity_own": float(own.mean()), "similarity_other": float(np.nanmean(other)),
            "similarity_margin": float(np.nanmean(own - other)),
            "similarity_rank1_frac": float(np.mean([r["rank"] == 1 for r in ranks])),
            "similarity_prompts": float(len(ranks))}


def caption_clips(cfg: Config, data: str | Path | None, frame_rule: tuple[int, int] | None = None
                  ) -> list[dict[str, Any]]:
    """Every entry of ``data`` (train and held-out) as the validation split reads it — deterministic: the longest
    clip from the start of the middle 80 %, at the ``data`` section's size — with its caption and split:
    ``[{"text", "file_path", "split": "train" | "validation", "frames": uint8 (F, H, W, 3)}]``. Empty without data,
    and when no ``evaluate.prompts`` entry is a training caption (nothing is decoded then)."""
    from .data.dataset import VideoTextDataset, split_train_validation, with_frame_rule
    from .data.meta import load_meta

    meta = data if data is not None else (cfg.data.meta or None)
    if meta is None:
        return []
    dcfg = with_frame_rule(cfg.data, frame_rule) if frame_rule else cfg.data
    dcfg = dataclasses.replace(dcfg, video_repeat=1)
    entries = load_meta(meta, dcfg.root or None, dcfg.allow_absolute_paths)
    train, val = split_train_validation(entries, dcfg.validation_count, dcfg.seed)
    if not {str(e.get("text", "")).strip() for e in train} & {p.strip() for p in cfg.evaluate.prompts}:
        return []
    out = []
    for split, part in (("train", train), ("validation", val)):
        if not part:
            continue
        ds = VideoTextDataset(part, dcfg, root=dcfg.root or None, train=False)
        for i, item in enumerate(ds.items):
            out.append({"text": str(item["entry"].get("text", "")).strip(), "file_path": item["entry"]["file_path"],
                        "split": split, "frames": to_uint8_frames(ds[i]["pixel_values"].add(1).div(2))})
    return out


def _fit(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 frames resized (area / linear) to ``height × width``."""
    import cv2

    if video.shape[1:3] == (height, width):
        return video
    inter = cv2.INTER_AREA if video.shape[1] >= height else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (width, height), interpolation=inter) for f in video])


def side_by_side(rows: Sequence[tuple[str, np.ndarray]], title: Sequence[str], columns: int = SHEET_COLUMNS,
                 scale: int = SHEET_SCALE) -> np.ndarray:
    """One labelled uint8 image: ``title`` lines on top, then a row per ``(label, video)`` (uint8 ``(F, H, W, 3)``;
    resized to the first video's size) with the label on the left and ``min(columns, F)`` evenly spaced frames
    (:func:`contact_sheet`), tiles enlarged ``scale`` times (nearest)."""
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise ValueError("side_by_side needs at least one (label, video) row, got none")
    h, w = rows[0][1].shape[1:3]
    strips = [contact_sheet([_fit(v, h, w)], columns) for _, v in rows]
    strips = [np.kron(s, np.ones((scale, scale, 1), dtype=np.uint8)) for s in strips]
    font = ImageFont.load_default(size=13)
    line = 18
    top = line * len(title) + 6
    width = SHEET_LABEL_WIDTH + max(s.shape[1] for s in strips) + 4
    height = top + sum(s.shape[0] + 4 for s in strips)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(title):
        draw.text((4, 3 + i * line), text, fill="black", font=font)
    y = top
    for (label, _), strip in zip(rows, strips, strict=True):
        for j, part in enumerate(label.split("\n")):
            draw.text((4, y + 4 + j * line), part, fill="black", font=font)
        sheet.paste(Image.fromarray(strip), (SHEET_LABEL_WIDTH, y))
        y += strip.shape[0] + 4
    return np.asarray(sheet)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def frames_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 videos of one shape (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def training_caption_report(cfg: Config, videos: Sequence[np.ndarray], fast: Sequence[np.ndarray],
                            prompt_ids: Sequence[int], clips: Sequence[dict[str, Any]], output: Path
                            ) -> tuple[dict[str, float], list[Path]]:
    """For the prompts ``prompt_ids`` that are training captions: the similarity of each generated (exact) video to
    every clip (:func:`own_clip_ranks`) → metrics (:func:`similarity_metrics`, plus ``accel_psnr``: exact vs
    accelerated frames, mean dB), ``output/similarity.csv`` (one row per prompt × clip) and one side-by-side sheet
    per prompt ``output/side_by_side/prompt-<k>.png`` (training clip | generated, exact | generated, accelerated).
    ``videos``/``fast``: the exact/accelerated videos of ``prompt_ids``, in that order."""
    e = cfg.evaluate
    sim = similarity_matrix(videos, [c["frames"] for c in clips])
    own = [[j for j, c in enumerate(clips) if c["text"] == e.prompts[k].strip()] for k in prompt_ids]
    ranks = own_clip_ranks(sim, own)
    metrics = similarity_metrics(ranks)
    psnrs = [frames_psnr(a, b) for a, b in zip(videos, fast, strict=True)]
    finite = [p for p in psnrs if math.isfinite(p)]
    metrics["accel_psnr"] = float(np.mean(finite)) if finite else 100.0  # identical everywhere: capped at 100 dB
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["prompt_index", "prompt", "clip", "split", "similarity", "own_clip", "rank_of_own"])
    for i, k in enumerate(prompt_ids):
        writer.writerows([k, e.prompts[k], c["file_path"], c["split"], f"{sim[i, j]:.4f}", int(j in own[i]),
                          ranks[i]["rank"]] for j, c in enumerate(clips))
    atomic_write_bytes(output / SIMILARITY_FILE, table.getvalue().encode())
    from PIL import Image

    sheets = []
    for i, k in enumerate(prompt_ids):
        r = ranks[i]
        rival = clips[r["other_index"]]["file_path"] if r["other_index"] is not None else "-"
        title = [f"prompt {k}: {_short(e.prompts[k], 110)}",
                 f"similarity to its own clip {r['own']:.2f} (rank {r['rank']} of {len(clips)} clips); best other "
                 f"{r['other']:.2f} ({Path(rival).name}); accelerated vs exact: "
                 f"{f'{psnrs[i]:.1f} dB PSNR' if math.isfinite(psnrs[i]) else 'identical'}"]
        rows = [(f"training clip\n{_short(Path(clips[r['own_index']]['file_path']).name, 20)}",
                 clips[r["own_index"]]["frames"]),
                ("generated\naccel=exact", videos[i]), ("generated\naccel=default", fast[i])]
        buf = io.BytesIO()
        Image.fromarray(side_by_side(rows, title)).save(buf, format="PNG", optimize=True)
        sheets.append(atomic_write_bytes(output / SIDE_BY_SIDE_DIR / f"prompt-{k:02d}.png", buf.getvalue()))
    return metrics, sheets


PREVIEW_MIN_SIDE = 256  # the animated previews are upscaled (nearest) to at least this many pixels a side


def preview_gif(frames: np.ndarray, fps: int, min_side: int = PREVIEW_MIN_SIDE) -> bytes:
    """An endlessly looping animated GIF of uint8 ``(F, H, W, 3)`` frames, upscaled by a whole factor (nearest) to
    at least ``min_side`` pixels a side: MLflow's artifact viewer shows it inline, where it cannot play an MP4."""
    from PIL import Image

    scale = max(1, -(-min_side // min(frames.shape[1:3])))
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, round(1000 / max(1, fps))))
    return buf.getvalue()


def write_samples(videos: Sequence[np.ndarray], cfg: Config, output: Path) -> tuple[list[Path], Path]:
    """``output/samples/prompt-<k>.mp4`` (``.png`` for 1 frame) with a looping ``prompt-<k>.gif`` preview (≥ 256 px)
    + ``samples/prompts.json`` (file, preview, prompt, seed), and the contact sheet → (sample paths, sheet)."""
    from PIL import Image

    e = cfg.evaluate
    folder = output / "samples"
    paths, index = [], []
    for k, (video, prompt) in enumerate(zip(videos, e.prompts, strict=True)):
        path = folder / f"prompt-{k:02d}{'.png' if len(video) == 1 else '.mp4'}"
        write_video(path, video, fps=cfg.generate.fps)
        paths.append(path)
        entry = {"file": path.name, "prompt": prompt, "seed": e.seed + k}
        if len(video) > 1:
            gif = folder / f"prompt-{k:02d}.gif"
            atomic_write_bytes(gif, preview_gif(to_uint8_frames(video), cfg.generate.fps))
            entry["preview"] = gif.name
        index.append(entry)
    atomic_write_bytes(folder / "prompts.json", (json.dumps(index, indent=1) + "\n").encode())
    buf = io.BytesIO()
    Image.fromarray(contact_sheet(videos)).save(buf, format="PNG")
    sheet = atomic_write_bytes(output / CONTACT_SHEET, buf.getvalue())
    return paths, sheet


def sample_metrics(videos: Sequence[np.ndarray]) -> dict[str, float]:
    """``flicker``, ``flicker_score``, ``motion``: means over the generated videos (empty for 1-frame samples)."""
    moving = [v for v in videos if len(v) > 1]
    if not moving:
        return {}
    flicker = float(np.mean([temporal_flicker(v) for v in moving]))
    return {"flicker": flicker, "flicker_score": flicker_score(flicker),
            "motion": float(np.mean([motion_magnitude(v) for v in moving]))}


def fvd_metric(net: FvdNetwork, videos: Sequence[np.ndarray], clips: Sequence[dict]) -> float:
    """FVD of the generated videos against the held-out video clips (both cut to the shorter length)."""
    real = [c["pixel_values"] for c in clips if c["pixel_values"].shape[1] > 1]
    fake = [torch.from_numpy(v).permute(3, 0, 1, 2).float() / 127.5 - 1.0 for v in videos if len(v) > 1]
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FVD needs at least 2 held-out video clips and 2 generated videos, got {len(real)} and "
                         f"{len(fake)} (raise data.validation_count / add evaluate.prompts, or unset "
                         "evaluate.fvd_model)")
    frames = min(min(r.shape[1] for r in real), min(f.shape[1] for f in fake))
    return frechet_distance(net.features([f[:, :frames] for f in fake]), net.features([r[:, :frames] for r in real]))


def write_metrics(path: Path, metrics: dict[str, float]) -> Path:
    """The flat metrics JSON (non-finite values as null, keys sorted), atomically."""
    plain = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in sorted(metrics.items())}
    return atomic_write_bytes(path, (json.dumps(plain, indent=1, allow_nan=False) + "\n").encode())


# ---------------------------------------------------------------------------------------------------------------------
# main


def evaluate(cfg: Config, model: str | Path, data: str | Path | None, output: str | Path, *,
             tracker: Tracker | None = None) -> dict[str, Any]:
    """Evaluate the pipeline folder ``model`` (see the module docstring); returns the metrics plus ``metrics_path``,
    ``samples``, ``contact_sheet``, ``gate_reasons`` and ``seconds``.

    Args:
        cfg: resolved config: ``cfg.evaluate`` (prompts, sizes, sampler, timesteps, optional networks, gates),
            ``cfg.data`` (how the held-out split is read — keep it equal to the training run's), ``cfg.generate``
            (negative prompt, fps), ``cfg.train.num_train_timesteps``, ``cfg.model.dtype``.
        model: a pipeline folder (ours or the official V2 layout).
        data: meta JSON/CSV whose held-out split is scored (None → ``data.meta``; none at all → samples only).
        output: folder for ``metrics.json``, ``samples/`` and ``contact_sheet.png``.
        tracker: where params, metrics and files are logged (default: nowhere; ``metrics.json`` is the record).
    """
    t_start = time.perf_counter()
    output = Path(output)
    e = cfg.evaluate
    tracker = tracker if tracker is not None else NullTracker()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_eval_config(cfg)
    tracker.log_params({"evaluate": cfg.to_dict()["evaluate"], "model": str(model), "data": str(data or "")})

    # 1. the model, and the optional networks (opened first: a wrong path fails fast)
    clip_scorer = ClipScorer(e.clip_model, device) if e.clip_model else None
    fvd_net = FvdNetwork(e.fvd_model, device) if e.fvd_model else None
    pipe = load_pipeline(cfg, model, device)

    # 2. held-out clips
    clips = held_out_clips(cfg, data, pipe.vae.frame_rule)
    metrics: dict[str, float] = {"num_clips": float(len(clips)), "num_samples": float(len(e.prompts))}

    if clips:
        from .train.dit import LatentEncoder

        latents = LatentEncoder(pipe.vae, device, cache=False, seed=e.seed)
        # 3. VAE reconstruction
        metrics.update(reconstruction_metrics(pipe.vae, clips, latents))
        # 4. DiT validation loss at fixed timesteps with fixed noise
        metrics.update(dit_validation_loss(pipe, clips, latents, cfg, device))

    # 5. generated samples: flicker, motion, MP4s and the contact sheet
    videos = generate_samples(pipe, cfg, accel="exact")
    metrics.update(sample_metrics(videos))
    sample_paths, sheet = write_samples(videos, cfg, output)

    # 5b. prompts that are training captions: similarity to their clip vs the others, exact vs accelerated sheets
    refs = caption_clips(cfg, data, pipe.vae.frame_rule)
    trained = [k for k, p in enumerate(e.prompts) if any(c["split"] == "train" and c["text"] == p.strip()
                                                          for c in refs)]
    side_sheets: list[Path] = []
    if trained:
        fast = generate_samples(pipe, cfg, accel="default", only=trained)
        values, side_sheets = training_caption_report(cfg, [videos[k] for k in trained], fast, trained, refs, output)
        metrics.update(values)

    # 6. optional CLIPScore and FVD
    if clip_scorer is not None:
        metrics["clip_score"] = float(np.mean([clip_scorer(v, p) for v, p in zip(videos, e.prompts, strict=True)]))
    if fvd_net is not None:
        metrics["fvd"] = fvd_metric(fvd_net, videos, clips)

    # 7. gates
    passed, reasons = gates_passed(metrics, e)
    metrics["gates_passed"] = float(passed)

    # 8. the metrics file, and the tracker
    metrics_path = write_metrics(output / METRICS_FILE, metrics)
    tracker.log_metrics(metrics, 0)
    for path in sorted((output / "samples").iterdir()):  # MP4s, their GIF previews, prompts.json
        tracker.log_artifact(path, "samples")
    tracker.log_artifact(sheet, "samples")
    for path in side_sheets:  # training clip | generated exact | generated accelerated, per training caption
        tracker.log_artifact(path, "similarity")
    if side_sheets:
        tracker.log_artifact(output / SIMILARITY_FILE, "similarity")
    tracker.log_artifact(metrics_path, "eval")
    if reasons:
        logger.warning("evaluation gates failed: %s", "; ".join(reasons))
    return {**metrics, "gate_reasons": reasons, "metrics_path": str(metrics_path),
            "samples": [str(p) for p in sample_paths], "contact_sheet": str(sheet),
            "side_by_side": [str(p) for p in side_sheets],
            "seconds": round(time.perf_counter() - t_start, 3)}


__all__ = ["ClipScorer", "FvdNetwork", "GATES", "contact_sheet", "evaluate", "flicker_score", "frechet_distance",
           "gates_passed", "motion_magnitude", "own_clip_ranks", "scene_features", "side_by_side", "similarity_matrix",
           "similarity_metrics", "temporal_flicker"]

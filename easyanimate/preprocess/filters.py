"""Clip filters of the preprocessing stage: format → quality → text → motion (EasyAnimate V2, stage 2).

V2 keeps a clip when the LAION aesthetic score averaged over 4 uniformly sampled frames is >= 4.0, the OCR text-box
area on the middle frame is <= 2 % of the frame, and the mean optical-flow magnitude at ~2 fps is in (3, 8). This
module does the same with what runs offline on a CPU:

* format  — width/height/fps bounds of ``PreprocessConfig`` (images: width/height only, fps is n/a).
* quality — over ``QualityConfig.num_frames`` uniformly sampled frames (segment centres, so never the first/last frame
  that a scene cut may have smeared): ``sharpness`` (variance of the Laplacian on a grey frame resized to 256 px long
  side, higher = sharper), ``brisque`` (package ``brisque``, lower = better) and, when ``QualityConfig.aesthetic_model``
  names a local folder, ``aesthetic`` (LAION improved-aesthetic-predictor: CLIP image embedding → MLP, ~1..10).
* text    — ``text_area``: union area of the RapidOCR (PP-OCRv4 DB detector) text polygons over the frame area, on the
  middle frame downscaled to ``TextConfig.max_side`` long side. Detected boxes are confirmed by the recogniser
  (confidence >= 0.6; the direction classifier is skipped) because the detector alone boxes textures as text.
* motion  — ``motion``: mean optical-flow magnitude in **pixels at ``MotionConfig.size`` px long side, between
  consecutive sampled frames** (frames taken every ``int(fps / sample_fps)`` source frames, as V2's
  compute_motion_score.py), OpenCV DIS (fast preset) or Farnebäck (V2's parameters).

``run_filters`` stops at the first failing stage (the cheaper option): the failing score is always recorded, scores of
the stages after it are absent. Within the quality stage the order is sharpness → brisque → aesthetic (cheapest first).

Aesthetic model folder layout (``QualityConfig.aesthetic_model``; nothing is ever downloaded)::

    <folder>/
      clip/                      a ``transformers`` CLIP checkpoint: config.json (CLIPModel or CLIPVisionModelWithProjection),
                                 model.safetensors and preprocessor_config.json,
                                 e.g. openai/clip-vit-large-patch14 saved with save_pretrained.
                                 (The CLIP files may also sit directly in <folder> instead of clip/.)
      aesthetic_head.safetensors the MLP head state dict. Pickle files (``*.pth``, ``pytorch_model.bin``) are refused:
                                 convert LAION's ``sac+logos+ava1-l14-linearMSE.pth`` once with
                                 ``save_file(torch.load(p, weights_only=True), "aesthetic_head.safetensors")``.

The head is LAION's ``MLP``: ``layers.{0,2,4,6,7}.{weight,bias}`` — Linear(768,1024) Dropout Linear(1024,128) Dropout
Linear(128,64) Dropout Linear(64,16) Linear(16,1), no activations; any chain of Linear layers whose first input equals
the CLIP projection dim and whose last output is 1 is accepted. Input: the L2-normalised CLIP image embedding.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import av
import cv2
import numpy as np
from PIL import Image, ImageOps

SCORE_NAMES = ("brisque", "sharpness", "aesthetic", "text_area", "motion")
STAGES = ("format", "quality", "text", "motion")


@dataclass
class FilterOutcome:
    """What the filters said about one clip. ``stage`` is the first failing filter, ``reason`` its score vs threshold."""

    scores: dict[str, float]
    passed: bool
    stage: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"scores": dict(self.scores), "passed": self.passed, "stage": self.stage, "reason": self.reason}


# ---------------------------------------------------------------------------------------------------------------------
# frames


class PixelLimitError(ValueError):
    """An image or video frame larger than the decoded-pixel cap: refused from its header, before decoding."""


def check_pixels(width: int, height: int, limit: int, what: str = "image") -> None:
    """Raise ``PixelLimitError`` when ``width × height`` exceeds ``limit`` (``limit <= 0``: no cap)."""
    pixels = int(width) * int(height)
    if limit > 0 and pixels > limit:
        knob = "max_frame_pixels" if "frame" in what else "max_image_pixels"
        raise PixelLimitError(f"{what} is {width}x{height} = {pixels:,} pixels; the decoded-pixel cap is {limit:,} "
                              f"(preprocess.{knob})")


def load_image(path: str | Path, max_pixels: int = 40_000_000) -> np.ndarray:
    """An image file → uint8 RGB ``(H, W, 3)`` (EXIF orientation applied, alpha dropped).

    ``max_pixels``: refuse (``PixelLimitError``) an image whose header announces more pixels, before decoding it
    (``<= 0``: no cap of ours; PIL's own decompression-bomb guard still raises past twice ``Image.MAX_IMAGE_PIXELS``,
    and its warning is an error here)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)  # reads the header only
        except Image.DecompressionBombError as exc:
            raise PixelLimitError(f"image refused by PIL's decompression-bomb guard: {exc}") from None
    with img:
        check_pixels(*img.size, max_pixels, "image")
        bomb = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
        if bomb:
            raise PixelLimitError(f"image refused by PIL's decompression-bomb guard: {bomb[0].message}")
        img = ImageOps.exif_transpose(img)
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def frame_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a video's first video stream from its header (nothing decoded)."""
    with _open(path) as container:
        if not container.streams.video:
            raise ValueError("expected a video stream, found none")
        stream = container.streams.video[0]
        return int(stream.codec_context.width or stream.width or 0), int(stream.codec_context.height or stream.height
                                                                          or 0)


def frame_indices(total: int, n: int) -> list[int]:
    """``n`` uniformly spaced indices in ``range(total)``: the centres of ``n`` equal segments.

    Never index 0 or ``total-1`` unless the clip is that short (the first/last frames of a cut clip are the ones a
    scene transition or fade smears). ``n == 1`` → the middle frame ``total // 2``; ``n >= total`` → every frame.
    """
    if total <= 0 or n <= 0:
        return []
    if n >= total:
        return list(range(total))
    return [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def _open(path):
    return av.open(str(path) if isinstance(path, Path) else path)


def _count_frames(path) -> int:
    with _open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)  # no decoding needed


def _decode_at(path, indices: list[int], convert) -> tuple[list, int]:
    """Decode sequentially, convert only the frames at ``indices``; stop after the last one.

    Returns (converted frames in index order, number of frames decoded). Only the kept frames are converted to arrays,
    which is the costly part for short clips; decoding itself is sequential (clips are seconds long).
    """
    wanted = sorted(set(indices))
    out: dict[int, Any] = {}
    decoded = 0
    if not wanted:
        return [], 0
    last = wanted[-1]
    keep = set(wanted)
    with _open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            decoded = i + 1
            if i in keep:
                out[i] = convert(frame)
            if i >= last:
                break
    return [out[i] for i in wanted if i in out], decoded


def _rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def sample_frames(path: str | Path, n: int) -> np.ndarray:
    """``n`` uniformly spaced frames (see ``frame_indices``) of a video → uint8 ``(n', H, W, 3)``, ``n' = min(n, F)``.

    Decodes sequentially up to the last wanted frame and converts only the wanted ones. When the container's frame count
    is wrong (the stream ends early), the indices are recomputed from the real count.
    """
    total = _count_frames(path)
    idx = frame_indices(total, n)
    frames, decoded = _decode_at(path, idx, _rgb)
    if len(frames) < len(idx):  # the header over-counted: redo with the true count
        idx = frame_indices(decoded, n)
        frames, decoded = _decode_at(path, idx, _rgb)
    if not frames:
        raise ValueError(f"{path}: no frames decoded")
    return np.stack(frames)


def middle_frame(path: str | Path) -> np.ndarray:
    """The middle frame (index ``F // 2``) of a video → uint8 ``(H, W, 3)``."""
    return sample_frames(path, 1)[0]


def _resize_long_side(img: np.ndarray, size: int, *, only_down: bool = False) -> np.ndarray:
    """Resize so the long side is ``size`` (INTER_AREA down, INTER_LINEAR up); ``only_down`` never enlarges."""
    h, w = img.shape[:2]
    long_side = max(h, w)
    if long_side == size or (only_down and long_side <= size) or size <= 0:
        return img
    r = size / long_side
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)


def _check_frame(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB frame (H, W, 3), got {frame.dtype} {tuple(frame.shape)}")
    return frame


# ---------------------------------------------------------------------------------------------------------------------
# format


def check_format(info: dict, cfg, *, is_image: bool = False) -> FilterOutcome:
    """Width/height/fps bounds of ``PreprocessConfig`` (``info``: width, height, fps, num_frames as ``probe_video``).

    Images (``is_image``): width and height only; their fps is not applicable.
    """
    width, height = int(info.get("width") or 0), int(info.get("height") or 0)
    problems = []
    if width < cfg.min_width:
        problems.append(f"width {width} < {cfg.min_width}")
    if height < cfg.min_height:
        problems.append(f"height {height} < {cfg.min_height}")
    if not is_image:
        fps = float(info.get("fps") or 0.0)
        if fps <= 0:
            problems.append("fps unknown")
        elif fps < cfg.min_fps:
            problems.append(f"fps {fps:g} < {cfg.min_fps:g}")
        elif fps > cfg.max_fps:
            problems.append(f"fps {fps:g} > {cfg.max_fps:g}")
        if "num_frames" in info and int(info["num_frames"] or 0) <= 0:
            problems.append("no frames")
    if problems:
        return FilterOutcome({}, False, "format", "; ".join(problems))
    return FilterOutcome({}, True)


# ---------------------------------------------------------------------------------------------------------------------
# quality

_BRISQUE = None
_BRISQUE_LOCK = threading.Lock()


def _brisque_model():
    global _BRISQUE
    with _BRISQUE_LOCK:
        if _BRISQUE is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # scipy.ndimage.filters etc. at import
                from brisque import BRISQUE

                _BRISQUE = BRISQUE(url=False)
        return _BRISQUE


def brisque_score(frame: np.ndarray, model=None, max_side: int | None = None) -> float:
    """BRISQUE of a uint8 RGB frame (lower = better; sharp photos ~3-20, blurred ~75-85).

    At the frame's own resolution unless ``max_side`` downscales it first. The score depends on the scale (a 1280x720
    frame scores ~41, the same frame at 640 px ~8), so compare scores taken at one setting. Cost grows with the pixels:
    ~15 ms at 176x144, ~100 ms at 640x272, ~600 ms at 1280x720 on one core.
    """
    frame = _check_frame(frame)
    if max_side:
        frame = _resize_long_side(frame, max_side, only_down=True)
    model = model or _brisque_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # brisque 0.2.0: ndim>0 array to scalar, once per call
        return float(model.score(frame))


def sharpness_score(frame: np.ndarray, size: int = 256) -> float:
    """Variance of the Laplacian of the grey frame resized to ``size`` px long side (higher = sharper)."""
    frame = _check_frame(frame)
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    grey = _resize_long_side(grey, size)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


_HEAD_NAMES = ("aesthetic_head.safetensors",)
_LAYOUT = ("expected <folder>/clip/ (a transformers CLIP checkpoint with config.json, model.safetensors and "
           "preprocessor_config.json; or those files directly in <folder>) and <folder>/aesthetic_head.safetensors "
           "(pickle weights such as *.pth are not loaded: convert them to .safetensors)")


class AestheticScorer:
    """LAION improved-aesthetic-predictor: CLIP image embedding (L2-normalised) → linear MLP → score (~1..10).

    ``folder`` follows the layout in the module docstring; loading is local only (never downloads) and any missing
    piece raises ``FileNotFoundError``/``ValueError`` that names it and the expected layout.
    """

    def __init__(self, folder: str | Path, device: str = "cpu"):
        import torch
        from transformers import (
            AutoConfig,
            CLIPConfig,
            CLIPImageProcessor,
            CLIPVisionConfig,
            CLIPVisionModelWithProjection,
        )
        from transformers.utils import logging as hf_logging

        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"aesthetic_model {str(folder)!r} is not a folder; {_LAYOUT}")
        clip_dir = folder / "clip" if (folder / "clip").is_dir() else folder
        for name in ("config.json", "preprocessor_config.json"):
            if not (clip_dir / name).is_file():
                raise FileNotFoundError(f"aesthetic_model {str(folder)!r}: {clip_dir / name} is missing; {_LAYOUT}")
        head_path = self._find_head(folder)
        self.device = torch.device(device)
        try:
            self.processor = CLIPImageProcessor.from_pretrained(str(clip_dir), local_files_only=True)
            config = AutoConfig.from_pretrained(str(clip_dir), local_files_only=True)
            if isinstance(config, CLIPConfig):  # a full CLIP checkpoint: keep its vision tower and projection only
                vision = config.vision_config
                vision.projection_dim = config.projection_dim
                config = vision
            if not isinstance(config, CLIPVisionConfig):
                raise ValueError(f"config.json is a {type(config).__name__}, expected a CLIP model")  # noqa: TRY004
            previous = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the unused text tower is reported as unexpected keys
            try:
                self.clip = CLIPVisionModelWithProjection.from_pretrained(str(clip_dir), config=config,
                                                                          local_files_only=True, use_safetensors=True)
            finally:
                hf_logging.set_verbosity(previous)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"aesthetic_model {str(folder)!r}: cannot load the CLIP model from {clip_dir}: {exc}; "
                             f"{_LAYOUT}") from exc
        self.clip.eval().to(self.device)
        self.head = self._load_head(head_path, self.clip.config.projection_dim).to(self.device)
        self.folder = folder

    @staticmethod
    def _find_head(folder: Path) -> Path:
        for name in _HEAD_NAMES:
            if (folder / name).is_file():
                return folder / name
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".pth", ".pt", ".bin", ".ckpt", ".pkl"))
        if pickles:
            raise ValueError(f"aesthetic_model: {pickles[0]} is a pickle weight file, which is never loaded; expected "
                             f"aesthetic_head.safetensors (convert it once with safetensors' save_file)")
        raise FileNotFoundError(f"aesthetic_model {str(folder)!r}: no aesthetic_head.safetensors; {_LAYOUT}")

    @staticmethod
    def _load_head(path: Path, embed_dim: int):
        import torch
        from safetensors.torch import load_file

        if path.suffix != ".safetensors":
            raise ValueError(f"aesthetic head {path.name}: expected a .safetensors file (no pickles)")
        state = load_file(str(path))
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        weights = {}
        for key, value in state.items():
            m = re.fullmatch(r"(.*?)(\d+)\.weight", key)
            if m and value.ndim == 2:
                bias = state.get(f"{m.group(1)}{m.group(2)}.bias")
                weights[int(m.group(2))] = (value, bias)
        if not weights:
            raise ValueError(f"{path}: no Linear layers (keys like layers.0.weight) in the aesthetic head")
        layers = []
        for i in sorted(weights):
            w, b = weights[i]
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            with torch.no_grad():
                lin.weight.copy_(w.float())
                if b is not None:
                    lin.bias.copy_(b.float())
            layers.append(lin)
        if layers[0].in_features != embed_dim or layers[-1].out_features != 1:
            raise ValueError(f"{path}: the head maps {layers[0].in_features} -> {layers[-1].out_features} but the CLIP "
                             f"model embeds to {embed_dim}; the head must map {embed_dim} -> 1")
        return torch.nn.Sequential(*layers).eval()

    def __call__(self, frames) -> np.ndarray:
        """Scores of uint8 RGB frames ``(N, H, W, 3)`` (or one frame) → float array ``(N,)``."""
        import torch

        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        inputs = self.processor(images=[Image.fromarray(f) for f in frames], return_tensors="pt")
        with torch.inference_mode():
            pixel_values = inputs["pixel_values"].to(self.device, self.clip.dtype)
            emb = self.clip(pixel_values=pixel_values).image_embeds.float()
            emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return self.head(emb).squeeze(-1).cpu().numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------------------------------
# text


def make_ocr_engine(threads: int | None = None):
    """A RapidOCR engine set up for detection on frames we already downscaled (no internal upscaling to 736 px)."""
    kwargs: dict[str, Any] = {"det_limit_type": "max", "det_limit_side_len": 4096}
    if threads:
        kwargs.update(intra_op_num_threads=int(threads), inter_op_num_threads=1)
    from rapidocr_onnxruntime import RapidOCR

    return RapidOCR(**kwargs)


def text_boxes(frame: np.ndarray, max_side: int = 640, engine=None, *, verify: bool = True,
               min_text_score: float = 0.6) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Text polygons (float ``(K, 2)`` arrays, in the downscaled frame's pixels) and that frame's (H, W).

    ``verify``: detected boxes are read by the recogniser and kept only when its confidence is >= ``min_text_score``.
    Detection alone (``verify=False``, what V2's CRAFT step does) fires on text-like texture: on the real sample photos
    it boxed a coffee cup as an "O" (23 % of the frame, recogniser confidence 0.51) and lens flares as "米*" (0.41),
    while rendered and printed text reads at 0.94-0.99. Frames without any detection cost the detector only.
    """
    frame = _check_frame(frame)
    img = _resize_long_side(frame, max_side, only_down=True)
    engine = engine or make_ocr_engine()
    bgr = np.ascontiguousarray(img[..., ::-1])
    if verify:
        result, _elapse = engine(bgr, use_det=True, use_cls=False, use_rec=True, text_score=float(min_text_score))
        boxes = [r[0] for r in (result or [])]
    else:
        boxes, _elapse = engine(bgr, use_det=True, use_cls=False, use_rec=False)
    polys = [np.asarray(b, dtype=np.float32).reshape(-1, 2) for b in (boxes or [])]
    return polys, img.shape[:2]


def text_area_ratio(frame: np.ndarray, max_side: int = 640, engine=None, *, verify: bool = True,
                    min_text_score: float = 0.6) -> float:
    """Union area of the text polygons (clipped to the frame) / frame area, after downscaling to ``max_side``.

    See ``text_boxes`` for ``verify``/``min_text_score`` (recogniser check that drops texture false positives).
    """
    polys, (h, w) = text_boxes(frame, max_side, engine, verify=verify, min_text_score=min_text_score)
    if not polys:
        return 0.0
    mask = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(p).astype(np.int32) for p in polys], 1)  # fillPoly clips to the mask
    return float(mask.mean())


# ---------------------------------------------------------------------------------------------------------------------
# motion


def motion_score(path: str | Path, sample_fps: float = 2.0, size: int = 256, method: str = "dis") -> float:
    """Mean optical-flow magnitude between consecutive sampled frames, in pixels at ``size`` px long side.

    Frames are taken every ``int(fps / sample_fps)`` source frames (at least 1, at most ``F - 1`` so a short clip still
    gives one pair), as V2's compute_motion_score.py; converted to grey (luma) and resized to ``size`` long side.
    ``method``: ``dis`` (OpenCV DIS, fast preset) or ``farneback`` (V2's parameters). One frame → 0.0.
    """
    if method not in ("dis", "farneback"):
        raise ValueError(f"motion method must be 'dis' or 'farneback', got {method!r}")
    with _open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or sample_fps
        total = int(stream.frames or 0)
    step = max(1, int(fps / max(sample_fps, 1e-6)))
    if total > 1:
        step = min(step, total - 1)

    def grey(frame):
        return _resize_long_side(frame.to_ndarray(format="gray"), size)

    frames = []
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i % step == 0:
                frames.append(grey(frame))
    if len(frames) < 2:
        return 0.0
    return flow_magnitude(frames, method)


def flow_magnitude(frames, method: str = "dis") -> float:
    """Mean flow magnitude over consecutive pairs of grey uint8 frames (all the same size)."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST) if method == "dis" else None
    mags = []
    for prev, cur in itertools.pairwise(frames):
        if dis is not None:
            flow = dis.calc(prev, cur, None)
        else:
            flow = cv2.calcOpticalFlowFarneback(prev, cur, None, pyr_scale=0.5, levels=3, winsize=15, iterations=3,
                                                poly_n=5, poly_sigma=1.2, flags=0)
        mags.append(float(np.sqrt(flow[..., 0] ** 2 + flow[..., 1] ** 2).mean()))
    return float(np.mean(mags)) if mags else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# models and the chain


class FilterModels:
    """The heavy, reusable pieces (OCR engine, BRISQUE SVM, aesthetic model), each loaded on first use, once.

    Make one per worker process (``FilterModels.shared()`` gives the process-wide one) and pass it to ``run_filters``.
    ``ocr_threads`` caps the ONNX Runtime threads of the OCR engine (a pool of N workers on N cores wants 1).
    """

    _shared: ClassVar[dict[int, FilterModels]] = {}

    def __init__(self, *, ocr_threads: int | None = None, device: str = "cpu"):
        self.ocr_threads = ocr_threads
        self.device = device
        self._ocr = None
        self._aesthetic: dict[str, AestheticScorer] = {}
        self._lock = threading.Lock()

    @classmethod
    def shared(cls) -> FilterModels:
        pid = os.getpid()  # a forked worker must not reuse the parent's ONNX session
        if pid not in cls._shared:
            cls._shared[pid] = cls()
        return cls._shared[pid]

    @property
    def ocr(self):
        with self._lock:
            if self._ocr is None:
                self._ocr = make_ocr_engine(self.ocr_threads)
            return self._ocr

    @property
    def brisque(self):
        return _brisque_model()

    def aesthetic(self, folder: str | Path) -> AestheticScorer:
        key = str(Path(folder).expanduser().resolve())
        with self._lock:
            if key not in self._aesthetic:
                self._aesthetic[key] = AestheticScorer(folder, device=self.device)
            return self._aesthetic[key]


def _quality(frames: np.ndarray, qcfg, models: FilterModels, scores: dict[str, float]) -> str:
    """Fill the quality scores (cheapest first); return the failure reason or ''."""
    if qcfg.method not in ("brisque", "sharpness", "both"):
        raise ValueError(f"quality.method must be brisque, sharpness or both, got {qcfg.method!r}")
    if qcfg.method in ("sharpness", "both"):
        scores["sharpness"] = float(np.mean([sharpness_score(f) for f in frames]))
        if scores["sharpness"] < qcfg.min_sharpness:
            return f"sharpness {scores['sharpness']:.1f} < {qcfg.min_sharpness:g}"
    if qcfg.method in ("brisque", "both"):
        scores["brisque"] = float(np.mean([brisque_score(f, models.brisque) for f in frames]))
        if scores["brisque"] > qcfg.max_brisque:
            return f"brisque {scores['brisque']:.1f} > {qcfg.max_brisque:g}"
    if qcfg.aesthetic_model:
        scores["aesthetic"] = float(np.mean(models.aesthetic(qcfg.aesthetic_model)(frames)))
        if scores["aesthetic"] < qcfg.min_aesthetic:
            return f"aesthetic {scores['aesthetic']:.2f} < {qcfg.min_aesthetic:g}"
    return ""


class _StageClock:
    """Adds the seconds of each ``with clock(stage):`` block to a dict (no-op without one)."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.timings is not None:
                self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0


def run_filters(clip_path: str | Path, info: dict, cfg, models: FilterModels | None = None, *,
                is_image: bool = False, timings: dict[str, float] | None = None) -> FilterOutcome:
    """format → quality → text → motion (each skipped when its ``enabled`` is false; images: format + quality).

    Stops at the first failure: ``stage``/``reason`` name it, ``scores`` holds every score computed so far (under
    ``brisque``, ``sharpness``, ``aesthetic``, ``text_area``, ``motion``) — the failing one included, later ones absent.
    ``cfg`` is a ``PreprocessConfig``; ``info`` is ``probe_video``'s dict (images: width and height).
    ``timings``: when given, seconds spent per filter are added to it (keys quality, text, motion).
    """
    clock = _StageClock(timings)
    models = models or FilterModels.shared()
    fmt = check_format(info, cfg, is_image=is_image)
    if not fmt.passed:
        return fmt
    scores: dict[str, float] = {}

    def fail(stage: str, reason: str) -> FilterOutcome:
        return FilterOutcome(scores, False, stage, reason)

    image = load_image(clip_path, getattr(cfg, "max_image_pixels", 40_000_000)) if is_image else None
    if cfg.quality.enabled:
        with clock("quality"):
            frames = image[None] if is_image else sample_frames(clip_path, cfg.quality.num_frames)
            reason = _quality(frames, cfg.quality, models, scores)
        if reason:
            return fail("quality", reason)
    if is_image:
        return FilterOutcome(scores, True)
    if cfg.text.enabled:
        with clock("text"):
            frame = middle_frame(clip_path)
            scores["text_area"] = text_area_ratio(frame, cfg.text.max_side, models.ocr, verify=cfg.text.verify,
                                                  min_text_score=cfg.text.min_text_score)
        if scores["text_area"] > cfg.text.max_area:
            return fail("text", f"text area {scores['text_area']:.3f} > {cfg.text.max_area:g}")
    if cfg.motion.enabled:
        m = cfg.motion
        with clock("motion"):
            scores["motion"] = motion_score(clip_path, m.sample_fps, m.size, m.method)
        if not scores["motion"] > m.min_score:
            return fail("motion", f"motion {scores['motion']:.2f} <= {m.min_score:g} (min)")
        if not scores["motion"] < m.max_score:
            return fail("motion", f"motion {scores['motion']:.2f} >= {m.max_score:g} (max)")
    return FilterOutcome(scores, True)

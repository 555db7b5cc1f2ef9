"""The training dataset: a meta JSON of videos and images → bucketed, normalised clips (EasyAnimate V2 recipe).

Per sample (V2 ``dataset_image_video.py`` + ``train_t2iv.py`` collate):

- videos use the middle 80 % of their frames (``[L//10, 9L//10)``); the clip has ``F`` frames, ``F`` = 1 or a multiple
  of 9, at most ``min(num_frames, frames in the middle)``; it spans ``(F−1)·stride+1`` source frames (squeezed when
  the middle is shorter), starts at a random frame and takes ``linspace`` indices;
- with ``random_frame_crop`` (train only) ``F`` is drawn from ``[1, 9, 18, …, num_frames]`` with p = 0.9 for the
  longest and 0.1 split evenly over the others, then capped by what the video holds;
- images are 1-frame clips; every sample is resized so its short side covers its aspect-ratio bucket
  (``ASPECT_RATIO_512`` × ``sample_size/512``), centre-cropped and normalised to [-1, 1] → ``(C, F, H, W)``;
- the caption is dropped (``""``) with probability ``caption_dropout`` (train only);
- augmentation, off by default as in V2 (train only, one draw per clip): ``random_zoom`` > 1 resizes the short side
  to ``zoom`` × the bucket's (zoom uniform in ``[1, random_zoom]``) and crops at a random place instead of the
  centre; ``random_flip`` mirrors the clip left-right with p = 0.5.

All randomness is a pure function of ``(seed, epoch, index)``: the same seed gives the same samples, a resumed run
gives the samples it would have given. Validation (``train=False``) is deterministic and epoch-independent: the
longest clip from the start of the middle 80 %, no frame crop, no caption dropout.

Differences from V2, on purpose: the clip length is drawn per sample (V2 draws it per batch in the collate
function) so that the batch sampler can group samples by ``(type, bucket, clip length)``; the per-sample marginal is
V2's. V2's start bound ``int(0.1 · int(0.9 · L))`` is taken as the intended ``int(0.1 · L)``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from ..video import probe_video, read_video
from .buckets import BucketBatchSampler, closest_bucket, resize_center_crop, scaled_buckets
from .meta import load_meta, resolve_media_path

logger = logging.getLogger(__name__)

MAX_SUBSTITUTE_TRIES = 8
_RNG_LENGTH, _RNG_START, _RNG_TEXT, _RNG_SUBSTITUTE, _RNG_AUGMENT = 1, 2, 3, 4, 5


def frame_length_choices(num_frames: int, offset: int = 0, step: int = 9) -> tuple[list[int], np.ndarray]:
    """V2's ``--random_frame_crop`` lengths ``[1, 9, 18, …, num_frames]`` and their probabilities (the slice VAE's
    layout, ``offset=1, step=8``: ``[1, 9, 17, …]``)."""
    if num_frames == 1:
        return [1], np.ones(1)
    if num_frames <= offset or (num_frames - offset) % step:
        rule = f"{offset} + {step}k" if offset else f"a multiple of {step}"
        raise ValueError(f"num_frames must be 1 or {rule}, got {num_frames}")
    choices = [1] + list(range(offset + step, num_frames + 1, step))
    probs = np.full(len(choices), 0.1 / (len(choices) - 1))
    probs[-1] = 0.9
    return choices, probs / probs.sum()


def usable_frames(n: int, offset: int = 0, step: int = 9) -> int:
    """Round a frame count down to what the VAE takes: 1 or ``offset + step·k`` (V2: ``max(1, n // 9 * 9)``)."""
    if n < offset + step:
        return 1
    return offset + (n - offset) // step * step


def with_frame_rule(cfg: DataConfig, frame_rule: tuple[int, int]) -> DataConfig:
    """``cfg`` with the clip-length rule of the VAE that encodes the clips (``AutoencoderKLMagvit.frame_rule``:
    ``(0, 9)`` for V2's chunks, ``(1, 8)`` for the slice VAE)."""
    offset, step = (int(v) for v in frame_rule)
    return dataclasses.replace(cfg, frame_offset=offset, frame_step=step)


def middle_range(length: int) -> tuple[int, int]:
    """Frames ``[lo, hi)`` of the middle 80 % of a ``length``-frame video (whole video when that is empty)."""
    lo, hi = length // 10, (9 * length) // 10
    if hi <= lo:
        return 0, max(1, length)
    return lo, hi


def split_train_validation(entries: Sequence[dict], count: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out ``count`` entries for validation, chosen by ``seed`` only; both lists keep the meta order.

    At least one entry stays in training; ``count <= 0`` holds out nothing.
    """
    entries = list(entries)
    count = max(0, min(int(count), len(entries) - 1))
    if count == 0:
        return entries, []
    picked = set(np.random.default_rng([int(seed), 0x7A1]).permutation(len(entries))[:count].tolist())
    train = [e for i, e in enumerate(entries) if i not in picked]
    val = [e for i, e in enumerate(entries) if i in picked]
    return train, val


class VideoTextDataset(Dataset):
    """Map-style dataset over a meta JSON/CSV (or its entries); see the module docstring for the recipe.

    ``meta_path_or_entries``: a meta file path (``None`` → ``cfg.meta``), or entries (as ``load_meta`` returns them,
    or raw ``{"file_path", "text", "type"}`` dicts, which then need ``root`` or ``cfg.root``). Paths are resolved
    against ``root`` → ``cfg.root`` → the meta file's folder and may not leave it (absolute only with
    ``cfg.allow_absolute_paths``).

    Entries carrying ``width``/``height`` (and ``num_frames`` for videos) are bucketed without opening the file;
    others are probed once here. An entry that cannot be probed is skipped with a warning (``skipped``, and it counts
    in ``failures``). A file that fails to load in ``__getitem__`` is replaced by another sample of the same group
    (chosen deterministically), with a warning; ``failures`` counts these (per process: with DataLoader workers each
    worker has its own copy, so read the ``substituted`` count of the collated batches instead).

    Dataset indices run over the expanded list: images once, videos ``cfg.video_repeat`` times (0 ⇒ no videos, as in
    V2).
    """

    def __init__(self, meta_path_or_entries: str | Path | Sequence[dict] | None, cfg: DataConfig, *,
                 root: str | Path | None = None, train: bool = True) -> None:
        self.cfg = cfg
        self.train = train
        self.epoch = 0
        self.failures = 0
        self.skipped: list[str] = []
        frame_length_choices(cfg.num_frames, cfg.frame_offset, cfg.frame_step)  # validates num_frames
        if cfg.stride < 1:
            raise ValueError(f"stride must be >= 1, got {cfg.stride}")
        root = root if root is not None else (cfg.root or None)
        source = meta_path_or_entries if meta_path_or_entries is not None else (cfg.meta or None)
        if source is None:
            raise ValueError("no meta: pass a meta path or entries, or set data.meta")
        if isinstance(source, (str, Path)):
            entries = load_meta(source, root, cfg.allow_absolute_paths)
        else:
            entries = []
            for i, raw in enumerate(source):
                entry = dict(raw)
                if root is not None:
                    entry["abs_path"] = str(resolve_media_path(root, entry["file_path"], cfg.allow_absolute_paths))
                elif "abs_path" not in entry:
                    raise ValueError(f"entry {i} ({entry.get('file_path')!r}) has no resolved path; pass root")
                entry.setdefault("type", "video")
                entries.append(entry)
        self.buckets = scaled_buckets(cfg.sample_size)
        square = max(16, cfg.sample_size // 16 * 16)
        items: list[dict[str, Any]] = []
        for entry in entries:
            item = self._describe(entry, square)
            if item is None:
                continue
            items.extend([item] * (1 if item["type"] == "image" else max(0, int(cfg.video_repeat))))
        if not items:
            raise ValueError("the dataset is empty (no readable entries; video_repeat=0 drops all videos)")
        self.items = items
        self._lengths_cache: tuple[int, np.ndarray] | None = None
        self._bad: set[int] = set()

    # --- description (no decoding) ------------------------------------------------------------------------------------

    def _describe(self, entry: dict, square: int) -> dict[str, Any] | None:
        kind = entry.get("type", "video")
        path = entry["abs_path"]
        try:
            width, height = int(entry.get("width") or 0), int(entry.get("height") or 0)
            length = int(entry.get("num_frames") or 0) if kind == "video" else 1
            if kind == "image" and not (width and height):
                with Image.open(path) as im:
                    width, height = im.size
            elif kind == "video" and not (width and height and length):
                info = probe_video(path)
                width, height, length = info["width"], info["height"], info["num_frames"]
            if width <= 0 or height <= 0 or length <= 0:
                raise ValueError(f"bad size {width}x{height}x{length}")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, not fatal
            logger.warning("skipping %s: cannot read its size (%s: %s)", entry["file_path"], type(exc).__name__, exc)
            self.failures += 1
            self.skipped.append(entry["file_path"])
            return None
        if self.cfg.enable_bucket:
            key, size = closest_bucket(height, width, self.buckets)
        else:
            key, size = "square", (square, square)
        if kind == "image":
            max_frames = 1
        else:
            lo, hi = middle_range(length)
            max_frames = usable_frames(min(self.cfg.num_frames, hi - lo), self.cfg.frame_offset, self.cfg.frame_step)
        return {"entry": entry, "type": kind, "path": path, "width": width, "height": height, "length": length,
                "bucket": key, "size": size, "max_frames": max_frames}

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """The epoch that seeds the random choices (the batch sampler calls this from its ``set_epoch``)."""
        self.epoch = int(epoch)

    def _rng(self, epoch: int, index: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([int(self.cfg.seed), int(epoch), int(index), purpose])

    def _drawn_lengths(self, epoch: int) -> np.ndarray:
        if self._lengths_cache is None or self._lengths_cache[0] != epoch:
            choices, probs = frame_length_choices(self.cfg.num_frames, self.cfg.frame_offset, self.cfg.frame_step)
            rng = np.random.default_rng([int(self.cfg.seed), int(epoch), _RNG_LENGTH])
            self._lengths_cache = (epoch, rng.choice(np.asarray(choices), size=len(self.items), p=probs))
        return self._lengths_cache[1]

    def clip_frames(self, index: int, epoch: int | None = None) -> int:
        """Frames ``F`` of sample ``index`` in ``epoch`` (1 for images; 1 or a multiple of 9)."""
        item = self.items[index]
        if item["type"] == "image":
            return 1
        if not (self.train and self.cfg.random_frame_crop):
            return item["max_frames"]
        drawn = int(self._drawn_lengths(self.epoch if epoch is None else epoch)[index])
        return min(drawn, item["max_frames"])

    def group_key(self, index: int, epoch: int | None = None) -> tuple[str, str, int]:
        """``(type, bucket, F)``: samples with equal keys stack into one batch."""
        item = self.items[index]
        return item["type"], item["bucket"], self.clip_frames(index, epoch)

    def group_keys(self, epoch: int | None = None) -> list[tuple[str, str, int]]:
        return [self.group_key(i, epoch) for i in range(len(self.items))]

    def frame_indices(self, index: int, epoch: int | None = None, frames: int | None = None) -> np.ndarray:
        """Source frame numbers sample ``index`` reads in ``epoch`` (``[0]`` for images)."""
        item = self.items[index]
        epoch = self.epoch if epoch is None else epoch
        n = self.clip_frames(index, epoch) if frames is None else int(frames)
        if item["type"] == "image":
            return np.zeros(1, dtype=np.int64)
        lo, hi = middle_range(item["length"])
        span = min(hi - lo, (n - 1) * self.cfg.stride + 1)
        if self.train and hi - lo > span:
            start = int(self._rng(epoch, index, _RNG_START).integers(lo, hi - span + 1))
        else:
            start = lo
        return np.linspace(start, start + span - 1, n).round().astype(np.int64)

    # --- loading ------------------------------------------------------------------------------------------------------

    def _read_frames(self, item: dict, indices: np.ndarray) -> np.ndarray:
        if item["type"] == "image":
            with Image.open(item["path"]) as im:
                return np.asarray(im.convert("RGB"))[None]
        steps = np.diff(indices)
        if len(indices) == 1 or (steps.min() == steps.max() and steps[0] > 0):
            step = int(steps[0]) if len(indices) > 1 else 1
            frames = read_video(item["path"], max_frames=len(indices), start=int(indices[0]), step=step)
        else:  # squeezed stride: decode the span, pick the frames
            span = read_video(item["path"], max_frames=int(indices[-1] - indices[0]) + 1, start=int(indices[0]))
            frames = span[np.minimum(indices - indices[0], len(span) - 1)]
        if len(frames) < len(indices):  # the container held fewer frames than the meta/probe said
            logger.warning("%s: %d of %d frames decoded; repeating the last", item["entry"]["file_path"],
                           len(frames), len(indices))
            frames = np.concatenate([frames, np.repeat(frames[-1:], len(indices) - len(frames), axis=0)])
        return frames

    def _load(self, index: int, epoch: int, frames: int, size: tuple[int, int]) -> torch.Tensor:
        item = self.items[index]
        raw = self._read_frames(item, self.frame_indices(index, epoch, frames))
        if self.train and (self.cfg.random_zoom > 1.0 or self.cfg.random_flip):
            x = self._augment(raw, size, self._rng(epoch, index, _RNG_AUGMENT))
        else:
            x = resize_center_crop(raw, size)  # (F, 3, H, W) in [0, 1]
        return x.mul_(2.0).sub_(1.0).permute(1, 0, 2, 3).contiguous()  # (C, F, H, W) in [-1, 1]

    def _augment(self, raw: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> torch.Tensor:
        """``raw`` resized to ``zoom`` × ``size`` (short side) and cropped to ``size`` at a random place (zoom > 1), or
        the centre crop; maybe mirrored."""
        th, tw = int(size[0]), int(size[1])
        if self.cfg.random_zoom > 1.0:
            zoom = float(rng.uniform(1.0, self.cfg.random_zoom))
            h, w = raw.shape[1:3]
            scale = zoom * max(th / h, tw / w)
            x = resize_center_crop(raw, (max(th, round(h * scale)), max(tw, round(w * scale))))  # whole frame, resized
            top = int(rng.integers(0, x.shape[-2] - th + 1))
            left = int(rng.integers(0, x.shape[-1] - tw + 1))
            x = x[..., top:top + th, left:left + tw]
        else:
            x = resize_center_crop(raw, size)
        if self.cfg.random_flip and rng.random() < 0.5:
            x = x.flip(-1)
        return x.contiguous()

    def _text(self, index: int, epoch: int) -> str:
        text = self.items[index]["entry"].get("text", "")
        if self.train and self.cfg.caption_dropout > 0 and \
                self._rng(epoch, index, _RNG_TEXT).random() < self.cfg.caption_dropout:
            return ""
        return text

    def _substitutes(self, index: int, epoch: int, frames: int) -> list[int]:
        """Replacement candidates, deterministic: same group first, then same type/bucket, then same type."""
        item = self.items[index]
        key = self.group_key(index, epoch)
        order = self._rng(epoch, index, _RNG_SUBSTITUTE).permutation(len(self.items)).tolist()
        tiers: list[list[int]] = [[], [], []]
        for j in order:
            if j == index or j in self._bad or self.items[j]["path"] == item["path"]:
                continue
            other = self.items[j]
            if other["type"] != item["type"] or other["max_frames"] < frames:
                continue
            if self.group_key(j, epoch) == key:
                tiers[0].append(j)
            elif other["bucket"] == item["bucket"]:
                tiers[1].append(j)
            else:
                tiers[2].append(j)
        return tiers[0] + tiers[1] + tiers[2]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        epoch = self.epoch if self.train else 0
        item = self.items[index]
        frames, size = self.clip_frames(index, epoch), item["size"]
        candidates: list[int] | None = None
        current, tries = index, 0
        while True:
            try:
                if current in self._bad:
                    raise RuntimeError("known bad")
                pixels = self._load(current, epoch, frames, size)
                break
            except Exception as exc:  # a bad file must not stop training
                if current not in self._bad:
                    self._bad.add(current)
                    self.failures += 1
                    logger.warning("cannot load %s (%s: %s); substituting another sample",
                                   self.items[current]["entry"]["file_path"], type(exc).__name__, exc)
                if candidates is None:
                    candidates = self._substitutes(index, epoch, frames)
                candidates = [c for c in candidates if c not in self._bad]
                if not candidates or tries >= MAX_SUBSTITUTE_TRIES:
                    raise RuntimeError(f"sample {index} ({item['entry']['file_path']}) is unreadable and no "
                                       f"substitute of its group loaded") from exc
                current, tries = candidates.pop(0), tries + 1
        chosen = self.items[current]
        return {"pixel_values": pixels, "text": self._text(current, epoch), "type": chosen["type"],
                "file_path": chosen["entry"]["file_path"], "index": current, "substituted": current != index}


def collate_fn(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a homogeneous batch: ``pixel_values`` (B, C, F, H, W), ``text``/``file_path`` lists, ``type`` str,
    ``index`` (B,) long, ``substituted`` = how many samples were replacements for unreadable files."""
    if not samples:
        raise ValueError("empty batch")
    kinds = {s["type"] for s in samples}
    shapes = {tuple(s["pixel_values"].shape) for s in samples}
    if len(kinds) != 1 or len(shapes) != 1:
        raise ValueError(f"batch is not homogeneous: types {sorted(kinds)}, shapes {sorted(shapes)}")
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "text": [s["text"] for s in samples],
        "type": samples[0]["type"],
        "file_path": [s["file_path"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "substituted": sum(bool(s.get("substituted")) for s in samples),
    }


class BucketDataLoader(DataLoader):
    """A DataLoader whose bucket sampler's ``consumed`` counts the batches the loop actually received.

    With workers the DataLoader draws batches from the sampler ahead of use; this keeps
    ``loader.batch_sampler.state_dict()`` at the last batch handed to the training loop. Workers are not persistent
    (each ``iter()`` copies the dataset, so ``set_epoch`` reaches them).
    """

    def __iter__(self):
        sampler = self.batch_sampler
        start = sampler._resume_from if isinstance(sampler, BucketBatchSampler) else 0
        for n, batch in enumerate(super().__iter__(), start=1):
            if isinstance(sampler, BucketBatchSampler):
                sampler.consumed = start + n
            yield batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def build_dataloader(dataset: VideoTextDataset, cfg: DataConfig, *, rank: int = 0, world_size: int = 1,
                     epoch: int = 0, start_batch: int = 0, drop_last: bool | None = None,
                     shuffle: bool | None = None) -> BucketDataLoader:
    """DataLoader over ``dataset`` with a ``BucketBatchSampler`` (``loader.batch_sampler``).

    ``cfg.batch_size`` per rank, ``cfg.workers`` workers (0 = load in this process). ``shuffle`` defaults to
    ``dataset.train``; ``drop_last`` defaults to False (partial batches kept; a small dataset with many buckets would
    otherwise yield nothing). ``start_batch`` skips this rank's first batches of ``epoch`` (resume); for a resumed
    run prefer ``loader.batch_sampler.load_state_dict(state)``. Call ``loader.batch_sampler.set_epoch(e)`` before
    each later epoch (it also sets the dataset's epoch). Sharding is done here: do not let another wrapper
    (e.g. ``accelerator.prepare``) shard this loader again.
    """
    sampler = BucketBatchSampler(
        dataset.group_keys, cfg.batch_size,
        num_replicas=world_size, rank=rank, shuffle=dataset.train if shuffle is None else shuffle,
        seed=cfg.seed, drop_last=bool(drop_last), on_epoch=dataset.set_epoch)
    sampler.set_epoch(epoch)
    if start_batch:
        sampler.start_at(start_batch)
    # the loader's own generator: iterating must not draw from the global RNG (that would break exact resume)
    generator = torch.Generator().manual_seed(cfg.seed + 7919 * rank)
    return BucketDataLoader(dataset, batch_sampler=sampler, num_workers=max(0, int(cfg.workers)),
                            collate_fn=collate_fn, worker_init_fn=_worker_init if cfg.workers else None,
                            generator=generator)


def load_train_validation(cfg: DataConfig, meta: str | Path | None = None, root: str | Path | None = None
                          ) -> tuple[VideoTextDataset, VideoTextDataset | None]:
    """Train and validation datasets from one meta file: ``cfg.validation_count`` entries held out by ``cfg.seed``."""
    meta = meta if meta is not None else (cfg.meta or None)
    if meta is None:
        raise ValueError("no meta: pass a meta path or set data.meta")
    root = root if root is not None else (cfg.root or None)
    entries = load_meta(meta, root, cfg.allow_absolute_paths)
    train, val = split_train_validation(entries, cfg.validation_count, cfg.seed)
    train_ds = VideoTextDataset(train, cfg, root=root, train=True)
    val_ds = VideoTextDataset(val, cfg, root=root, train=False) if val else None
    return train_ds, val_ds

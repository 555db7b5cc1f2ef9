"""Aspect-ratio buckets and the bucket batch sampler (EasyAnimate V2 / PixArt-alpha recipe).

V2 trains on clips of many shapes by binning every sample into the closest of 40 aspect ratios (``ASPECT_RATIO_512``,
keys are ``H / W``), scaling the bucket sizes by ``sample_size / 512`` and keeping every batch homogeneous in
(type, bucket, clip length) so it stacks without padding.

``BucketBatchSampler`` is deterministic: the order of an epoch is a function of ``(seed, epoch)`` only. It shards whole
batches across DDP ranks (rank ``r`` takes batches ``r, r + R, r + 2R, …`` of the global list) so every rank gets the
same number of batches, and it can save/restore its position in an epoch so a resumed run continues with the next
batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

# PixArt-alpha's 512 table as V2 ships it (easyanimate/data/bucket_sampler.py): key = H / W (2 decimals), value
# [H, W], multiples of 32 with H·W ≈ 512² (within 10%). The 33 entries that diffusers publishes as
# ASPECT_RATIO_512_BIN (pipelines/pixart_alpha/pipeline_pixart_alpha.py) are identical; the 7 it omits (0.26, 0.27,
# 2.89, 3.11, 3.62, 3.75, 3.88) are the PixArt-alpha / V2 values.
ASPECT_RATIO_512: dict[str, list[float]] = {
    "0.25": [256.0, 1024.0], "0.26": [256.0, 992.0], "0.27": [256.0, 960.0], "0.28": [256.0, 928.0],
    "0.32": [288.0, 896.0], "0.33": [288.0, 864.0], "0.35": [288.0, 832.0], "0.4": [320.0, 800.0],
    "0.42": [320.0, 768.0], "0.48": [352.0, 736.0], "0.5": [352.0, 704.0], "0.52": [352.0, 672.0],
    "0.57": [384.0, 672.0], "0.6": [384.0, 640.0], "0.68": [416.0, 608.0], "0.72": [416.0, 576.0],
    "0.78": [448.0, 576.0], "0.82": [448.0, 544.0], "0.88": [480.0, 544.0], "0.94": [480.0, 512.0],
    "1.0": [512.0, 512.0], "1.07": [512.0, 480.0], "1.13": [544.0, 480.0], "1.21": [544.0, 448.0],
    "1.29": [576.0, 448.0], "1.38": [576.0, 416.0], "1.46": [608.0, 416.0], "1.67": [640.0, 384.0],
    "1.75": [672.0, 384.0], "2.0": [704.0, 352.0], "2.09": [736.0, 352.0], "2.4": [768.0, 320.0],
    "2.5": [800.0, 320.0], "2.89": [832.0, 288.0], "3.0": [864.0, 288.0], "3.11": [896.0, 288.0],
    "3.62": [928.0, 256.0], "3.75": [960.0, 256.0], "3.88": [992.0, 256.0], "4.0": [1024.0, 256.0],
}


def scaled_buckets(sample_size: int = 512, multiple: int = 16) -> dict[str, tuple[int, int]]:
    """``ASPECT_RATIO_512`` scaled by ``sample_size / 512``, each side floored to a multiple of ``multiple``.

    V2 floors to 16 (VAE ×8 · DiT patch 2) in its collate function: ``int(x / 16) * 16``. Sides never go below
    ``multiple``.
    """
    if sample_size <= 0 or multiple <= 0:
        raise ValueError(f"sample_size and multiple must be positive, got {sample_size} and {multiple}")
    scale = sample_size / 512.0
    out = {}
    for key, (h, w) in ASPECT_RATIO_512.items():
        out[key] = (max(multiple, int(h * scale / multiple) * multiple),
                    max(multiple, int(w * scale / multiple) * multiple))
    return out


def closest_bucket(height: float, width: float, buckets: dict[str, Any] | None = None) -> tuple[str, tuple[int, int]]:
    """The bucket whose ratio key (``H / W``) is nearest to ``height / width`` → ``(key, (H, W))``.

    Ties go to the first key in table order (V2's ``min`` over the keys).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    buckets = scaled_buckets(512) if buckets is None else buckets
    ratio = height / width
    key = min(buckets, key=lambda k: abs(float(k) - ratio))
    h, w = buckets[key]
    return key, (int(h), int(w))


def resize_center_crop(frames, size: tuple[int, int]) -> torch.Tensor:
    """Resize so the short side covers ``size`` (keeping the aspect ratio), then centre-crop to exactly ``size``.

    ``frames``: uint8 ``(F, H, W, 3)`` (numpy or tensor) → float32 ``(F, 3, H', W')`` in [0, 1]; a float tensor
    ``(F, 3, H, W)`` keeps its value range. Bilinear with antialiasing (V2: torchvision ``Resize`` BILINEAR +
    ``CenterCrop``).
    """
    th, tw = int(size[0]), int(size[1])
    if isinstance(frames, np.ndarray):
        frames = np.ascontiguousarray(frames)
        frames = torch.from_numpy(frames if frames.flags.writeable else frames.copy())
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4:
        raise ValueError(f"expected frames (F,H,W,3) uint8 or (F,3,H,W) float, got {getattr(frames, 'shape', frames)}")
    if frames.dtype == torch.uint8:
        if frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames (F,H,W,3), got {tuple(frames.shape)}")
        x = frames.permute(0, 3, 1, 2).float().div_(255.0)
    else:
        if frames.shape[1] != 3:
            raise ValueError(f"expected float frames (F,3,H,W), got {tuple(frames.shape)}")
        x = frames.float()
    h, w = x.shape[-2:]
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = round((nh - th) / 2.0), round((nw - tw) / 2.0)
    return x[:, :, top:top + th, left:left + tw]


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, homogeneous per group key (``(type, bucket, clip length)``), deterministic.

    ``groups``: one hashable key per dataset index, or a callable ``epoch -> keys`` (keys may change per epoch, e.g.
    the random clip length of ``--random_frame_crop``).

    One epoch (a pure function of ``seed`` and ``epoch``):

    1. indices are permuted (``shuffle``) and streamed into per-key buckets; a bucket that reaches ``batch_size``
       becomes a batch (V2's ``AspectRatioBatchImageVideoSampler``);
    2. leftover partial batches are dropped (``drop_last=True``) or kept (``drop_last=False``), and with ``shuffle``
       the batch order is permuted so partial batches are not always last;
    3. the global batch list is made a multiple of ``num_replicas``: truncated (``drop_last=True``) or padded by
       repeating its first batches (``drop_last=False``, like ``DistributedSampler``; only the padding repeats data);
    4. rank ``r`` takes global batches ``r, r + R, …``: ranks see disjoint data (apart from padding) and the same
       number of batches, so DDP never waits on a rank that ran out.

    Position: ``consumed`` counts this rank's batches handed out in the current epoch (exact when the sampler is
    iterated directly or by a ``num_workers=0`` DataLoader; ``BucketDataLoader`` corrects it for prefetching
    workers). ``state_dict()`` stores ``(epoch, batches_consumed)``; after ``load_state_dict()`` the next ``__iter__``
    resumes with the following batch. ``set_epoch`` with the same epoch keeps a pending resume; a new epoch starts at
    batch 0. ``__len__`` is what the next ``__iter__`` yields (the remainder when resuming); ``num_batches`` is a
    full epoch.
    """

    def __init__(self, groups: Sequence[Hashable] | Callable[[int], Sequence[Hashable]], batch_size: int, *,
                 num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 on_epoch: Callable[[int], None] | None = None) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}")
        self._groups = groups
        self.batch_size = batch_size
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.on_epoch = on_epoch
        self.epoch = 0
        self.consumed = 0
        self._resume_from = 0  # this rank's batches to skip at the next __iter__
        self._cache: tuple[int, list[list[int]]] | None = None

    # --- epoch plan ---------------------------------------------------------------------------------------------------

    def _keys(self, epoch: int) -> Sequence[Hashable]:
        return self._groups(epoch) if callable(self._groups) else self._groups

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All ranks' batches of an epoch, in order, already padded/truncated to a multiple of ``num_replicas``."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        keys = self._keys(epoch)
        n = len(keys)
        rng = np.random.default_rng([self.seed, epoch, 0x5A3])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        open_buckets: dict[Hashable, list[int]] = {}
        batches: list[list[int]] = []
        for idx in order.tolist():
            bucket = open_buckets.setdefault(keys[idx], [])
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                batches.append(bucket[:])
                bucket.clear()
        if not self.drop_last:
            batches.extend(b for b in open_buckets.values() if b)
        if self.shuffle and batches:
            batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
        r = self.num_replicas
        if len(batches) % r:
            if self.drop_last or not batches:
                batches = batches[:len(batches) - len(batches) % r]
            else:
                pad = r - len(batches) % r
                batches = batches + [batches[i % len(batches)] for i in range(pad)]
        self._cache = (epoch, batches)
        return batches

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's full list of batches for an epoch."""
        return self.global_batches(epoch)[self.rank::self.num_replicas]

    @property
    def num_batches(self) -> int:
        """This rank's batches in a full epoch."""
        return len(self.global_batches()) // self.num_replicas

    # --- Sampler API --------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles). A pending resume survives only if ``epoch`` is the resumed one."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self._resume_from = 0
            self.consumed = 0
        self.epoch = epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.batches()
        start, self._resume_from = self._resume_from, 0
        self.consumed = start
        for batch in mine[start:]:
            self.consumed += 1
            yield list(batch)

    def __len__(self) -> int:
        return max(0, self.num_batches - self._resume_from)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_consumed": int(self.consumed), "seed": self.seed,
                "num_replicas": self.num_replicas, "batch_size": self.batch_size, "drop_last": self.drop_last,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next ``__iter__`` yields the batch after the last consumed one of ``state['epoch']``.

        A different ``num_replicas`` is mapped through the global position (``consumed · R_old``), rounded down, so
        a few batches may repeat; ``seed``/``batch_size`` changes alter the plan and are refused.
        """
        for key in ("seed", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler has {getattr(self, key)!r}")
        self.epoch = int(state["epoch"])
        consumed = int(state["batches_consumed"])
        old_r = int(state.get("num_replicas", self.num_replicas))
        if old_r != self.num_replicas:
            consumed = (consumed * old_r) // self.num_replicas
        self._resume_from = consumed
        self.consumed = consumed
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)

    def start_at(self, batch: int) -> None:
        """Skip this rank's first ``batch`` batches at the next ``__iter__`` (the position ``state_dict`` reports)."""
        self._resume_from = self.consumed = max(0, int(batch))


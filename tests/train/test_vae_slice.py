"""``train-vae`` with the slice VAE layout (``tiny_slice`` preset): clips of 1 + 8k frames from real sample videos,
validation PSNR rises, the final folder is a slice VAE, and a resumed run continues exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import write_square_clips

# shots of bikes.mp4 (hard cuts at 30, 76, 137, 187, 242) and carphone: 24 frames each, so the dataset's middle 80 %
# ([2, 21)) holds a 17-frame clip (the first frame alone + two 8-frame slices)
SHOTS = (("bikes.mp4", (3, 42, 100, 150, 200)), ("carphone_pristine.mp4", (5, 45)))
SIZE = 32
# 9-frame clips (1 + 8: the first frame alone and one slice) keep the run CPU-sized; 17 is the preset's
FAST = ["data.sample_size=32", "data.validation_count=2", "train.log_every=1", "train.lr_scheduler=cosine",
        "train.vae.num_frames=9"]
STEPS, CKPT = 24, 18
# Measured with these settings (seed 42): validation PSNR 10.71 -> 11.95 dB (+1.24; 16 steps on 17-frame clips: +1.65).
# The slice layout learns slower than V2's 9-frame chunks in so few steps (+3.2..4.9 dB); assert a clear rise.
MIN_PSNR_GAIN_DB = 0.8


def _make_dataset(root: Path) -> Path:
    return write_square_clips(root, SHOTS, max_frames=24, size=SIZE)


def _metrics(output: Path) -> list[dict]:
    from easyanimate.tracking import JsonlTracker

    return JsonlTracker(output).read_metrics()


@pytest.fixture(scope="module")
def slice_run(tmp_path_factory):
    from easyanimate.config import load_config
    from easyanimate.train.vae import train_vae

    meta = _make_dataset(tmp_path_factory.mktemp("slice_data"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # equal numerics for the resume comparison
    output = tmp_path_factory.mktemp("slice_run")
    cfg = load_config("tiny_slice", [*FAST, f"train.max_steps={STEPS}", f"train.validation_steps={STEPS}",
                                     f"train.checkpointing_steps={CKPT}"])
    summary = train_vae(cfg, meta, output)
    yield cfg, meta, output, summary
    torch.set_num_threads(before)


def test_slice_vae_trains_on_1_plus_8k_clips(slice_run):
    from easyanimate.config import load_config
    from easyanimate.data.dataset import load_train_validation
    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit
    from easyanimate.train.vae import vae_data_config

    cfg, meta, output, summary = slice_run
    gain = summary["psnr_final"] - summary["psnr_step0"]
    print(f"slice VAE validation PSNR {summary['psnr_step0']:.2f} -> {summary['psnr_final']:.2f} dB")
    assert gain >= MIN_PSNR_GAIN_DB, f"PSNR {summary['psnr_step0']:.2f} -> {summary['psnr_final']:.2f} dB"
    train, val = load_train_validation(vae_data_config(cfg), meta)
    assert {train.clip_frames(i) for i in range(len(train))} == {9}  # 1 + 8, the layout from the config
    assert val[0]["pixel_values"].shape[1] == 9
    vae = AutoencoderKLMagvit.from_pretrained(str(summary["final"]))
    assert vae.config.slice_compression_vae and vae.frame_rule == (1, 8)
    with torch.no_grad():
        assert vae.encode(val[0]["pixel_values"][None]).latent_dist.mean.shape[2] == 3
    # a count off the 1 + 8k rule is refused with the rule in the message
    with pytest.raises(ValueError, match=r"num_frames must be 1 or 1 \+ 8k, got 12"):
        load_train_validation(vae_data_config(load_config("tiny_slice", ["train.vae.num_frames=12"])), meta)


def test_slice_vae_resume_continues_exactly(slice_run, tmp_path):
    from easyanimate.train.vae import train_vae

    cfg, meta, output, summary = slice_run
    ckpt = output / "checkpoints" / f"checkpoint-{CKPT}"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = train_vae(cfg, meta, tmp_path / "resumed", resume=str(ckpt))
    finally:
        torch.set_num_threads(before)
    original = {r["step"]: r for r in _metrics(output) if "loss" in r}
    again = [r for r in _metrics(tmp_path / "resumed") if "loss" in r]
    assert [r["step"] for r in again] == list(range(CKPT + 1, STEPS + 1))
    for r in again:
        for key in ("loss", "l1", "kl", "grad_norm"):
            assert r[key] == pytest.approx(original[r["step"]][key], rel=1e-4, abs=1e-7), (r["step"], key)
    assert resumed["psnr_final"] == pytest.approx(summary["psnr_final"], abs=1e-3)
    a = load_file(str(output / "final" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "diffusion_pytorch_model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)

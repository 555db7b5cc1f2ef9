"""Tests of the EasyAnimate V2 MagViT VAE (``easyanimate.models.autoencoder_magvit.AutoencoderKLMagvit``).

* the official config builds the official state-dict layout (manifest, meta device);
* numerical parity with the official V2 code on the golden case ``vae_V1``;
* the V2 pipeline chunking helpers (``encode_chunked`` / ``decode_chunked`` incl. seam smoothing);
* loading quirks of the released files (``_class_name: "AutoencoderKL"``, extra ``loss.*`` tensors);
* config validation.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file, save_file

from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
GOLDEN = FIXTURES / "golden"
GOLDEN_VAE = GOLDEN / "vae_V"
MANIFEST = FIXTURES / "easyanimate_v2_vae_state_dict.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TOL = {"rtol": 1e-4, "atol": 1e-4}

TINY_CONFIG = {
    "ch": 16,
    "ch_mult": [1, 1, 2, 2],
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 16,
}


@pytest.fixture(autouse=True)
def _two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def golden_tensors():
    # clone: tensors straight from safetensors can be unaligned, which changes the last bits
    return {k: v.clone() for k, v in load_file(str(GOLDEN / "vae_V1.safetensors")).items()}


@pytest.fixture(scope="module")
def golden_model():
    return AutoencoderKLMagvit.from_pretrained(str(GOLDEN_VAE)).eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoencoderKLMagvit(**TINY_CONFIG).eval()


def _video(frames: int, size: int = 16, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=g) * 2 - 1


def _latents(frames: int, size: int = 2, batch: int = 1, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, frames, size, size, generator=g) * scale


# ------------------------------------------------------------------------------------------------ manifest
def test_official_config_matches_manifest_on_meta_device():
    manifest = json.loads(MANIFEST.read_text())
    with torch.device("meta"):
        model = AutoencoderKLMagvit.from_config(manifest["config"])
    sd = model.state_dict()
    assert list(sd) == list(manifest["params"])  # same names, same order
    assert {k: list(v.shape) for k, v in sd.items()} == manifest["params"]
    assert sum(p.numel() for p in model.parameters()) == 245_979_879 == manifest["num_params"]
    # `_class_name: "AutoencoderKL"` in the official config must not drop AutoencoderKL's keys
    assert model.config.block_out_channels == [128, 256, 512, 512]
    assert model.config.sample_size == 256 and model.config.force_upcast is True
    assert model.config.scaling_factor == pytest.approx(0.18215)
    assert (model.config.mini_batch_encoder, model.config.mini_batch_decoder) == (9, 3)
    assert model.spatial_compression_ratio == 8
    assert model.latent_frames(9) == 3 and model.latent_frames(1) == 1 and model.latent_frames(17) == 5
    assert model.decoded_frames(3) == 9 and model.decoded_frames(1) == 1 and model.decoded_frames(2) == 5


def test_defaults_are_v2():
    with torch.device("meta"):
        model = AutoencoderKLMagvit()
    assert model.config.ch == 128 and list(model.config.ch_mult) == [1, 2, 4, 4]
    assert model.config.block_out_channels == [128, 256, 512, 512]
    assert model.config.scaling_factor == pytest.approx(0.18215)
    assert sum(p.numel() for p in model.parameters()) == 245_979_879


# ------------------------------------------------------------------------------------------------ golden
def test_golden_vae_v1(golden_model, golden_tensors):
    g = golden_tensors
    sample = g["sample"].clone()
    with torch.no_grad():
        encoder_out = golden_model.encoder(sample)
        posterior = golden_model.encode(sample).latent_dist
        moments, mean = posterior.parameters, posterior.mean
        decoded = golden_model.decode(mean.contiguous()).sample
        forward = golden_model(sample).sample
    errs = {
        "intermediate.encoder_out": (encoder_out - g["intermediate.encoder_out"]).abs().max().item(),
        "moments": (moments - g["moments"]).abs().max().item(),
        "latent_mean": (mean - g["latent_mean"]).abs().max().item(),
        "decoded": (decoded - g["decoded"]).abs().max().item(),
    }
    print("golden vae_V1 max abs errors:", json.dumps(errs))
    assert moments.shape == (1, 8, 3, 4, 4) and decoded.shape == (1, 3, 9, 32, 32)
    assert torch.allclose(moments, g["moments"], **TOL)
    assert torch.allclose(mean, g["latent_mean"], **TOL)
    assert torch.allclose(decoded, g["decoded"], **TOL)
    assert torch.allclose(encoder_out, g["intermediate.encoder_out"], **TOL)
    assert torch.equal(forward, decoded)  # forward uses the posterior mode


def test_golden_no_scaling_inside(golden_model, golden_tensors):
    """encode/decode never apply scaling_factor: decoding the golden mean reproduces the golden decode."""
    with torch.no_grad():
        decoded = golden_model.decode(golden_tensors["latent_mean"].clone()).sample
    assert torch.allclose(decoded, golden_tensors["decoded"], **TOL)


# ------------------------------------------------------------------------------------------------ chunking
def test_encode_chunked_matches_per_chunk_encode(tiny):
    x = _video(18)
    with torch.no_grad():
        lat = tiny.encode_chunked(x, sample=False)
        ref = torch.cat([tiny.encode(x[:, :, :9]).latent_dist.mean, tiny.encode(x[:, :, 9:]).latent_dist.mean], 2)
    assert lat.shape == (1, 4, 6, 2, 2)
    torch.testing.assert_close(lat, ref, rtol=0, atol=0)


def test_encode_chunked_sampling_uses_generator_per_chunk(tiny):
    x = _video(18)
    with torch.no_grad():
        a = tiny.encode_chunked(x, generator=torch.Generator().manual_seed(7))
        b = tiny.encode_chunked(x, generator=torch.Generator().manual_seed(7))
        gen = torch.Generator().manual_seed(7)
        ref = torch.cat([tiny.encode(x[:, :, s : s + 9]).latent_dist.sample(gen) for s in (0, 9)], 2)
        mean = tiny.encode_chunked(x, sample=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, ref, rtol=0, atol=0)
    assert not torch.allclose(a, mean)


def test_decode_chunked_matches_per_chunk_decode(tiny):
    z = _latents(6)
    with torch.no_grad():
        out = tiny.decode_chunked(z)
        ref = torch.cat([tiny.decode(z[:, :, :3]).sample, tiny.decode(z[:, :, 3:]).sample], 2).clamp(-1, 1)
        raw = tiny.decode(z[:, :, :3]).sample
    assert out.shape == (1, 3, 18, 16, 16)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.abs().max() <= 1.0
    assert raw.abs().max() > 1.0  # the clamp is really exercised


def test_single_frame_round_trip(tiny):
    x = _video(1)
    with torch.no_grad():
        lat = tiny.encode_chunked(x, sample=False)
        out = tiny.decode_chunked(lat)
        out_smooth = tiny.decode_chunked(lat, smooth=True)
    assert lat.shape == (1, 4, 1, 2, 2)
    assert out.shape == (1, 3, 1, 16, 16)
    torch.testing.assert_close(out_smooth, out, rtol=0, atol=0)


@pytest.mark.parametrize("frames", [10, 8, 2, 17])
def test_encode_chunked_rejects_bad_frame_count(tiny, frames):
    with pytest.raises(ValueError, match=rf"mini_batch_encoder=9.*got {frames} frames"):
        tiny.encode_chunked(_video(frames, size=8))


@pytest.mark.parametrize("latent_frames", [2, 4, 5])
def test_decode_chunked_rejects_bad_latent_count(tiny, latent_frames):
    with pytest.raises(ValueError, match=rf"mini_batch_decoder=3.*got {latent_frames}"):
        tiny.decode_chunked(_latents(latent_frames, size=1))


def test_smooth_changes_only_interior_frames(tiny):
    z = _latents(9)  # 27 frames: interior [4:-5] = 18 frames = 2 re-encode chunks
    with torch.no_grad():
        base = tiny.decode_chunked(z)
        smooth = tiny.decode_chunked(z, smooth=True, generator=torch.Generator().manual_seed(3))
        # reference: V2 smooth_output on the whole interior, computed in one go
        gen = torch.Generator().manual_seed(3)
        interior = base[:, :, 4:-5]
        lat = torch.cat([tiny.encode(interior[:, :, s : s + 9]).latent_dist.sample(gen) for s in (0, 9)], 2)
        mid = torch.cat([tiny.decode(lat[:, :, s : s + 3]).sample for s in (0, 3)], 2)
        expected = base.clone()
        expected[:, :, 4:-5] = (interior + mid) / 2
        expected = expected.clamp(-1, 1)
    assert smooth.shape == base.shape == (1, 3, 27, 16, 16)
    torch.testing.assert_close(smooth[:, :, :4], base[:, :, :4], rtol=0, atol=0)
    torch.testing.assert_close(smooth[:, :, -5:], base[:, :, -5:], rtol=0, atol=0)
    assert (smooth[:, :, 4:-5] - base[:, :, 4:-5]).abs().amax(dim=(0, 1, 3, 4)).min() > 0  # every interior frame
    torch.testing.assert_close(smooth, expected, rtol=0, atol=1e-6)
    assert smooth.abs().max() <= 1.0


def test_smooth_skipped_for_nine_frames(tiny):
    z = _latents(3)
    with torch.no_grad():
        torch.testing.assert_close(tiny.decode_chunked(z, smooth=True), tiny.decode_chunked(z), rtol=0, atol=0)


def test_chunked_helpers_follow_callers_grad_mode(tiny):
    z = _latents(6, scale=0.5).requires_grad_(True)
    out = tiny.decode_chunked(z, smooth=True, generator=torch.Generator().manual_seed(0))
    assert out.requires_grad
    out.square().mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    x = _video(9).requires_grad_(True)
    tiny.encode_chunked(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert not tiny.decode_chunked(z.detach()).requires_grad


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(1)
    model = AutoencoderKLMagvit(**TINY_CONFIG)
    x = _video(9, size=8)

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(x).sample
        out.square().mean().backward()
        return out.detach(), model.encoder.conv_in.weight.grad.clone(), model.decoder.conv_out.weight.grad.clone()

    plain = grads()
    model.enable_gradient_checkpointing()
    try:
        ckpt = grads()
    finally:
        model.disable_gradient_checkpointing()
    for a, b in zip(plain, ckpt, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_slicing_matches_batched(tiny):
    x = _video(9, batch=2)
    with torch.no_grad():
        m_full = tiny.encode(x).latent_dist.mean
        d_full = tiny.decode(m_full.contiguous()).sample
        tiny.enable_slicing()
        try:
            m_sliced = tiny.encode(x).latent_dist.mean
            d_sliced = tiny.decode(m_full.contiguous()).sample
        finally:
            tiny.disable_slicing()
    torch.testing.assert_close(m_sliced, m_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_sliced, d_full, rtol=1e-5, atol=1e-5)


def test_return_types(tiny):
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    x = _video(9, size=8)
    with torch.no_grad():
        enc = tiny.encode(x)
        (post,) = tiny.encode(x, return_dict=False)
        dec = tiny.decode(enc.latent_dist.mode())
        (raw,) = tiny.decode(enc.latent_dist.mode(), return_dict=False)
    assert isinstance(enc, AutoencoderKLOutput) and isinstance(enc.latent_dist, DiagonalGaussianDistribution)
    assert isinstance(post, DiagonalGaussianDistribution)
    assert isinstance(dec, DecoderOutput) and torch.equal(dec.sample, raw)


# ------------------------------------------------------------------------------------------------ loading
def _state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_folder_with_autoencoderkl_class_name(tmp_path, golden_model, golden_tensors):
    cfg = json.loads((GOLDEN_VAE / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderKL"  # as in the released vae/config.json
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / WEIGHTS_NAME).symlink_to(GOLDEN_VAE / WEIGHTS_NAME)
    model = AutoencoderKLMagvit.from_pretrained(str(tmp_path)).eval()
    # AutoencoderKL keys that ours also takes must survive the loader's class-name filtering
    assert model.config.block_out_channels == [32, 32, 64, 64]
    assert model.config.sample_size == 32
    assert model.config.force_upcast is True
    assert model.config.ch == 32 and list(model.config.ch_mult) == [1, 1, 2, 2]
    assert _state_dicts_equal(model, golden_model)
    with torch.no_grad():
        mean = model.encode(golden_tensors["sample"].clone()).latent_dist.mean
    assert torch.allclose(mean, golden_tensors["latent_mean"], **TOL)


def test_extra_loss_keys_are_ignored_with_one_note(tmp_path, golden_model, caplog):
    shutil.copy(GOLDEN_VAE / "config.json", tmp_path / "config.json")
    sd = load_file(str(GOLDEN_VAE / WEIGHTS_NAME))
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 3, 3)
    sd["loss.discriminator.main.0.bias"] = torch.randn(4)
    sd["loss.discriminator3d.blocks.0.conv.weight"] = torch.randn(2, 2, 3, 3, 3)
    sd["loss.logvar"] = torch.zeros(())
    save_file(sd, str(tmp_path / WEIGHTS_NAME))
    diffusers_logging.enable_propagation()  # so diffusers' own "were not used" warning would be seen too
    try:
        with caplog.at_level(logging.INFO):
            model = AutoencoderKLMagvit.from_pretrained(str(tmp_path))
    finally:
        diffusers_logging.disable_propagation()
    notes = [r for r in caplog.records if "ignored 4 checkpoint entries" in r.getMessage()]
    assert len(notes) == 1, [r.getMessage() for r in caplog.records]
    assert notes[0].levelno == logging.WARNING and "loss.discriminator" in notes[0].getMessage()
    assert not any("were not used" in r.getMessage() for r in caplog.records)
    assert _state_dicts_equal(model, golden_model)


def test_missing_weights_raise(tmp_path):
    shutil.copy(GOLDEN_VAE / "config.json", tmp_path / "config.json")
    sd = load_file(str(GOLDEN_VAE / WEIGHTS_NAME))
    del sd["quant_conv.weight"]
    save_file(sd, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="quant_conv.weight"):
        AutoencoderKLMagvit.from_pretrained(str(tmp_path))


def test_save_and_reload_round_trip(tmp_path, tiny):
    tiny.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "AutoencoderKLMagvit" and saved["block_out_channels"] == [16, 16, 32, 32]
    again = AutoencoderKLMagvit.from_pretrained(str(tmp_path))
    assert _state_dicts_equal(again, tiny)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"slice_compression_vae": True}, r"slice VAE: a slice of mini_batch_encoder=9 frames .* must be 3 and 9"),
        ({"causal_cache": True}, r"causal_cache=True needs slice_compression_vae=True"),
        ({"use_gc_blocks": [True, False, False, False]}, r"use_gc_blocks=None.*got use_gc_blocks="),
        ({"down_block_types": ["DownEncoderBlock2D"] * 4}, r"down_block_types from .*DownEncoderBlock2D"),
        ({"up_block_types": ["UpDecoderBlock2D"] * 4}, r"up_block_types from .*UpDecoderBlock2D"),
        ({"mid_block_type": "MidBlock2D"}, r"mid_block_type='MidBlock3D'.*MidBlock2D"),
        ({"mid_block_attention_type": "spatial"}, r"mid_block_attention_type='3d'.*spatial"),
        ({"ch_mult": [1, 2]}, r"one down block and one up block per ch_mult entry"),
        ({"norm_num_groups": 7}, r"norm_num_groups=7 must divide"),
    ],
)
def test_unsupported_configs_raise(overrides, match):
    with torch.device("meta"), pytest.raises(ValueError, match=match):
        AutoencoderKLMagvit(**{**TINY_CONFIG, **overrides})


def test_disagreeing_block_out_channels_warns(caplog):
    with caplog.at_level(logging.WARNING), torch.device("meta"):
        model = AutoencoderKLMagvit(**TINY_CONFIG, block_out_channels=[64, 64, 64, 64])
    assert any("disagrees with ch * ch_mult" in r.getMessage() for r in caplog.records)
    assert model.config.block_out_channels == [64, 64, 64, 64]
    assert model.encoder.conv_in.weight.shape[0] == 16  # built from ch * ch_mult


def test_all_false_gc_blocks_accepted():
    with torch.device("meta"):
        AutoencoderKLMagvit(**TINY_CONFIG, use_gc_blocks=[False, False, False, False])

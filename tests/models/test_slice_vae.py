"""The slice VAE (``AutoencoderKLMagvit(slice_compression_vae=True)``) and its causal-cache option.

* numerical parity with the official slice mode on the golden case ``vae_S1`` (17 frames -> 5 latents -> 17);
* the rule behind the case: first frame alone when the count is odd, independent 8-frame encoder slices, decoder
  slices that see their neighbouring latent slices only, non-square frames, three slices, the 8x temporal variant;
* the pipeline frame rule (1 + 8k frames <-> 1 + 2k latents, 1 + k in the 8x variant) and its errors;
* the causal cache: a slice-by-slice cached pass equals the whole clip through the causal convolutions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit
from easyanimate.models.vae_blocks import (
    CausalConv3d,
    SpatialTemporalUpsampler3D,
    reset_temporal_cache,
    set_temporal_mode,
)

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
TOL = {"rtol": 1e-4, "atol": 1e-4}
SLICE = {"ch": 16, "ch_mult": [1, 1, 2, 2], "norm_num_groups": 8, "layers_per_block": 1,
         "slice_compression_vae": True, "mini_batch_encoder": 8, "mini_batch_decoder": 2}
T8 = {**SLICE, "mini_batch_decoder": 1, "down_block_types": ["SpatialTemporalDownBlock3D"] * 4,
      "up_block_types": ["SpatialTemporalUpBlock3D"] * 4}


@pytest.fixture(autouse=True)
def _two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _model(**cfg) -> AutoencoderKLMagvit:
    torch.manual_seed(0)
    return AutoencoderKLMagvit(**cfg).eval()


def _video(frames: int, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------ golden parity
def test_golden_vae_s1_parity():
    model = AutoencoderKLMagvit.from_pretrained(str(GOLDEN / "vae_S")).eval()
    t = {k: v.clone() for k, v in load_file(str(GOLDEN / "vae_S1.safetensors")).items()}
    with torch.no_grad():
        posterior = model.encode(t["sample"]).latent_dist
        decoded = model.decode(t["latent_mean"].contiguous()).sample
    assert posterior.parameters.shape == (1, 8, 5, 4, 4) and decoded.shape == (1, 3, 17, 32, 32)
    torch.testing.assert_close(posterior.parameters, t["moments"], **TOL)
    torch.testing.assert_close(posterior.mean, t["latent_mean"], **TOL)
    torch.testing.assert_close(decoded, t["decoded"], **TOL)
    # the pipeline path (slices written into one output, clamped) gives the same frames
    with torch.no_grad():
        torch.testing.assert_close(model.decode_chunked(t["latent_mean"]), t["decoded"].clamp(-1, 1), **TOL)


# ------------------------------------------------------------------------------------------------ the rule
def test_encoder_slices_are_independent_and_first_frame_alone():
    model = _model(**SLICE)
    x = _video(25, h=16, w=24)  # non-square, three slices
    changed = x.clone()
    changed[:, :, 9:17] = -changed[:, :, 9:17]  # the second 8-frame slice only
    with torch.no_grad():
        a, b = model.encode(x).latent_dist.mean, model.encode(changed).latent_dist.mean
        alone = model.encode(x[:, :, :1]).latent_dist.mean
        slice1 = model.encode(x[:, :, 1:9]).latent_dist.mean  # even count: no lone first frame
    assert a.shape == (1, 4, 7, 2, 3)
    assert torch.equal(a[:, :, [0, 1, 2, 5, 6]], b[:, :, [0, 1, 2, 5, 6]])
    assert (a[:, :, 3:5] - b[:, :, 3:5]).abs().amax() > 1e-3
    torch.testing.assert_close(a[:, :, :1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[:, :, 1:3], slice1, rtol=1e-5, atol=1e-5)


def test_decoder_slices_see_only_their_neighbours():
    model = _model(**SLICE)
    z = torch.randn(1, 4, 7, 2, 3, generator=torch.Generator().manual_seed(1)) * 2  # 1 + 3 slices of 2
    changed = z.clone()
    changed[:, :, 5:7] += 1.0  # the third latent slice
    with torch.no_grad():
        a, b = model.decode(z).sample, model.decode(changed).sample
    assert a.shape == (1, 3, 25, 16, 24)
    diff = (a - b).abs().amax(dim=(0, 1, 3, 4))
    assert torch.all(diff[:9] == 0)  # first frame and slice 1: not neighbours of slice 3
    assert diff[9:17].amax() > 1e-4 and diff[17:].amax() > 1e-4  # slice 2 sees slice 3 through conv_in + mid block


@pytest.mark.parametrize("cfg, frames, latents", [(SLICE, 17, 5), (SLICE, 25, 7), (T8, 17, 3), (T8, 25, 4)])
def test_frame_arithmetic(cfg, frames, latents):
    model = _model(**cfg)
    with torch.no_grad():
        z = model.encode(_video(frames, h=8, w=16)).latent_dist.mean
        out = model.decode_chunked(z)
    assert z.shape[2] == latents == model.latent_frames(frames) == model.video_latent_frames(frames)
    assert out.shape[2] == frames == model.video_frames(latents)


def test_8x_variant_follows_the_official_decoder_rule():
    # 25 frames -> 4 latents: the official decoder only decodes the first latent alone for an odd count, so decode()
    # gives 4 slices of 8 frames; the pipeline path knows its clips are 1 + 8k and gives 25.
    model = _model(**T8)
    z = torch.randn(1, 4, 4, 1, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert model.decode(z).sample.shape[2] == 32 == model.decoded_frames(4)
        assert model.decode_chunked(z).shape[2] == 25


def test_frame_rule_and_errors():
    slice_vae, v2 = _model(**SLICE), _model(ch=16, ch_mult=[1, 1, 2, 2], norm_num_groups=8, layers_per_block=1)
    assert slice_vae.frame_rule == (1, 8) and v2.frame_rule == (0, 9)
    assert [n for n in range(1, 40) if slice_vae.is_valid_num_frames(n)] == [1, 9, 17, 25, 33]
    assert slice_vae.video_latent_frames(145) == 37 and v2.video_latent_frames(144) == 48
    with pytest.raises(ValueError, match=r"num_frames must be 1 or 1 \+ 8k .* got 18 \(nearest valid: 17 or 25\)"):
        slice_vae.check_num_frames(18)
    with pytest.raises(ValueError, match=r"num_frames must be 1 or a multiple of 9 .* got 17"):
        v2.check_num_frames(17)
    with pytest.raises(ValueError, match=r"1 \+ 8k.*got 16"):
        slice_vae.encode_chunked(_video(16, h=8, w=8))
    with pytest.raises(ValueError, match=r"latent frame count must be 1 or 1 \+ 2k .* got 4"):
        slice_vae.decode_chunked(torch.zeros(1, 4, 4, 1, 1))


def test_inconsistent_slice_config_is_refused():
    with pytest.raises(ValueError, match=r"mini_batch_decoder=1 latents decode to 4 frames"):
        AutoencoderKLMagvit(**{**SLICE, "mini_batch_decoder": 1})


# ------------------------------------------------------------------------------------------------ causal cache
class _CausalStack(nn.Module):
    """Causal convs, a stride-2 conv and a temporal upsampler: no GroupNorm, so a cached pass can equal a whole one."""

    def __init__(self):
        super().__init__()
        self.a = CausalConv3d(2, 4, 3)
        self.down = CausalConv3d(4, 4, 3, stride=(2, 1, 1))
        self.up = SpatialTemporalUpsampler3D(4)
        self.b = CausalConv3d(4, 2, 3)

    def forward(self, x):
        return self.b(self.up(self.down(torch.tanh(self.a(x)))))


def test_cached_slices_equal_the_whole_causal_clip():
    torch.manual_seed(0)
    net = _CausalStack()
    x = torch.randn(1, 2, 25, 4, 4)
    with torch.no_grad():
        whole = net(x)  # V2 causal convs over the whole clip: 25 -> 13 -> 25 frames
        set_temporal_mode(net, "cached")
        parts = [net(x[:, :, :1])] + [net(x[:, :, s : s + 8]) for s in range(1, 25, 8)]
        set_temporal_mode(net, "causal")
        reset_temporal_cache(net)
    cached = torch.cat(parts, dim=2)
    # the convs are exact; only the upsampler differs: it interpolates each slice from the previous slice's last
    # frame (causal) where the whole-clip V2 upsampler interpolates the interior without that frame
    assert [p.shape[2] for p in parts] == [1, 8, 8, 8]
    conv_only = nn.Sequential(net.a, nn.Tanh(), net.down)
    with torch.no_grad():
        whole_down = conv_only(x)
        set_temporal_mode(conv_only, "cached")
        down_parts = [conv_only(x[:, :, :1])] + [conv_only(x[:, :, s : s + 8]) for s in range(1, 25, 8)]
        set_temporal_mode(conv_only, "causal")
    torch.testing.assert_close(torch.cat(down_parts, dim=2), whole_down, rtol=1e-5, atol=1e-5)
    assert cached.shape == whole.shape == (1, 2, 25, 8, 8)
    torch.testing.assert_close(cached[:, :, :1], whole[:, :, :1], rtol=1e-5, atol=1e-5)  # first frame: V2 causal


def test_causal_cache_vae_is_causal_and_continues_across_slices():
    plain, cached = _model(**SLICE), _model(**SLICE, causal_cache=True)
    cached.load_state_dict(plain.state_dict())
    z = torch.randn(1, 4, 5, 2, 2, generator=torch.Generator().manual_seed(3)) * 2
    later = z.clone()
    later[:, :, 3:] += 1.0  # the second latent slice
    earlier = z.clone()
    earlier[:, :, 1:3] += 1.0  # the first latent slice
    with torch.no_grad():
        base = cached.decode(z).sample
        d_later = (cached.decode(later).sample - base).abs().amax(dim=(0, 1, 3, 4))
        d_earlier = (cached.decode(earlier).sample - base).abs().amax(dim=(0, 1, 3, 4))
        official = plain.decode(z).sample
    assert base.shape == official.shape == (1, 3, 17, 16, 16)
    assert torch.all(d_later[:9] == 0)  # causal: a later slice never changes earlier frames
    assert d_earlier[9:].amax() > 1e-4  # the cache carries the first slice into the second
    assert (base - official).abs().amax() > 1e-3  # a different model than the official slice mode
    with pytest.raises(ValueError, match=r"causal-cache slice VAE needs 1 or 1 \+ 8k frames"):
        cached.encode(_video(16, h=8, w=8))


def test_causal_cache_trains_through_the_cache():
    model = _model(**SLICE, causal_cache=True).train()
    x = _video(17, h=8, w=8)
    out = model(x).sample
    assert out.shape == x.shape
    (out - x).abs().mean().backward()
    first = model.encoder.conv_in.weight.grad
    assert first is not None and first.abs().sum() > 0
    # the caches are cleared after every call (nothing is kept between clips)
    assert all(getattr(m, "temporal_cache", None) is None for m in model.modules())


# ------------------------------------------------------------------------------------------------ serving follows the rule
def test_serving_limits_follow_the_slice_rule():
    from serving.request import GenerationRequest, Limits, RequestError, check_request, v2_defaults

    def req(n):
        return GenerationRequest(**{**v2_defaults(), "prompt": "a", "num_frames": n, "height": 64, "width": 64})

    limits = Limits(frame_multiple=8, frame_offset=1, max_frames=145)
    for n in (1, 9, 17, 145):
        check_request(req(n), limits)
    for n in (8, 16, 18, 144, 153):
        with pytest.raises(RequestError, match=rf"^NUM_FRAMES must be 1 or 1 \+ 8k up to 145, got {n}$"):
            check_request(req(n), limits)
    with pytest.raises(RequestError, match=r"^NUM_FRAMES must be 1 or a multiple of 9 up to 144, got 17$"):
        check_request(req(17), Limits())


# ------------------------------------------------------------------------------------------------ generation
def test_slice_presets_generate_1_plus_8k_frames():
    from easyanimate.config import load_config
    from easyanimate.pipeline import build_pipeline

    v3 = load_config("v3_slice_512")
    assert v3.model.vae.slice_compression_vae and (v3.model.vae.mini_batch_encoder, v3.model.vae.mini_batch_decoder) \
        == (8, 2)
    assert v3.model.transformer == load_config("v2_512").model.transformer  # the V2 DiT, as the official v3 config
    assert v3.generate.num_frames == 145 and not v3.generate.smooth_decode

    cfg = load_config("tiny_slice")
    assert cfg.generate.num_frames == 17
    pipe = build_pipeline(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red ball", num_frames=9, height=32, width=32, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="pt").videos
    assert out.shape == (1, 3, 9, 32, 32) and pipe.latent_frames(17) == 5 and pipe.latent_frames(145) == 37
    with pytest.raises(ValueError, match=r"num_frames must be 1 or 1 \+ 8k .*got 18"):
        pipe("a red ball", num_frames=18, height=32, width=32, num_inference_steps=2)

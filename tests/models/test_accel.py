"""Fast generation (``easyanimate.accel``): exactness, every step cache really skipping work within its PSNR bound,
spec parsing and the combinations that must be refused.

The caches are judged on a TRAINED tiny model: a random DiT's trajectory is not what caches are built for. The
module fixture trains the tiny transformer for a few seconds on two fixed, smoothly moving latent videos with their
captions (the trainer's epsilon objective on DDPM noise), which gives a model whose denoising converges to those
videos — enough for step-to-step similarity to look like a real model's.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from easyanimate import accel as A
from easyanimate.config import AccelConfig, load_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "accel_exact_tiny_latents.safetensors"
STEPS = 20
PROMPTS = ("a red ball rolls to the right", "a blue square slides down")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _perturb_zero_init(transformer) -> None:
    """Give the zero-initialised U-ViT skips and motion-module outputs values, so every path counts."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "long_connect_fc" in name or "temporal_transformer.proj_out" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def exact_pipe():
    from easyanimate.pipeline import build_pipeline

    torch.set_num_threads(2)
    pipe = build_pipeline(load_config("tiny").model, sampler="DPM++")
    _perturb_zero_init(pipe.transformer)
    return pipe


def _moving_latents() -> torch.Tensor:
    """Two latent videos (4 channels, 3 frames, 8x8): smooth blobs moving one pixel per frame, in [-1.5, 1.5]."""
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    videos = []
    for k, (dy, dx) in enumerate(((0, 1), (1, 0))):
        frames = []
        for f in range(3):
            cy, cx = 3 + dy * f, 2 + dx * f
            blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0)
            chans = torch.stack([blob * 1.5, -blob, blob * (k - 0.5), (xx - 4) / 4 * 0.5])
            frames.append(chans)
        videos.append(torch.stack(frames, dim=1))
    return torch.stack(videos)


@pytest.fixture(scope="module")
def trained_pipe():
    """The tiny pipeline after 100 training steps on two fixed latent videos."""
    from diffusers import DDPMScheduler

    from easyanimate.pipeline import build_pipeline

    torch.set_num_threads(2)
    cfg = load_config("tiny", ["model.text_encoder.max_length=16"])
    pipe = build_pipeline(cfg.model, sampler="DPM++")
    pipe.set_progress_bar_config(disable=True)
    x0 = _moving_latents()
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(list(PROMPTS), "cpu", torch.float32)
        null, null_mask = pipe.encode_prompt(["", ""], "cpu", torch.float32)
    noise_sched = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    model = pipe.transformer.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(100):
        t = torch.randint(0, 1000, (2,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        drop = step % 5 == 0  # some unconditional steps, as caption dropout does, so CFG means something
        pred = model(noise_sched.add_noise(x0, noise, t), timestep=t, encoder_hidden_states=null if drop else embeds,
                     encoder_attention_mask=null_mask if drop else mask).sample
        loss = torch.nn.functional.mse_loss(pred[:, :4], noise) + 0.1 * pred[:, 4:].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.6, f"the fixture model did not train (loss {loss.item():.3f})"
    return pipe


@pytest.fixture(scope="module")
def trained_exact(trained_pipe):
    """(latents, decoded frames, (block computations, attention calls)) of the exact run on the trained model."""
    with pytest.MonkeyPatch.context() as mp:
        counter = _Calls(trained_pipe.transformer, mp)
        latents = _generate(trained_pipe, "exact")
        counter.close()
    return latents, trained_pipe.decode_latents(latents), (counter.blocks, counter.attention)


def _generate(pipe, accel, prompt=PROMPTS[0], guidance=6.0, steps=STEPS) -> torch.Tensor:
    return pipe(prompt, num_frames=9, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(43), output_type="latent", show_progress=False,
                accel=accel).videos


class _Calls:
    """Counts blocks that really compute (their feed-forward runs; a cache-skipped block never reaches it) and
    attention kernel calls (PAB / FasterCache skip attentions inside blocks)."""

    def __init__(self, transformer, monkeypatch):
        import easyanimate.models.motion_module as mm
        import easyanimate.models.transformer3d as t3d

        self.blocks = 0
        self.attention = 0
        self.handles = [b.ff.register_forward_hook(self._block) for b in transformer.transformer_blocks]
        for module in (t3d, mm):
            original = module.dispatch_attention_fn

            def counting(*a, _orig=original, **k):
                self.attention += 1
                return _orig(*a, **k)

            monkeypatch.setattr(module, "dispatch_attention_fn", counting)

    def _block(self, *_):
        self.blocks += 1

    def close(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------------------
# exactness


def test_exact_reproduces_pre_accel_output_bit_for_bit(exact_pipe):
    """The latents recorded with the code before attention dispatch / CacheMixin / in-block skips existed
    (tests/fixtures/accel_exact_tiny_latents.safetensors, same machine kind, 2 threads) come out identical."""
    from safetensors.torch import load_file

    want = load_file(FIXTURE)
    for name, guidance in (("cfg", 6.0), ("nocfg", 1.0)):
        for accel in ("exact", None):
            got = _generate(exact_pipe, accel, prompt="a red kite over a hill", guidance=guidance, steps=5)
            assert torch.equal(got, want[name]), (
                f"accel={accel!r} {name}: max abs difference {(got - want[name]).abs().max().item():.3g} against "
                "the pre-accel output (expected bit-identical)")


def test_settings_do_not_leak_into_later_exact_calls(exact_pipe):
    """A cache or a bf16 call in between leaves no hook and no rounded weight behind: the cache hooks go at the end
    of their call, the loaded float32 weights come back (bit for bit) when a call wants them."""
    before = _generate(exact_pipe, "exact", steps=4)
    _generate(exact_pipe, "cache=first_block,threshold=0.5", steps=4)
    assert not exact_pipe.transformer.is_cache_enabled
    _generate(exact_pipe, "dtype=bfloat16", steps=4)
    assert exact_pipe.transformer.dtype == torch.bfloat16
    assert torch.equal(_generate(exact_pipe, "exact", steps=4), before)
    assert exact_pipe.transformer.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# the caches on the trained tiny model

BOUNDS_UNIT = "dB PSNR of the decoded frames against exact"


@pytest.mark.parametrize("spec", ["cache=first_block", "cache=mag", "cache=taylorseer", "cache=pab", "cache=faster"])
def test_cache_skips_work_within_its_psnr_bound(trained_pipe, trained_exact, spec, monkeypatch):
    method = A.resolve(spec).cache
    if method == "mag":  # the first mag run calibrates (and is exact); the measured one is the second
        assert torch.equal(_generate(trained_pipe, spec), trained_exact[0]), "the calibrating mag run is not exact"
    counter = _Calls(trained_pipe.transformer, monkeypatch)
    latents = _generate(trained_pipe, spec)
    counter.close()
    exact_blocks, exact_attn = trained_exact[2]
    blocks, attn = counter.blocks, counter.attention
    assert exact_blocks == STEPS * 4, f"exact ran {exact_blocks} block computations, expected {STEPS} steps x 4 blocks"
    if method in ("pab", "faster"):
        assert attn < exact_attn, f"{spec} computed {attn} attentions, exact {exact_attn}: nothing was skipped"
    else:
        assert blocks < exact_blocks, f"{spec} computed {blocks} blocks, exact {exact_blocks}: nothing was skipped"
    got = _psnr(trained_pipe.decode_latents(latents), trained_exact[1])
    bound = A.PSNR_BOUNDS[method]
    assert got >= bound, f"{spec}: {got:.1f} {BOUNDS_UNIT}, documented bound {bound}"


def test_default_is_a_cache_within_the_quality_bar(trained_pipe, trained_exact, monkeypatch):
    counter = _Calls(trained_pipe.transformer, monkeypatch)
    fast = _generate(trained_pipe, "default")
    counter.close()
    assert counter.blocks <= STEPS * 4 * 0.6, f"the default computed {counter.blocks} of {STEPS * 4} blocks"
    got = _psnr(trained_pipe.decode_latents(fast), trained_exact[1])
    assert got >= 30.0, f"the default setting: {got:.1f} {BOUNDS_UNIT} (quality bar 30)"


# ---------------------------------------------------------------------------------------------------------------------
# specs and refused combinations (pure)


def test_spec_round_trip_and_bases():
    assert A.resolve("exact") == A.EXACT
    assert A.to_spec(A.resolve("exact")) == "exact"
    default = A.resolve("default")
    assert default.cache != "none"
    assert A.resolve(A.to_spec(default)) == A.resolve(A.to_spec(default))
    s = A.resolve("cache=mag,threshold=0.1,dtype=bf16,compile=true")
    assert (s.cache, s.threshold, s.dtype, s.compile) == ("mag", 0.1, "bfloat16", True)
    assert A.resolve(A.to_spec(s)) == s
    assert A.resolve("default,cache=none").cache == "none"
    assert A.resolve(AccelConfig(base="exact", cache="pab")).interval == A.DEFAULT_INTERVALS["pab"]
    assert A.resolve(load_config("tiny").generate.accel) == default  # the config section: default base


@pytest.mark.parametrize(("spec", "device", "message"), [
    ("fp8=true", "cpu", "needs a CUDA GPU; on the CPU use dtype=bfloat16"),
    ("offload=model", "cpu", "use offload=none"),
    ("attention=flash", "cpu", "attention=native"),
    ("cache=pab,threshold=0.1", "cpu", "takes interval="),
    ("cache=first_block,interval=3", "cpu", "takes threshold="),
    ("threshold=0.1", "cpu", "need a cache method"),
    ("cache=teacache", "cpu", "cache must be one of none, first_block"),
    ("fastest", "cpu", "expected 'exact' or 'default' first"),
    ("cache=mag,compile=maybe", "cpu", "compile must be true or false"),
    ("cache=first_block,threshold=7", "cpu", "threshold must be a number in (0, 1]"),
    ("offload=group,cache=first_block", "cuda", "cannot be combined with a step cache"),
    ("", "cpu", "accel spec is empty"),
])
def test_bad_specs_name_what_works(spec, device, message):
    with pytest.raises(A.AccelError, match=None) as info:
        A.resolve(spec, device)
    assert message in str(info.value), f"{spec!r} on {device}: {info.value}"


def test_vae_tiling_is_refused_by_a_vae_without_it(exact_pipe):
    with pytest.raises(A.AccelError, match="has no spatial tiling"):
        _generate(exact_pipe, "vae_tiling=true", steps=1)


def test_registered_versions_carry_the_setting_in_generate_defaults():
    """register_pipeline stores generate_defaults["accel"] as a checked spec (the server's per-version default)."""
    from serving.registry import _with_accel
    from serving.request import merge_defaults

    assert _with_accel(None) == {"accel": "default"}
    stored = _with_accel({"steps": 5, "accel": AccelConfig(base="exact", cache="mag", threshold=0.1)})
    assert stored == {"steps": 5, "accel": "cache=mag,threshold=0.1"}
    assert merge_defaults(stored)["accel"] == "cache=mag,threshold=0.1"  # what the Triton model then uses
    with pytest.raises(A.AccelError, match="unknown key 'speed'"):
        _with_accel({"accel": "speed=max"})

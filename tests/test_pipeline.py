import json

import pytest
import torch

from easyanimate.pipeline import EasyAnimatePipeline, build_pipeline
from easyanimate.schedulers import SAMPLERS, make_scheduler


def _run(pipe, seed=43, **kw):
    args = dict(num_frames=9, height=64, width=64, num_inference_steps=2, guidance_scale=6.0, show_progress=False)
    args.update(kw)
    return pipe("a red kite over a green hill", generator=torch.Generator().manual_seed(seed), **args).videos


def test_tiny_pipeline_makes_a_video(tiny_pipe):
    video = _run(tiny_pipe, height=64, width=96)
    assert video.shape == (1, 3, 9, 64, 96)
    assert video.min() >= 0 and video.max() <= 1
    assert video.std() > 0


def test_seeded_runs_are_reproducible(tiny_pipe):
    a, b, c = _run(tiny_pipe, seed=1), _run(tiny_pipe, seed=1), _run(tiny_pipe, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_image_and_longer_clips(tiny_pipe):
    assert _run(tiny_pipe, num_frames=1).shape == (1, 3, 1, 64, 64)
    latents = _run(tiny_pipe, num_frames=18, output_type="latent")
    assert latents.shape == (1, 4, 6, 8, 8)  # 18 frames -> 2 chunks of 3 latent frames


@pytest.mark.parametrize("frames", [0, 2, 10, 17])
def test_frame_rule(tiny_pipe, frames):
    with pytest.raises(ValueError, match="num_frames must be 1 or a multiple of 9"):
        _run(tiny_pipe, num_frames=frames)


def test_size_rule(tiny_pipe):
    with pytest.raises(ValueError, match="multiples of 16"):
        _run(tiny_pipe, height=72)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs(tiny_pipe, sampler):
    scheduler = tiny_pipe.scheduler
    try:
        tiny_pipe.scheduler = make_scheduler(sampler)
        assert tiny_pipe.scheduler.config.steps_offset == 1 and tiny_pipe.scheduler.config.beta_end == 0.02
        video = _run(tiny_pipe, num_inference_steps=4 if sampler == "PNDM" else 2)
        assert torch.isfinite(video).all()
        if sampler == "PNDM":
            with pytest.raises(ValueError, match="at least 4 steps"):
                _run(tiny_pipe, num_inference_steps=2)
    finally:
        tiny_pipe.scheduler = scheduler


def test_callback_every_step_and_interrupt(tiny_pipe):
    seen = []

    def cb(pipe, i, t, kw):
        seen.append((i, kw["latents"].shape))
        if i == 2:
            pipe.interrupt = True

    _run(tiny_pipe, num_inference_steps=5, callback_on_step_end=cb)
    assert [i for i, _ in seen] == [0, 1, 2]
    assert seen[0][1] == (1, 4, 3, 8, 8)


def test_no_guidance_path(tiny_pipe):
    assert _run(tiny_pipe, guidance_scale=1.0).shape == (1, 3, 9, 64, 64)


def test_save_load_round_trip_is_exact(tiny_pipe, tmp_path):
    folder = tiny_pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["easyanimate", "Transformer3DModel"]
    assert index["_text_encoder_ref"] == "minilm"  # the frozen encoder is referenced, not copied
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in folder.rglob("*"))
    loaded = EasyAnimatePipeline.from_pretrained(folder)
    for name in ("transformer", "vae"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert type(loaded.scheduler) is type(tiny_pipe.scheduler)
    assert torch.equal(_run(loaded), _run(tiny_pipe))
    # saving again over an existing folder replaces it atomically
    tiny_pipe.save_pretrained(folder)
    assert (folder / "model_index.json").is_file() and not list(tmp_path.glob(".pipe*"))


def _official_layout(root, spiece_dir, tiny_pipe):
    """A folder laid out like EasyAnimateV2-XL-2-512x512: PixArt model_index, T5, spiece-only tokenizer."""
    import shutil

    from transformers import T5Config, T5EncoderModel

    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtAlphaPipeline", "_diffusers_version": "0.22.0.dev0",
        "_name_or_path": "diffusers/PixArt-XL-2-512x512",
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    t5.save_pretrained(root / "text_encoder", safe_serialization=True)
    (root / "tokenizer").mkdir()
    shutil.copy(spiece_dir / "spiece.model", root / "tokenizer" / "spiece.model")
    # transformer: our tiny weights under the official config keys (+ the EMA bookkeeping keys of the release)
    cfg = dict(tiny_pipe.transformer.config)
    cfg.update(caption_channels=32, decay=0.9999, inv_gamma=1.0, min_decay=0.0, optimization_step=2100, power=0.6667,
               _class_name="Transformer3DModel", _diffusers_version="0.27.0")
    from easyanimate.models.transformer3d import Transformer3DModel

    tr = Transformer3DModel.from_config({k: v for k, v in cfg.items()})
    tr.save_pretrained(root / "transformer", safe_serialization=True)
    cfg_path = root / "transformer" / "config.json"
    data = json.loads(cfg_path.read_text())
    data.update(decay=0.9999, inv_gamma=1.0, min_decay=0.0, optimization_step=2100, power=0.6667)
    cfg_path.write_text(json.dumps(data))
    tiny_pipe.vae.save_pretrained(root / "vae", safe_serialization=True)
    vcfg = json.loads((root / "vae" / "config.json").read_text())
    vcfg["_class_name"] = "AutoencoderKL"  # sic, as in the release
    (root / "vae" / "config.json").write_text(json.dumps(vcfg))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DPMSolverMultistepScheduler", "beta_start": 0.0001, "beta_end": 0.02,
        "beta_schedule": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon", "solver_order": 2,
        "solver_type": "midpoint", "lower_order_final": True, "steps_offset": 0}))
    return root


def test_official_layout_loads_and_generates(tiny_pipe, spiece_dir, tmp_path):
    from transformers import T5EncoderModel

    root = _official_layout(tmp_path / "EasyAnimateV2-XL-2-512x512", spiece_dir, tiny_pipe)
    pipe = EasyAnimatePipeline.from_pretrained(root, sampler="Euler")
    assert isinstance(pipe.text_encoder, T5EncoderModel)
    assert type(pipe.transformer).__name__ == "Transformer3DModel"
    assert type(pipe.vae).__name__ == "AutoencoderKLMagvit"
    embeds, mask = pipe.encode_prompt(["A Cat runs", "a cat runs"], "cpu", torch.float32)
    assert embeds.shape == (2, 120, 32) and torch.equal(embeds[0], embeds[1])  # prompts are lower-cased
    assert mask[0].sum() < 120  # padding is masked
    video = _run(pipe)
    assert video.shape == (1, 3, 9, 64, 64)
    # the stored DPM++ scheduler is used as is when no sampler is asked for
    assert type(EasyAnimatePipeline.from_pretrained(root).scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_build_checks_caption_width(tiny_config):
    import dataclasses

    bad = dataclasses.replace(tiny_config.model, transformer=dataclasses.replace(
        tiny_config.model.transformer, caption_channels=99))
    with pytest.raises(ValueError, match="caption_channels=99"):
        build_pipeline(bad)


def test_text_encoder_fp16_variant_and_spiece_tokenizer(spiece_dir, tmp_path):
    """The release keeps T5 as fp16 shards (`model.fp16-*.safetensors`) and the tokenizer as a bare spiece.model."""
    from transformers import T5Config, T5EncoderModel

    from easyanimate.models.text_encoder import hidden_size, load_text_encoder

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4))
    (tmp_path / "text_encoder").mkdir()
    t5.half().save_pretrained(tmp_path / "text_encoder", variant="fp16", safe_serialization=True)
    assert not (tmp_path / "text_encoder" / "model.safetensors").exists()
    import shutil

    shutil.copytree(spiece_dir, tmp_path / "tokenizer")
    tok, enc = load_text_encoder(tmp_path, torch_dtype=torch.float32)
    assert hidden_size(enc) == 16 and enc.dtype == torch.float32
    ids = tok(["a cat"], padding="max_length", max_length=120, return_tensors="pt")
    assert ids.input_ids.shape == (1, 120)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder(tmp_path / "missing")

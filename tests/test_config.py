import json

import pytest
import yaml

from easyanimate.config import Config, ConfigError, config_from_dict, list_presets, load_config


@pytest.mark.parametrize("preset", ["tiny", "v2_512", "v2_768"])
def test_every_preset_loads_and_round_trips(preset):
    cfg = load_config(preset)
    assert cfg.name == preset
    data = json.loads(cfg.to_json())
    assert config_from_dict(data) == cfg
    assert yaml.safe_load(cfg.to_yaml()) == data


def test_presets_listed():
    assert {"tiny", "v2_512", "v2_768"} <= set(list_presets())


def test_v2_768_extends_v2_512():
    a, b = load_config("v2_512"), load_config("v2_768")
    assert b.model.transformer == a.model.transformer
    assert (b.generate.height, b.generate.width) == (768, 768)
    assert b.model.pretrained.endswith("768x768")


def test_overrides_are_typed():
    cfg = load_config("tiny", ["generate.steps=7", "generate.guidance_scale=3", "model.vae.ch_mult=[1,2,2,2]",
                               "generate.sampler=Euler A", "generate.smooth_decode=true"])
    assert cfg.generate.steps == 7
    assert cfg.generate.guidance_scale == 3.0 and isinstance(cfg.generate.guidance_scale, float)
    assert cfg.model.vae.ch_mult == (1, 2, 2, 2)
    assert cfg.generate.sampler == "Euler A"
    assert cfg.generate.smooth_decode is True


def test_config_is_frozen():
    cfg = load_config("tiny")
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.generate.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("generate.stepz=5", "generate.stepz"),
        ("nosection.x=1", "nosection"),
        ("generate.steps=five", "expected an integer"),
        ("generate.smooth_decode=maybe", "expected true/false"),
        ("generate.steps", "section.key=value"),
    ],
)
def test_bad_overrides_say_what_was_expected(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config("tiny", [override])


def test_preset_from_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: tiny\ngenerate:\n  steps: 2\n")
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.generate.steps == 2
    assert cfg.model == load_config("tiny").model


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("nope")


def test_tiny_matches_model_kwargs():
    kw = load_config("tiny").model.transformer.to_model_kwargs()
    assert kw["cross_attention_dim"] == kw["num_attention_heads"] * kw["attention_head_dim"]
    assert kw["caption_channels"] == 384
    assert isinstance(Config(), Config)


def test_exponent_floats_without_a_dot():
    assert load_config("tiny", ["train.lora_learning_rate=2e-3"]).train.lora_learning_rate == 2e-3

"""components/glue/settings.py: a step's config from preset + JSON overrides, and the registry gates it sets."""

import pytest

from components.glue import settings


def test_overrides_are_a_json_list():
    assert settings.parse_overrides("") == [] and settings.parse_overrides('["a.b=1"]') == ["a.b=1"]
    for bad in ("train.max_steps=2", '{"a": 1}', "[1]"):
        with pytest.raises(ValueError, match="JSON list"):
            settings.parse_overrides(bad)
    cfg = settings.config("tiny", '["train.max_steps=3"]')
    assert cfg.train.max_steps == 3


def test_overrides_as_the_pipelines_list_input():
    assert settings.parse_overrides(["a.b=1", "c.d=[1, 2]"]) == ["a.b=1", "c.d=[1, 2]"]
    assert settings.parse_overrides([]) == [] and settings.parse_overrides(None) == []
    with pytest.raises(ValueError, match="list of 'section.key=value' strings"):
        settings.parse_overrides(["a.b=1", 2])
    assert settings.config("tiny", ["train.max_steps=4"]).train.max_steps == 4


def test_gates_follow_the_evaluate_config():
    cfg = settings.config("tiny", '["evaluate.gate_max_val_loss=0.5", "evaluate.gate_min_vae_psnr=20"]')
    limits, higher = settings.gates(cfg.evaluate)
    assert limits["val_loss"] == {"max": 0.5} and limits["vae_psnr"] == {"min": 20.0}
    assert higher == {"val_loss": False, "vae_psnr": True, "flicker": False}

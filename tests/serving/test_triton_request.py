"""Unit tests of the Triton request schema (``serving/request.py``) and the launcher's/client's pure helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from easyanimate.config import V2_NEGATIVE_PROMPT
from serving.client import parse_server
from serving.launch import set_config_parameters, set_instance_count, stage_repository
from serving.request import (
    INPUTS,
    MAX_SEED,
    GenerationRequest,
    Limits,
    RequestError,
    merge_defaults,
    parse_request,
    to_inputs,
    v2_defaults,
)


def _parse(prompt="a cat", limits=None, defaults=None, **params):
    return parse_request(to_inputs(prompt, **params), defaults, limits)


def test_defaults_are_v2s():
    req = _parse()
    assert req == GenerationRequest(prompt="a cat", negative_prompt=V2_NEGATIVE_PROMPT, seed=43, steps=50,
                                    guidance=6.0, num_frames=144, height=384, width=672, fps=24, sampler="DPM++")
    assert v2_defaults()["sampler"] == "DPM++"


def test_model_defaults_override_v2_and_requests_override_both():
    defaults = {"num_frames": 9, "height": 64, "width": 64, "guidance_scale": 7.0, "steps": "5", "torch_dtype": "x"}
    req = _parse(defaults=defaults)
    assert (req.num_frames, req.height, req.width, req.guidance, req.steps) == (9, 64, 64, 7.0, 5)
    req = _parse(defaults=defaults, num_frames=18, sampler="euler a", seed=7, guidance=0.0, negative_prompt="")
    assert (req.num_frames, req.sampler, req.seed, req.guidance, req.negative_prompt) == (18, "Euler A", 7, 0.0, "")
    assert merge_defaults(None) == v2_defaults()


def test_valid_edges():
    assert _parse(num_frames=1).num_frames == 1
    assert _parse(num_frames=144).num_frames == 144
    assert _parse(height=16, width=1280).width == 1280
    assert _parse(steps=1, guidance=20.0).guidance == 20.0
    assert _parse(seed=MAX_SEED).seed == MAX_SEED
    assert _parse("é" * 2000).prompt == "é" * 2000  # characters, not bytes (4000 bytes)
    assert _parse(sampler="PNDM", steps=4).sampler == "PNDM"


BAD = [
    ({"num_frames": 0}, "NUM_FRAMES must be 1 or a multiple of 9 up to 144, got 0"),
    ({"num_frames": 10}, "NUM_FRAMES must be 1 or a multiple of 9 up to 144, got 10"),
    ({"num_frames": 145}, "NUM_FRAMES must be 1 or a multiple of 9 up to 144, got 145"),
    ({"num_frames": 153}, "NUM_FRAMES must be 1 or a multiple of 9 up to 144, got 153"),
    ({"height": 15}, "HEIGHT must be a multiple of 16 between 16 and 1280, got 15"),
    ({"width": 0}, "WIDTH must be a multiple of 16 between 16 and 1280, got 0"),
    ({"width": 1296}, "WIDTH must be a multiple of 16 between 16 and 1280, got 1296"),
    ({"steps": 0}, "STEPS must be between 1 and 100, got 0"),
    ({"steps": 1000}, "STEPS must be between 1 and 100, got 1000"),
    ({"sampler": "PNDM", "steps": 3}, "STEPS must be at least 4 with the PNDM sampler"),
    ({"guidance": float("nan")}, "GUIDANCE must be a finite number between 0 and 20, got nan"),
    ({"guidance": float("inf")}, "GUIDANCE must be a finite number between 0 and 20, got inf"),
    ({"guidance": -0.5}, "GUIDANCE must be a finite number between 0 and 20, got -0.5"),
    ({"seed": -1}, f"SEED must be between 0 and {MAX_SEED}, got -1"),
    ({"fps": 0}, "FPS must be between 1 and 60, got 0"),
    ({"sampler": "LMS"}, "SAMPLER: unknown sampler 'LMS': expected one of Euler, Euler A, DPM++, PNDM, DDIM"),
]


@pytest.mark.parametrize(("params", "message"), BAD, ids=[m.split(",")[0][:40] for _, m in BAD])
def test_out_of_range_values_give_one_clear_message(params, message):
    with pytest.raises(RequestError) as info:
        _parse(**params)
    assert str(info.value).startswith(message)


def test_text_inputs():
    with pytest.raises(RequestError, match=r"^PROMPT must not be empty$"):
        _parse("   ")
    with pytest.raises(RequestError, match=r"^PROMPT must be at most 2000 characters, got 100000 bytes$"):
        _parse("x" * 100_000)
    with pytest.raises(RequestError, match=r"^NEGATIVE_PROMPT must be at most 2000 characters"):
        _parse(negative_prompt="y" * 2001)
    bad = to_inputs("a")
    bad["PROMPT"] = np.array([b"caf\xe9 \xff"], dtype=object)
    with pytest.raises(RequestError, match=r"^PROMPT is not valid UTF-8 \(invalid continuation byte at byte 3\)$"):
        parse_request(bad)
    bad["PROMPT"] = np.array([b"a\x00b"], dtype=object)
    with pytest.raises(RequestError, match="NUL"):
        parse_request(bad)
    assert parse_request({"PROMPT": np.array(["plain str"], dtype=object)}).prompt == "plain str"


def test_structure_errors():
    with pytest.raises(RequestError, match=r"^PROMPT is required$"):
        parse_request({"STEPS": np.array([2], dtype=np.int64)})
    with pytest.raises(RequestError, match=r"^unknown input 'FOO': expected some of PROMPT, NEGATIVE_PROMPT"):
        parse_request({**to_inputs("a"), "FOO": np.array([1])})
    with pytest.raises(RequestError, match=r"^STEPS must be INT64, got FP32$"):
        parse_request({**to_inputs("a"), "STEPS": np.array([2.0], dtype=np.float32)})
    with pytest.raises(RequestError, match=r"^PROMPT must be BYTES \(a UTF-8 string\), got INT64$"):
        parse_request({"PROMPT": np.array([3], dtype=np.int64)})
    with pytest.raises(RequestError, match=r"^GUIDANCE must be FP32, got BYTES$"):
        parse_request({**to_inputs("a"), "GUIDANCE": np.array([b"7"], dtype=object)})
    with pytest.raises(RequestError, match=r"^SEED must hold exactly one value \(shape \[1\]\), got shape \[2\]$"):
        parse_request({**to_inputs("a"), "SEED": np.array([1, 2], dtype=np.int64)})
    # an integer GUIDANCE is a number all the same (FP32 on the wire; INT in direct calls)
    assert parse_request({**to_inputs("a"), "GUIDANCE": np.array([7], dtype=np.int64)}).guidance == 7.0


def test_limits_from_the_model():
    small = Limits(size_multiple=32, min_size=64, max_size=512, max_frames=27, max_prompt_chars=10)
    assert _parse(limits=small, height=512, width=64, num_frames=27).height == 512
    with pytest.raises(RequestError, match="HEIGHT must be a multiple of 32 between 64 and 512, got 48"):
        _parse(limits=small, height=48, width=64, num_frames=9)
    with pytest.raises(RequestError, match="NUM_FRAMES must be 1 or a multiple of 9 up to 27, got 36"):
        _parse(limits=small, height=64, width=64, num_frames=36)
    with pytest.raises(RequestError, match="at most 10 characters, got 11"):
        _parse("x" * 11, limits=small, height=64, width=64, num_frames=9)
    with pytest.raises(ValueError):
        Limits(size_multiple=16, min_size=8)


def test_to_inputs_types():
    inputs = to_inputs("a", seed=1, guidance=6.5, sampler="DPM++", height=None)
    assert set(inputs) == {"PROMPT", "SEED", "GUIDANCE", "SAMPLER"}
    assert inputs["SEED"].dtype == np.int64 and inputs["GUIDANCE"].dtype == np.float32
    assert inputs["PROMPT"].dtype == object and inputs["PROMPT"][0] == b"a"
    assert all(v.shape == (1,) for v in inputs.values())
    assert set(INPUTS) >= set(inputs)
    with pytest.raises(TypeError, match="unknown request field 'frames'"):
        to_inputs("a", frames=9)
    assert math.isclose(parse_request(inputs).guidance, 6.5)


def test_config_parameters_are_set_in_place_or_appended(tmp_path):
    text = ('name: "m"\nparameters: { key: "model_source" value: { string_value: "" } }  # comment\n'
            'instance_group [ { count: 1 kind: KIND_CPU } ]\n')
    out = set_config_parameters(text, {"model_source": 'models:/a@b "q"', "device": "cpu"})
    assert 'parameters: { key: "model_source" value: { string_value: "models:/a@b \\"q\\"" } }  # comment' in out
    assert out.rstrip().endswith('parameters: { key: "device" value: { string_value: "cpu" } }')
    assert out.count("model_source") == 1
    assert "count: 3 kind" in set_instance_count(text, 3)

    repo = stage_repository(tmp_path / "repo", ["easyanimate_stream"], {"model_source": "tiny"}, instance_count=2)
    config = (repo / "easyanimate_stream" / "config.pbtxt").read_text()
    assert 'key: "model_source" value: { string_value: "tiny" }' in config and "count: 2" in config
    assert "decoupled: true" in config
    assert (repo / "easyanimate_stream" / "1" / "model.py").is_file()
    with pytest.raises(FileNotFoundError, match="no model 'nope'"):
        stage_repository(tmp_path / "other", ["nope"], {})


def test_parse_server():
    assert parse_server("grpc://h:9001") == [("grpc", "h:9001")]
    assert parse_server("http://h:9000/") == [("http", "h:9000")]
    assert parse_server("h") == [("grpc", "h:8001"), ("http", "h:8000")]
    assert parse_server("h:9000") == [("http", "h:9000")]
    assert parse_server("grpc://a:1, http://b:2") == [("grpc", "a:1"), ("http", "b:2")]
    with pytest.raises(ValueError, match="unknown scheme 'ftp'"):
        parse_server("ftp://h:1")


def test_lora_fields():
    from serving.request import DEFAULT_LORA_ALPHA

    req = _parse()
    assert (req.lora, req.lora_alpha) == ("", DEFAULT_LORA_ALPHA) == ("", 0.55)
    req = _parse(lora="style.safetensors", lora_alpha=1.25)
    assert (req.lora, req.lora_alpha) == ("style.safetensors", 1.25)
    assert req.to_dict()["lora"] == "style.safetensors" and req.to_dict()["lora_alpha"] == 1.25
    assert _parse(lora="").lora == "" and _parse(lora_alpha=0.0).lora_alpha == 0.0
    assert _parse(lora_alpha=2.0).lora_alpha == 2.0
    inputs = to_inputs("a", lora="x.safetensors", lora_alpha=0.5)
    assert inputs["LORA"].dtype == object and inputs["LORA_ALPHA"].dtype == np.float32


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "sub/x.safetensors", "..\\x.safetensors",
                                  "..", ".hidden.safetensors", "C:x.safetensors"])
def test_lora_must_be_a_plain_file_name(name):
    with pytest.raises(RequestError, match=r"^LORA must be the name of a \.safetensors file in the server's LoRA "
                                           r"folder, not a path"):
        _parse(lora=name)


def test_lora_suffix_and_alpha_range():
    with pytest.raises(RequestError, match=r"^LORA must name a \.safetensors file, got 'x\.ckpt'$"):
        _parse(lora="x.ckpt")
    for alpha in (float("nan"), float("inf"), -0.1, 3.0):
        with pytest.raises(RequestError, match=r"^LORA_ALPHA must be a finite number between 0 and 2, got "):
            _parse(lora="x.safetensors", lora_alpha=alpha)
    with pytest.raises(RequestError, match=r"^LORA_ALPHA must be FP32, got BYTES$"):
        parse_request({**to_inputs("a"), "LORA_ALPHA": np.array([b"1"], dtype=object)})


def test_resolve_lora_only_inside_the_folder(tmp_path):
    from serving.request import resolve_lora

    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    assert resolve_lora("", folder) is None and resolve_lora("", None) is None
    assert resolve_lora("style.safetensors", folder) == (folder / "style.safetensors").resolve()
    with pytest.raises(RequestError, match=r"this server has no LoRA folder \(start it with --lora-dir\)"):
        resolve_lora("style.safetensors", "")
    with pytest.raises(RequestError, match=r"^LORA 'missing\.safetensors' is not in the server's LoRA folder$"):
        resolve_lora("missing.safetensors", folder)
    with pytest.raises(RequestError, match="is not in the server's LoRA folder"):  # a link out of the folder
        resolve_lora("link.safetensors", folder)
    with pytest.raises(RequestError, match="not a path"):
        resolve_lora("../outside.safetensors", folder)

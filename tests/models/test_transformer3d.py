"""Transformer3DModel (EasyAnimate V2 DiT): checkpoint layout, parity with the official code, behaviour.

The golden case was produced by the official V2 code (see tests/fixtures/golden/README.md); everything else uses
tiny random configs so the whole file runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easyanimate.models.motion_module import interleaved_sincos_table
from easyanimate.models.transformer3d import Transformer3DModel, get_2d_sincos_pos_embed, uvit_skip_plan

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GOLDEN = FIXTURES / "golden"
MANIFEST = FIXTURES / "easyanimate_v2_transformer_state_dict.json"

TINY = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 4,
    "cross_attention_dim": 32,
    "sample_size": 8,
    "caption_channels": 24,
    "motion_module_kwargs": {"num_attention_heads": 2, "temporal_position_encoding_max_len": 16},
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models are dominated by per-op overhead; one thread avoids OpenMP spin-waits on a busy 2-core machine.
    # The golden parity test switches to the 2 threads its reference was produced with.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (zero-initialised skips and motion proj_out included) a non-trivial value,
    so that every path moves the output; same scheme as the golden weights."""
    g = torch.Generator().manual_seed(seed)
    norm_params = {
        f"{module_name}.{param_name}"
        for module_name, module in model.named_modules()
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm))
        for param_name, _ in module.named_parameters()
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name in norm_params:
                p.copy_(1 + 0.02 * noise if name.endswith("weight") else 0.02 * noise)
            elif name.endswith("scale_shift_table"):
                p.copy_(noise / math.sqrt(p.shape[-1]))
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.02 * noise)
    return model


def tiny_model(seed: int = 0, **overrides) -> Transformer3DModel:
    torch.manual_seed(seed)
    return randomize_(Transformer3DModel(**{**TINY, **overrides}), seed).eval()


def tiny_inputs(batch=2, frames=3, height=8, width=8, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, frames, height, width, generator=g),
        "timestep": torch.tensor([10, 500][:batch]),
        "encoder_hidden_states": torch.randn(batch, tokens, 24, generator=g),
    }


# ---------------------------------------------------------------------------------------------------------------
# 1. Checkpoint layout of the released V2 XL-2 model
# ---------------------------------------------------------------------------------------------------------------
def test_v2_state_dict_matches_manifest_on_meta():
    manifest = json.loads(MANIFEST.read_text())
    with torch.device("meta"):
        model = Transformer3DModel(**manifest["config"])
    state = model.state_dict()

    assert list(state) == list(manifest["params"])  # same keys, same order as the official file
    assert {k: list(v.shape) for k, v in state.items()} == manifest["params"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"] == 1_446_296_864
    assert sum(v.numel() for v in state.values()) == manifest["num_state_dict_elements"]
    assert "pos_embed.pos_embed" not in state  # the 2D table is recomputed, never stored
    assert len(model.long_connect_fc) == 13


def test_defaults_are_the_v2_xl2_config():
    manifest_config = json.loads(MANIFEST.read_text())["config"]
    with torch.device("meta"):
        model = Transformer3DModel()
    for key, value in manifest_config.items():
        assert model.config[key] == value, key


# ---------------------------------------------------------------------------------------------------------------
# 2. Numerical parity with the official V2 code
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden():
    model = Transformer3DModel.from_pretrained(str(GOLDEN / "transformer_T")).eval()
    tensors = {k: v.clone() for k, v in load_file(str(GOLDEN / "transformer_T1.safetensors")).items()}
    return model, tensors


def run_golden(model, t, **overrides):
    kwargs = {
        "encoder_hidden_states": t["encoder_hidden_states"],
        "encoder_attention_mask": t["encoder_attention_mask"],
        "timestep": t["timestep"],
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }
    kwargs.update(overrides)
    with torch.no_grad():
        return model(t["hidden_states"], **kwargs)[0]


def test_golden_t1_matches_official_output(golden):
    model, t = golden
    torch.set_num_threads(2)  # as when the reference was recorded (restored by the autouse fixture)
    out = run_golden(model, t)
    err = (out - t["sample"]).abs().max().item()
    print(f"golden T1 max abs error: {err:.3e}")
    assert out.shape == (2, 8, 3, 8, 8)
    assert torch.allclose(out, t["sample"], rtol=1e-4, atol=1e-4), err


def test_golden_intermediates(golden):
    model, t = golden
    assert torch.equal(model.pos_embed.pos_embed, t["intermediate.pos_embed_table_4x4"])
    captured = {}
    hooks = [
        model.pos_embed.register_forward_hook(lambda m, i, o: captured.__setitem__("patch_embed_out", o)),
        model.transformer_blocks[0].register_forward_hook(lambda m, i, o: captured.__setitem__("block0_out", o)),
        model.transformer_blocks[14].register_forward_hook(lambda m, i, o: captured.__setitem__("block14_out", o)),
        model.transformer_blocks[15].register_forward_hook(lambda m, i, o: captured.__setitem__("block15_out", o)),
    ]
    try:
        run_golden(model, t)
    finally:
        for h in hooks:
            h.remove()
    for name, value in captured.items():
        assert torch.allclose(value, t[f"intermediate.{name}"], rtol=1e-4, atol=1e-4), name


def test_golden_return_dict_and_timestep_forms(golden):
    model, t = golden
    with torch.no_grad():
        as_output = model(
            t["hidden_states"], t["timestep"], t["encoder_hidden_states"], t["encoder_attention_mask"]
        ).sample
    assert torch.equal(as_output, run_golden(model, t))

    # scalar / float forms of the same step broadcast to the batch
    half = {k: v[1:] for k, v in t.items() if k in ("hidden_states", "encoder_hidden_states", "encoder_attention_mask")}
    ref = run_golden(model, {**t, **half, "timestep": t["timestep"][1:]})
    for ts in (500, torch.tensor(500.0), torch.tensor([500])):
        assert torch.allclose(run_golden(model, {**t, **half, "timestep": ts}), ref, atol=1e-6)


def test_official_config_with_ema_keys_loads(golden, tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(GOLDEN / "transformer_T", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(decay=0.9999, inv_gamma=1.0, min_decay=0.0, optimization_step=2100, power=0.6667)
    (folder / "config.json").write_text(json.dumps(config))

    model, info = Transformer3DModel.from_pretrained(str(folder), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    reference, _ = golden
    ours = model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in reference.state_dict().items())


def test_save_and_reload_roundtrip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    reloaded = Transformer3DModel.from_pretrained(str(tmp_path)).eval()
    assert reloaded.config.motion_module_kwargs == model.config.motion_module_kwargs
    x = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(model(**x).sample, reloaded(**x).sample)


# ---------------------------------------------------------------------------------------------------------------
# 3. Behaviour
# ---------------------------------------------------------------------------------------------------------------
def test_single_frame_image():
    model = tiny_model()
    x = tiny_inputs(frames=1)
    with torch.no_grad():
        out = model(**x).sample
    assert out.shape == (2, 8, 1, 8, 8)
    assert torch.isfinite(out).all()


def test_frames_are_not_independent_and_order_matters():
    """The motion module mixes frames; the frame PE makes the result depend on frame order."""
    model = tiny_model()
    x = tiny_inputs(frames=3)
    with torch.no_grad():
        out = model(**x).sample
        perm = [2, 0, 1]
        permuted = model(**{**x, "hidden_states": x["hidden_states"][:, :, perm]}).sample
    assert not torch.allclose(permuted, out[:, :, perm], atol=1e-3)


def test_non_square_latent_and_pe_table():
    model = tiny_model()
    x = tiny_inputs(height=8, width=12)
    with torch.no_grad():
        out = model(**x).sample
    assert out.shape == (2, 8, 3, 8, 12)

    # 4x6 token grid: each axis normalised by its own length to base_size=4; x coordinate in the first half
    table = get_2d_sincos_pos_embed(32, 4, 6, base_size=4)[0]
    assert table.shape == (24, 32)
    omega = 1.0 / 10000 ** (torch.arange(8, dtype=torch.float64) / 8)
    row, col = 1, 5  # token index row * 6 + col
    y, x_coord = row * 4 / 4, col * 4 / 6
    expected = torch.cat(
        [torch.sin(x_coord * omega), torch.cos(x_coord * omega), torch.sin(y * omega), torch.cos(y * omega)]
    ).float()
    assert torch.allclose(table[row * 6 + col], expected, atol=1e-6)
    assert (4, 6, torch.device("cpu")) in model.pos_embed._table_cache  # recomputed once, then reused


def test_masked_caption_tokens_are_ignored():
    model = tiny_model()
    x = tiny_inputs(tokens=7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    changed = x["encoder_hidden_states"].clone()
    changed[1, 4:] = 100 * torch.randn(3, 24)
    with torch.no_grad():
        ref = model(**x, encoder_attention_mask=mask).sample
        out = model(**{**x, "encoder_hidden_states": changed}, encoder_attention_mask=mask).sample
        unmasked = model(**{**x, "encoder_hidden_states": changed}).sample
        float_mask = model(**x, encoder_attention_mask=mask.float()).sample
        no_mask = model(**x).sample
        all_ones = model(**x, encoder_attention_mask=torch.ones(2, 7)).sample
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(float_mask, ref)
    assert torch.equal(no_mask, all_ones)
    assert not torch.allclose(unmasked[1], ref[1], atol=1e-3)  # without the mask those tokens do matter


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny_model().train()
    x = tiny_inputs()

    def grads():
        model.zero_grad()
        model(**x).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    calls = []
    checkpoint_func = model._gradient_checkpointing_func
    model._gradient_checkpointing_func = lambda *args: calls.append(1) or checkpoint_func(*args)
    checkpointed = grads()
    assert len(calls) == TINY["num_layers"]  # every block went through the checkpoint function
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6), name
    assert plain["long_connect_fc.0.weight"].abs().sum() > 0
    assert plain["transformer_blocks.0.attn_temporal.temporal_transformer.proj_in.weight"].abs().sum() > 0


@pytest.mark.parametrize(
    "num_layers, pushers, poppers",
    [
        (28, list(range(13)), list(range(15, 28))),  # V2: 0..12 push, 13/14 plain, 15..27 pop
        (4, [0], [3]),
        (5, [0], [4]),
        (2, [], []),
    ],
)
def test_uvit_plan(num_layers, pushers, poppers):
    n_skip, first_pop = uvit_skip_plan(num_layers)
    assert list(range(n_skip)) == pushers
    assert list(range(first_pop, num_layers)) == poppers


def _trace_uvit(model, x):
    """Record the order of block / skip-Linear calls and which block output each skip Linear received."""
    events, outputs, hooks = [], {}, []
    for i, block in enumerate(model.transformer_blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: events.append(("block", i))))
        hooks.append(block.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)))
    for k, fc in enumerate(model.long_connect_fc):
        hooks.append(fc.register_forward_pre_hook(lambda m, a, k=k: events.append(("fc", k, a[0]))))
    try:
        with torch.no_grad():
            model(**x)
    finally:
        for h in hooks:
            h.remove()
    return events, outputs


def test_uvit_wiring_28_layers_is_the_documented_one(golden):
    model, t = golden
    x = {
        "hidden_states": t["hidden_states"],
        "timestep": t["timestep"],
        "encoder_hidden_states": t["encoder_hidden_states"],
    }
    events, outputs = _trace_uvit(model, x)
    expected = [("block", i) for i in range(15)]
    for i in range(15, 28):
        expected += [("fc", i - 15), ("block", i)]
    assert [e[:2] for e in events] == expected
    for event in events:
        if event[0] == "fc":  # 15 <- 12, 16 <- 11, ..., 27 <- 0
            assert event[2] is outputs[12 - event[1]]


def test_tiny_four_layer_model_wires_one_skip():
    model = tiny_model(num_layers=4)
    assert len(model.long_connect_fc) == 1
    assert model.long_connect_fc[0].weight.shape == (32, 32)
    events, outputs = _trace_uvit(model, tiny_inputs())
    assert [e[:2] for e in events] == [("block", 0), ("block", 1), ("block", 2), ("fc", 0), ("block", 3)]
    assert events[3][2] is outputs[0]


def test_fresh_model_zero_inits_skips_and_motion_output():
    model = Transformer3DModel(**TINY)
    for fc in model.long_connect_fc:
        assert not fc.weight.any() and not fc.bias.any()
    for block in model.transformer_blocks:
        proj_out = block.attn_temporal.temporal_transformer.proj_out
        assert not proj_out.weight.any() and not proj_out.bias.any()
        pe = block.attn_temporal.temporal_transformer.transformer_blocks[0].attention_blocks[0].pos_encoder.pe
        assert torch.equal(pe, interleaved_sincos_table(16, 32))
    # interleaved layout: even channels sin, odd channels cos
    table = interleaved_sincos_table(16, 32)
    div = torch.exp(torch.arange(0, 32, 2) * (-math.log(10000.0) / 32))
    assert torch.allclose(table[0, 5, 0::2], torch.sin(5 * div))
    assert torch.allclose(table[0, 5, 1::2], torch.cos(5 * div))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"motion_module_type": "VanillaGrid"}, "motion_module_type must be 'Vanilla'"),
        ({"patch_3d": True}, "patch_3d must be False"),
        ({"fake_3d": True}, "fake_3d must be False"),
        ({"basic_block_type": "selfattentiontemporal"}, "basic_block_type must be 'motionmodule'"),
        ({"norm_type": "layer_norm"}, "norm_type must be 'ada_norm_single'"),
        ({"num_layers": 1}, "num_layers must be >= 2"),
        ({"motion_module_kwargs": {"attention_block_types": ["Temporal_Cross"]}}, "Temporal_Self"),
        ({"motion_module_kwargs": {"cross_frame_attention_mode": "x"}}, "unsupported keys"),
    ],
)
def test_unsupported_config_raises_clear_error(bad, message):
    with pytest.raises(ValueError, match=message) as err:
        Transformer3DModel(**{**TINY, **bad})
    assert "got" in str(err.value) or "supported keys are" in str(err.value)


def test_bad_inputs_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model(**tiny_inputs(height=7))
    with pytest.raises(ValueError, match="max_len=16"):
        model(**tiny_inputs(frames=17))


def test_temporal_attention_slicing_is_exact(monkeypatch):
    """Huge B*h*w batches are sent to SDPA in slices (kernel grid limit); slicing must not change the result."""
    from easyanimate.models import motion_module

    model = tiny_model()
    x = tiny_inputs()
    with torch.no_grad():
        whole = model(**x).sample
        monkeypatch.setattr(motion_module, "_GRID_LIMIT", 8)  # 2 heads -> slices of 4 of the 32 sequences
        sliced = model(**x).sample
    assert torch.allclose(whole, sliced, atol=1e-6)


def test_bfloat16_forward():
    model = tiny_model()
    x = tiny_inputs(height=8, width=12)
    with torch.no_grad():
        ref = model(**x).sample
        low = model.to(torch.bfloat16)(
            **{
                **x,
                "hidden_states": x["hidden_states"].bfloat16(),
                "encoder_hidden_states": x["encoder_hidden_states"].bfloat16(),
            }
        ).sample
    assert low.dtype == torch.bfloat16 and low.shape == ref.shape
    assert (low.float() - ref).norm() / ref.norm() < 0.05


def test_micro_conditions_when_sample_size_is_128():
    # PixArt splits the micro-condition embedding in thirds: the width must be divisible by 3 (and by 32 groups).
    model = tiny_model(sample_size=128, num_attention_heads=2, attention_head_dim=48, cross_attention_dim=96)
    assert model.use_additional_conditions
    x = tiny_inputs()
    with pytest.raises(ValueError, match="resolution"):
        model(**x, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    cond = {"resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    with torch.no_grad():
        out = model(**x, added_cond_kwargs=cond).sample
        other = model(**x, added_cond_kwargs={**cond, "aspect_ratio": torch.tensor([[2.0]] * 2)}).sample
    assert out.shape == (2, 8, 3, 8, 8)
    assert not torch.allclose(out, other, atol=1e-4)


def test_without_uvit():
    model = tiny_model(enable_uvit=False, num_layers=1)
    assert model.long_connect_fc is None
    assert not any(k.startswith("long_connect_fc") for k in model.state_dict())
    with torch.no_grad():
        assert model(**tiny_inputs(frames=2)).sample.shape == (2, 8, 2, 8, 8)


def test_fresh_buffers_equal_the_official_ones(golden):
    """A freshly built model computes the same frame-PE tables (and 2D table) that the official code saved."""
    model, _ = golden
    fresh = Transformer3DModel.from_config(model.config)
    official, ours = dict(model.named_buffers()), dict(fresh.named_buffers())
    assert official.keys() == ours.keys() and len(ours) == 57  # 56 frame-PE tables + the 2D table
    for name, value in official.items():
        assert torch.equal(value, ours[name]), name

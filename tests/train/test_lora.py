"""LoRA: peft adapters on every Linear, training through train_dit, official (kohya) export that merge_lora applies."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from easyanimate.models.lora import merge_lora
from easyanimate.models.transformer3d import Transformer3DModel
from easyanimate.train.lora import (
    add_lora,
    linear_module_names,
    load_lora_peft,
    lora_layers,
    save_lora_official,
    save_lora_peft,
)

from .conftest import tiny_cfg

LORA = ["train.max_steps=16", "train.checkpointing_steps=8", "train.validation_steps=16", "train.lora_rank=4",
        "train.lora_alpha=8.0", "train.lora_learning_rate=0.002"]


def _inputs():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(1, 4, 3, 4, 6, generator=g), torch.tensor([321]), torch.randn(1, 16, 384, generator=g),
            torch.ones(1, 16))


def _out(model, inputs):
    x, t, e, m = inputs
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=e, encoder_attention_mask=m, return_dict=False)[0]


@pytest.fixture(scope="module")
def lora_run(dit_meta, tmp_path_factory):
    from easyanimate.train.dit import train_dit

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = tiny_cfg(*LORA)
    summary = train_dit(cfg, dit_meta, out, lora=True)
    torch.set_num_threads(before)
    return cfg, out, summary


def test_peft_save_load_round_trip_is_exact(tmp_path, tiny_config):
    torch.manual_seed(0)
    base = Transformer3DModel(**tiny_config.model.transformer.to_model_kwargs()).eval()
    adapted = add_lora(copy.deepcopy(base), rank=4, alpha=8.0)
    assert len(lora_layers(adapted)) == len(linear_module_names(base))  # every Linear, motion modules included
    assert any("attn_temporal" in n for n in lora_layers(adapted))
    assert all(p.requires_grad == (".lora_" in n) for n, p in adapted.named_parameters())
    inputs = _inputs()
    assert torch.equal(_out(adapted, inputs), _out(base, inputs))  # B = 0: a fresh adapter changes nothing
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.1)
    save_lora_peft(adapted, tmp_path / "peft")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4
    loaded = load_lora_peft(copy.deepcopy(base), tmp_path / "peft")
    a, b = adapted.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_out(adapted, inputs), _out(loaded, inputs))
    # and the official export of the same adapters merges into the base to the same function
    save_lora_official(adapted, tmp_path / "lora.safetensors")
    merged = copy.deepcopy(base)
    assert merge_lora(merged, tmp_path / "lora.safetensors", 1.0) == len(linear_module_names(base))
    assert torch.allclose(_out(merged, inputs), _out(adapted, inputs), atol=1e-5)


def test_lora_training_writes_official_file_that_merges(lora_run):
    from easyanimate.pipeline import build_pipeline

    cfg, out, summary = lora_run
    assert summary["steps"] == 16 and summary["lora"].endswith("final/lora.safetensors")
    final = out / "final"
    assert sorted(p.name for p in final.iterdir()) == ["base_model.json", "lora.safetensors", "peft"]

    state = load_file(str(final / "lora.safetensors"))
    key_re = re.compile(r"^lora_unet__[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(key_re.match(k) for k in state), [k for k in state if not key_re.match(k)][:3]
    assert "lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert any("attn_temporal" in k for k in state) and any(k.startswith("lora_unet__long_connect_fc_0") for k in state)
    down = state["lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight"]
    up = state["lora_unet__transformer_blocks_0_attn1_to_q.lora_up.weight"]
    assert down.shape == (4, 32) and up.shape == (32, 4) and state["lora_unet__proj_out.alpha"].item() == 8.0
    assert max(v.abs().max().item() for k, v in state.items() if k.endswith("lora_up.weight")) > 0  # trained

    # the base the LoRA was trained on (random tiny weights from model.init_seed), merged vs peft-adapted
    base = build_pipeline(cfg.model)
    inputs = _inputs()
    peft_model = load_lora_peft(copy.deepcopy(base.transformer).eval(), final / "peft")
    base_out = _out(base.transformer.eval(), inputs)
    gen_kwargs = dict(num_frames=9, height=32, width=32, num_inference_steps=2, show_progress=False)
    base_video = base("a cyclist rides along a street", generator=torch.Generator().manual_seed(0), **gen_kwargs).videos
    assert merge_lora(base.transformer, final / "lora.safetensors", 1.0) == len(state) // 3
    merged_out = _out(base.transformer, inputs)
    assert torch.allclose(merged_out, _out(peft_model, inputs), atol=1e-5)
    assert (merged_out - base_out).abs().max().item() > 1e-4
    lora_video = base("a cyclist rides along a street", generator=torch.Generator().manual_seed(0), **gen_kwargs).videos
    assert (lora_video - base_video).abs().max().item() > 1e-4


def test_lora_checkpoint_resume_is_exact(lora_run, dit_meta, tmp_path):
    from easyanimate.train.dit import train_dit

    cfg, out, _ = lora_run
    ckpt = out / "checkpoints" / "checkpoint-8"
    stored = load_file(str(ckpt / "transformer" / "model.safetensors"))
    assert stored and all(".lora_A." in k or ".lora_B." in k for k in stored)  # only the adapters are checkpointed

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        half = tiny_cfg(*LORA, "train.max_steps=8")
        train_dit(half, dit_meta, tmp_path / "run", lora=True)  # stops at 8, after writing checkpoint-8
        summary = train_dit(cfg, dit_meta, tmp_path / "run", resume="latest", lora=True)
    finally:
        torch.set_num_threads(before)
    assert summary["resumed_from"].endswith("checkpoint-8") and summary["steps_this_run"] == 8
    a = load_file(str(out / "final" / "lora.safetensors"))
    b = load_file(str(tmp_path / "run" / "final" / "lora.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    with pytest.raises(ValueError, match="LoRA"):
        train_dit(cfg, dit_meta, tmp_path / "run", resume="latest", lora=False)

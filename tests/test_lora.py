import pytest
import torch
from safetensors.torch import save_file

from easyanimate.models.lora import lora_key, merge_lora, unmerge_lora
from easyanimate.models.transformer3d import Transformer3DModel


def _tiny_transformer():
    from easyanimate.config import load_config

    torch.manual_seed(0)
    return Transformer3DModel(**load_config("tiny").model.transformer.to_model_kwargs())


def _write_official_lora(model, path, rank=4, alpha=2.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            key = lora_key(name)
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g).to(torch.bfloat16)
            tensors[f"{key}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g).to(torch.bfloat16)
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return tensors


def test_official_key_names_cover_every_linear_of_v2():
    from easyanimate.config import load_config

    with torch.device("meta"):
        model = Transformer3DModel(**load_config("v2_512").model.transformer.to_model_kwargs())
    names = [lora_key(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(names) == 635  # the official V2 LoRA wraps 635 Linear layers
    assert "lora_unet__transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet__long_connect_fc_3" in names
    assert ("lora_unet__transformer_blocks_0_attn_temporal_temporal_transformer_transformer_blocks_0_"
            "attention_blocks_1_to_out_0") in names


def test_merge_applies_formula_and_unmerge_restores(tmp_path):
    model = _tiny_transformer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "lora.safetensors"
    tensors = _write_official_lora(model, path, rank=4, alpha=2.0)

    n = merge_lora(model, path, multiplier=0.55)
    assert n == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    key = lora_key("transformer_blocks.0.attn1.to_q")
    expected = before["transformer_blocks.0.attn1.to_q.weight"] + 0.55 * (2.0 / 4) * (
        tensors[f"{key}.lora_up.weight"].float() @ tensors[f"{key}.lora_down.weight"].float())
    assert torch.allclose(model.transformer_blocks[0].attn1.to_q.weight, expected, atol=1e-6)
    assert not torch.equal(model.transformer_blocks[0].attn1.to_q.weight, before["transformer_blocks.0.attn1.to_q.weight"])

    unmerge_lora(model, path, multiplier=0.55)
    worst = max((model.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert worst <= 1e-6, worst


def test_lora_for_another_model_is_refused(tmp_path):
    model = _tiny_transformer()
    path = tmp_path / "other.safetensors"
    save_file({"lora_unet__nope_layer.lora_down.weight": torch.zeros(2, 4),
               "lora_unet__nope_layer.lora_up.weight": torch.zeros(4, 2)}, str(path))
    with pytest.raises(ValueError, match="match no Linear"):
        merge_lora(model, path)


def test_shape_mismatch_is_refused(tmp_path):
    model = _tiny_transformer()
    key = lora_key("transformer_blocks.0.attn1.to_q")
    path = tmp_path / "bad.safetensors"
    save_file({f"{key}.lora_down.weight": torch.zeros(2, 7), f"{key}.lora_up.weight": torch.zeros(32, 2)}, str(path))
    with pytest.raises(ValueError, match="does not fit"):
        merge_lora(model, path)


def test_only_safetensors(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        merge_lora(_tiny_transformer(), tmp_path / "lora.pt")

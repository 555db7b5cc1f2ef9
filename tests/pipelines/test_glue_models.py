"""components/glue/models.py: model assembly between steps (the DiT on the trained VAE; LoRA runs exported merged)."""

import torch

from components.glue import models


class FakeArtifact:
    """What KFP hands a component for an artifact: a path and a metadata dict."""

    def __init__(self, path):
        self.path, self.metadata = str(path), {}


def test_vae_swap_and_lora_export_give_pipeline_folders(tmp_path, tiny_config):
    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit
    from easyanimate.pipeline import EasyAnimatePipeline, build_pipeline
    from easyanimate.train.lora import add_lora, save_lora_official

    torch.set_num_threads(2)
    torch.manual_seed(7)
    vae = AutoencoderKLMagvit(**tiny_config.model.vae.to_model_kwargs())
    vae.save_pretrained(tmp_path / "vae")
    cfg = models.pipeline_with_vae(tiny_config, str(tmp_path / "vae"), tmp_path / "work")
    assert cfg.model.pretrained == str(tmp_path / "work" / "base_pipeline")
    pipe = EasyAnimatePipeline.from_pretrained(cfg.model.pretrained)
    for (name, a), b in zip(pipe.vae.state_dict().items(), vae.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    # a LoRA run's final/ (official-format file) → base pipeline with the LoRA merged + lora/ kept
    trained = build_pipeline(cfg.model)
    add_lora(trained.transformer, rank=2, alpha=2.0)
    with torch.no_grad():
        for n, p in trained.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)  # peft starts B at 0: make the update non-zero
    save_lora_official(trained.transformer, tmp_path / "final" / "lora.safetensors")
    artifact = FakeArtifact(tmp_path / "artifact")
    models.export_pipeline(cfg, tmp_path / "final", artifact, lora=True)
    assert artifact.metadata["lora"] is True and artifact.metadata["lora_layers_merged"] > 0
    assert (tmp_path / "artifact" / "lora" / "lora.safetensors").is_file()
    merged = EasyAnimatePipeline.from_pretrained(artifact.path)
    base = build_pipeline(cfg.model)
    changed = [n for (n, a), b in zip(merged.transformer.state_dict().items(),
                                      base.transformer.state_dict().values(), strict=True) if not torch.equal(a, b)]
    assert changed

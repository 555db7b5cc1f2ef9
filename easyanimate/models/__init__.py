"""EasyAnimate V2 models: the DiT (`Transformer3DModel`), the MagViT VAE (`AutoencoderKLMagvit`), text encoders, LoRA."""

_LAZY = {
    "Transformer3DModel": "easyanimate.models.transformer3d",
    "AutoencoderKLMagvit": "easyanimate.models.autoencoder_magvit",
    "merge_lora": "easyanimate.models.lora",
    "unmerge_lora": "easyanimate.models.lora",
    "load_text_encoder": "easyanimate.models.text_encoder",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'easyanimate.models' has no attribute {name!r}")


__all__ = list(_LAZY)

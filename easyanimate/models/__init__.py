"""EasyAnimate V2 models: the DiT (`Transformer3DModel`), the MagViT VAE (`AutoencoderKLMagvit`), text encoders, LoRA."""

import logging


class _EmptyFp32ListFilter(logging.Filter):
    """Drops diffusers' "There are modules in X that should be kept in float32: []" line. diffusers warns on every
    ``ModelMixin.to(dtype=...)`` even when that list is empty (it tests ``(self._keep_in_fp32_modules or []) is not
    None``); our models keep no module in float32, so the line says nothing, once per cast, in every process. A
    non-empty list still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFp32ListFilter())

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

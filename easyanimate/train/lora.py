"""LoRA adapters for training the DiT, with peft, and export to the official (kohya) EasyAnimate format.

V2's LoRA wraps every ``nn.Linear`` of the transformer, motion modules included (rank 128, alpha 64 by default).
Here peft injects the adapters (``init_lora_weights=True``: B = 0, so a fresh adapter changes nothing) and two file
formats come out:

- peft's own (``save_lora_peft`` / ``load_lora_peft``): ``adapter_config.json`` + ``adapter_model.safetensors``;
- the official one (``save_lora_official``): ``lora_unet__<path>.lora_down.weight [r, in]``, ``.lora_up.weight
  [out, r]``, ``.alpha`` — what ``easyanimate.models.lora.merge_lora`` (and V2's own scripts) load. peft's scaling
  ``alpha / r`` equals kohya's, so merging the file at multiplier 1.0 reproduces the adapted model.

Functions take the bare transformer (unwrap DDP first).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from ..models.lora import lora_key

ADAPTER = "default"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Paths of every ``nn.Linear`` of ``model`` (V2's LoRA targets), motion modules included."""
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name]


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """The peft LoRA layers of ``model`` by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def has_lora(model: torch.nn.Module) -> bool:
    return bool(lora_layers(model))


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float,
             target_modules: list[str] | None = None) -> torch.nn.Module:
    """Inject LoRA adapters (peft) into ``transformer`` in place and return it.

    Args:
        rank: LoRA rank r (V2: 128).
        alpha: LoRA alpha; the update is scaled by ``alpha / r`` (V2: 64).
        target_modules: module paths to adapt; default every ``nn.Linear`` (V2's choice).

    Afterwards only the LoRA parameters require gradients.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if has_lora(transformer):
        raise ValueError("the transformer already carries LoRA adapters")
    targets = list(target_modules) if target_modules is not None else linear_module_names(transformer)
    if not targets:
        raise ValueError("no nn.Linear modules to adapt")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=targets, init_lora_weights=True,
                        lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, transformer, adapter_name=ADAPTER)
    transformer._lora_config = config  # what save_lora_peft writes
    for name, p in transformer.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return transformer


def _config_of(transformer: torch.nn.Module) -> LoraConfig:
    config = getattr(transformer, "_lora_config", None)
    if config is None:
        peft_cfg = getattr(transformer, "peft_config", None)
        config = peft_cfg.get(ADAPTER) if isinstance(peft_cfg, dict) else None
    if config is None:
        raise ValueError("the transformer carries no LoRA adapters (call add_lora or load_lora_peft first)")
    return config


def _atomic_folder(target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def _swap_in(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def save_lora_peft(transformer: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """peft's adapter format in ``folder`` (``adapter_config.json`` + ``adapter_model.safetensors``), atomically."""
    target = Path(folder)
    config = _config_of(transformer)
    state = {k: v.detach().cpu().contiguous() for k, v in
             get_peft_model_state_dict(transformer, adapter_name=ADAPTER).items()}
    tmp = _atomic_folder(target)
    try:
        save_file(state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_lora_peft(transformer: torch.nn.Module, folder: str | os.PathLike) -> torch.nn.Module:
    """Load a ``save_lora_peft`` folder into ``transformer`` (injecting the adapters when it has none)."""
    folder = Path(folder)
    if not (folder / PEFT_CONFIG).is_file() or not (folder / PEFT_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: expected a peft LoRA folder with {PEFT_CONFIG} and {PEFT_WEIGHTS}")
    config = LoraConfig.from_pretrained(str(folder))
    if not has_lora(transformer):
        inject_adapter_in_model(config, transformer, adapter_name=ADAPTER)
        transformer._lora_config = config
    result = set_peft_model_state_dict(transformer, load_file(str(folder / PEFT_WEIGHTS)), adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{folder}: {len(unexpected)} LoRA tensors match no adapter, e.g. {unexpected[:3]}")
    return transformer


def official_lora_state(transformer: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapters as official (kohya) tensors: ``lora_unet__<path>.{lora_down.weight, lora_up.weight, alpha}``."""
    layers = lora_layers(transformer)
    if not layers:
        raise ValueError("the transformer carries no LoRA adapters")
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        key = lora_key(name)
        down = layer.lora_A[ADAPTER].weight.detach()
        up = layer.lora_B[ADAPTER].weight.detach()
        if getattr(layer, "use_dora", {}).get(ADAPTER, False):
            raise ValueError("DoRA adapters have no official-format equivalent")
        rank = down.shape[0]
        alpha = float(layer.scaling[ADAPTER]) * rank  # kohya applies alpha / rank; peft stores alpha / r as scaling
        out[f"{key}.lora_down.weight"] = down.to(dtype or down.dtype).cpu().contiguous()
        out[f"{key}.lora_up.weight"] = up.to(dtype or up.dtype).cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def save_lora_official(transformer: torch.nn.Module, path: str | os.PathLike,
                       dtype: torch.dtype | None = None) -> Path:
    """Write the official-format LoRA ``.safetensors`` (loadable by ``easyanimate.models.lora.merge_lora``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA file must end in .safetensors, got {path.name}")
    state = official_lora_state(transformer, dtype)
    config = _config_of(transformer)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "ss_network_module": "networks.lora",
                                        "ss_network_dim": str(config.r), "ss_network_alpha": str(config.lora_alpha),
                                        "easyanimate_modules": json.dumps(len(state) // 3)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["add_lora", "has_lora", "linear_module_names", "load_lora_peft", "lora_layers", "official_lora_state",
           "save_lora_official", "save_lora_peft"]

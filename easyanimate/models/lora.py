"""Official-format (kohya-style) LoRA files: merge into and unmerge from a model's Linear weights.

Key layout of the official EasyAnimate V2 LoRA files::

    lora_unet__<module path, dots as underscores>.lora_down.weight   [rank, in]
    lora_unet__<module path, dots as underscores>.lora_up.weight     [out, rank]
    lora_unet__<module path, dots as underscores>.alpha              []       (optional; rank when absent)
    lora_te_<...>                                                    (text encoder; applied when one is given)

The double underscore comes from the root module's empty name. Merging adds
``multiplier * (alpha / rank) * up @ down`` to each weight; unmerging subtracts the same product, so
merge → unmerge restores the weights up to float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet__"
TE_PREFIX = "lora_te_"


def lora_key(module_name: str, prefix: str = UNET_PREFIX) -> str:
    """The official LoRA name of a module path (``transformer_blocks.0.attn1.to_q`` → ``lora_unet__transformer_…``)."""
    return prefix + module_name.replace(".", "_")


def _linear_index(model: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Linear]:
    return {lora_key(name, prefix): m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def load_lora_state(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Group a LoRA safetensors file by module: ``{lora_name: {"down", "up", "alpha"?}}``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA weights must be a .safetensors file, got {path.name}")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        name, _, leaf = key.partition(".")
        slot = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(leaf)
        if slot is None:
            raise ValueError(f"{path.name}: unexpected key {key!r}; "
                             "expected <name>.lora_down.weight/.lora_up.weight/.alpha")
        groups.setdefault(name, {})[slot] = tensor
    return groups


def _check(parts: dict[str, torch.Tensor], name: str, weight: torch.Tensor) -> None:
    """Shape checks of one module's LoRA tensors against its Linear weight, and that they are finite numbers."""
    if "down" not in parts or "up" not in parts:
        raise ValueError(f"LoRA module {name}: needs lora_down and lora_up, found {sorted(parts)}")
    down, up = parts["down"], parts["up"]
    if down.ndim != 2 or up.ndim != 2:
        raise ValueError(f"LoRA module {name}: only Linear LoRAs are supported, got down {tuple(down.shape)}")
    rank = down.shape[0]
    expected = (weight.shape[0], weight.shape[1])
    if (up.shape[0], down.shape[1]) != expected or up.shape[1] != rank:
        raise ValueError(
            f"LoRA module {name}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not fit weight {tuple(expected)}"
        )
    for slot in ("down", "up", "alpha"):  # NaN/Inf would silently turn every output into garbage
        t = parts.get(slot)
        if t is None:
            continue
        if slot == "alpha" and t.numel() != 1:
            raise ValueError(f"LoRA module {name}: alpha must be a single number, got shape {tuple(t.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"LoRA module {name}: {slot} holds NaN or Inf values; expected finite numbers")


def _delta(parts: dict[str, torch.Tensor], name: str, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
    _check(parts, name, weight)
    down, up = parts["down"].float(), parts["up"].float()
    rank = down.shape[0]
    alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
    return multiplier * (alpha / rank) * (up @ down)


def _plan(model, path, text_encoder) -> list[tuple[str, torch.nn.Linear, dict[str, torch.Tensor]]]:
    """Load and validate a whole LoRA file against a model → ``[(lora name, Linear, parts)]``.

    Every module is checked before any weight changes, so a file that does not fit leaves the model untouched."""
    groups = load_lora_state(path)
    index = _linear_index(model, UNET_PREFIX)
    if text_encoder is not None:
        index.update(_linear_index(text_encoder, TE_PREFIX))
    unknown = [n for n in groups if n not in index and not (n.startswith(TE_PREFIX) and text_encoder is None)]
    if unknown:
        raise ValueError(
            f"{Path(path).name}: {len(unknown)} LoRA module(s) match no Linear of the model, e.g. {unknown[:3]} "
            f"(expected names like {next(iter(index), 'lora_unet__…')})"
        )
    skipped = [n for n in groups if n not in index]
    if skipped:
        logger.warning("LoRA %s: %d text-encoder modules skipped (no text encoder given)", Path(path).name,
                       len(skipped))
    plan = [(name, index[name], parts) for name, parts in groups.items() if name in index]
    for name, module, parts in plan:
        _check(parts, name, module.weight)
    return plan


def _apply(model, path, multiplier, text_encoder, sign: float) -> int:
    plan = _plan(model, path, text_encoder)
    with torch.no_grad():
        for name, module, parts in plan:
            w = module.weight
            delta = _delta(parts, name, w, multiplier).to(w.device)
            w.copy_((w.float() + sign * delta).to(w.dtype))
    return len(plan)


@contextmanager
def lora_merged(transformer: torch.nn.Module, path: str | Path, multiplier: float = 1.0,
                text_encoder=None) -> Iterator[int]:
    """``with lora_merged(model, path, alpha) as n:`` — the LoRA merged for the block, the exact weights back after.

    The whole file is validated before any weight changes; the original weight of every Linear it touches is kept
    (a CPU copy) and copied back on exit — also when merging or the block fails midway — so the model afterwards is
    bit-identical to before (``unmerge_lora`` would only restore it up to float rounding, which bf16 makes visible).
    Yields the number of Linear layers changed.
    """
    plan = _plan(transformer, path, text_encoder)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, module, parts in plan:
                w = module.weight
                saved.append((w, w.detach().to("cpu", copy=True)))
                delta = _delta(parts, name, w, multiplier).to(w.device)
                w.copy_((w.float() + delta).to(w.dtype))
        yield len(plan)
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)


def merge_lora(transformer: torch.nn.Module, path: str | Path, multiplier: float = 1.0, text_encoder=None) -> int:
    """Add an official-format LoRA to the model weights in place: ``W += multiplier·(alpha/rank)·up@down``.

    Returns the number of Linear layers changed. Keys that match no Linear, or tensors whose shapes do not fit, raise
    ``ValueError`` before any weight changes (a LoRA for another architecture must not silently do nothing, nor
    leave the model half-merged).
    """
    return _apply(transformer, path, multiplier, text_encoder, +1.0)


def unmerge_lora(transformer: torch.nn.Module, path: str | Path, multiplier: float = 1.0, text_encoder=None) -> int:
    """Undo ``merge_lora`` with the same file and multiplier."""
    return _apply(transformer, path, multiplier, text_encoder, -1.0)

"""A step's configuration: the preset plus the pipeline's ``overrides`` → ``Config``; the registry gates it sets.

``overrides`` reaches a component as a list of ``section.key=value`` strings (the pipeline's ``List[str]`` input);
a JSON text of that list is accepted too (what the pipeline took before, and what a shell passes).
"""

from __future__ import annotations

import json


def parse_overrides(text: str | list | None) -> list[str]:
    """``["train.max_steps=2", "evaluate.steps=2"]`` (or its JSON text) → the list; None / empty text → []."""
    if isinstance(text, (list, tuple)):
        if not all(isinstance(v, str) for v in text):
            raise ValueError(f"overrides must be a list of 'section.key=value' strings, got {list(text)!r}")
        return list(text)
    text = (text or "").strip()
    if not text:
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"overrides must be a JSON list of 'section.key=value' strings, got {text!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"overrides must be a JSON list of 'section.key=value' strings, got {text!r}")
    return value


def config(preset: str, overrides: str | list | None):
    """The resolved ``Config`` of a preset and a list of overrides (or its JSON text; unknown keys are errors)."""
    from easyanimate.config import load_config

    return load_config(preset, parse_overrides(overrides))


def gates(eval_cfg) -> tuple[dict[str, dict[str, float]], dict[str, bool]]:
    """``evaluate.gate_*`` as the registry's gates (``{"val_loss": {"max": x}, …}``) and their directions."""
    from easyanimate.evaluate import GATES

    limits = {name: {("max" if op == "<=" else "min"): float(getattr(eval_cfg, field))} for name, op, field in GATES}
    return limits, {name: op == ">=" for name, op, _ in GATES}

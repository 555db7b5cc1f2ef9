"""Sampler names of V2's UI → diffusers schedulers with V2's training beta schedule."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

SAMPLERS = {
    "Euler": EulerDiscreteScheduler,
    "Euler A": EulerAncestralDiscreteScheduler,
    "DPM++": DPMSolverMultistepScheduler,
    "PNDM": PNDMScheduler,
    "DDIM": DDIMScheduler,
}

# The DiT was trained with DDPM linear betas 1e-4 -> 0.02 over 1000 steps; V2 samples with steps_offset 1.
V2_SCHEDULER_KWARGS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "steps_offset": 1,
}

_ALIASES = {"euler": "Euler", "euler a": "Euler A", "euler_a": "Euler A", "euler-a": "Euler A",
            "dpm++": "DPM++", "dpmpp": "DPM++", "dpm": "DPM++", "pndm": "PNDM", "ddim": "DDIM"}


def canonical_sampler(name: str) -> str:
    """The UI name for ``name`` (case-insensitive, a few aliases); ValueError listing the known names otherwise."""
    if name in SAMPLERS:
        return name
    key = str(name).strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)}")


def make_scheduler(name: str = "DPM++", **overrides):
    """A fresh diffusers scheduler for a V2 sampler name."""
    cls = SAMPLERS[canonical_sampler(name)]
    return cls(**{**V2_SCHEDULER_KWARGS, **overrides})


def sampler_name(scheduler) -> str | None:
    """The UI name of a scheduler instance, or None for one V2 does not name."""
    for name, cls in SAMPLERS.items():
        if type(scheduler) is cls:
            return name
    return None

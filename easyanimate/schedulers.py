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


# What a trained model fixes about its sampler, whatever the sampler: its output's meaning and its noise schedule
# (train.prediction_type / train.zero_terminal_snr); carried over when the sampler is swapped.
MODEL_SCHEDULER_KEYS = ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing")


def make_scheduler(name: str = "DPM++", **overrides):
    """A fresh diffusers scheduler for a V2 sampler name."""
    canonical = canonical_sampler(name)
    cls = SAMPLERS[canonical]
    if overrides.get("rescale_betas_zero_snr") and cls is PNDMScheduler:
        raise ValueError(f"sampler {name!r} cannot sample a model trained with a zero terminal SNR: expected one of "
                         f"{', '.join(n for n in SAMPLERS if n != canonical)}")
    if not overrides.get("rescale_betas_zero_snr"):
        overrides.pop("rescale_betas_zero_snr", None)
    return cls(**{**V2_SCHEDULER_KWARGS, **overrides})


def model_scheduler_kwargs(scheduler) -> dict:
    """The :data:`MODEL_SCHEDULER_KEYS` of a scheduler that differ from V2's (``{}`` for a V2 ε-model)."""
    defaults = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False, "timestep_spacing": "leading"}
    config = getattr(scheduler, "config", {}) if scheduler is not None else {}
    return {k: config[k] for k in MODEL_SCHEDULER_KEYS if k in config and config[k] != defaults[k]}


def training_scheduler_kwargs(prediction_type: str, zero_terminal_snr: bool) -> dict:
    """Sampler settings for a DiT trained with ``train.prediction_type`` / ``train.zero_terminal_snr``; with a zero
    terminal SNR the samplers start at the last training step ("trailing" spacing), where the input is pure noise."""
    kwargs: dict = {} if prediction_type == "epsilon" else {"prediction_type": prediction_type}
    if zero_terminal_snr:
        kwargs.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return kwargs


def sampler_name(scheduler) -> str | None:
    """The UI name of a scheduler instance, or None for one V2 does not name."""
    for name, cls in SAMPLERS.items():
        if type(scheduler) is cls:
            return name
    return None

"""Fast generation: diffusers' acceleration stack on the V2 DiT, as ONE setting (``generate.accel``).

A setting is an :class:`~easyanimate.config.AccelConfig` (config files, ``--set generate.accel.cache=mag``) or its
spec string (CLI ``--accel``, the Triton ``ACCEL`` input, the web UI, a registered version's ``generate_defaults``)::

    exact                                   today's numerics, bit for bit (no cache, no compile, dtype as loaded)
    default                                 the fastest setting that meets the quality bar on this device
    cache=first_block,threshold=0.08        on top of ``exact`` (a spec without a base starts from exact)
    default,compile=true                    on top of the default

Keys: ``cache`` (none | first_block | mag | taylorseer | pab | faster), ``threshold`` (first_block, mag),
``interval`` (taylorseer, pab, faster), ``compile`` (regional torch.compile of the repeated block), ``dtype``
(float32 | bfloat16 | float16; empty = as loaded), ``fp8`` (float8 weight storage; CUDA), ``offload`` (none |
model | group; CUDA), ``vae_slicing``, ``vae_tiling``, ``attention`` (native | flash | sage | xformers).

The caches are diffusers' own hooks (``CacheMixin.enable_cache``) on :class:`Transformer3DModel`:

============ ================================================ ======================================================
cache        what is skipped                                  knob (default)
============ ================================================ ======================================================
first_block  all blocks after the first, when the first       ``threshold``: relative mean |change| of block 0's
             block's residual barely moved (First-Block-Cache) residual (DEFAULT_THRESHOLDS)
mag          all blocks, while the accumulated magnitude-     ``threshold``: error budget (0.06, diffusers'); ratios
             ratio error stays small (MagCache)                calibrated on the model by one exact run per steps
taylorseer   every block, predicted by a first-order Taylor   ``interval``: full compute every N steps (N-1 predicted)
             expansion of its past outputs (TaylorSeer)
pab          spatial / temporal / cross attention outputs     ``interval``: N for spatial+temporal, 2N for cross;
             broadcast from the last computed step (PAB)       only for timesteps in (100, 800)
faster       spatial attention reuse + the unconditional CFG  ``interval``: attention recompute every N steps
             half approximated from the conditional (FasterCache)
============ ================================================ ======================================================

Why these work on the V2 block: the block-level hooks (First-Block-Cache, MagCache) replace a skipped block by the
identity and find blocks by the ``transformer_blocks`` ModuleList and ``TransformerBlockRegistry``; V2's U-ViT long
skips are therefore added inside the block (see ``transformer3d``), and the block class is registered. PAB and
FasterCache hook attention classes: the motion module's temporal attention is an ``AttentionModuleMixin``. MagCache
needs per-model magnitude ratios: instead of a hand-pasted table, the first generation with ``cache=mag`` for a given
step count runs exact while it records them (the same formula as diffusers' calibration mode), later ones use them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from .config import AccelConfig

logger = logging.getLogger(__name__)

CACHE_METHODS = ("none", "first_block", "mag", "taylorseer", "pab", "faster")
THRESHOLD_METHODS = ("first_block", "mag")
INTERVAL_METHODS = ("taylorseer", "pab", "faster")
OFFLOAD_MODES = ("none", "model", "group")
COMPUTE_DTYPES = ("", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("native", "flash", "sage", "xformers")
BASES = ("exact", "default")

# Knob defaults per method; also what the documented PSNR bounds (README "Fast generation") were measured with.
DEFAULT_THRESHOLDS = {"first_block": 0.1, "mag": 0.06}
DEFAULT_INTERVALS = {"taylorseer": 3, "pab": 2, "faster": 2}
# Documented quality floor of each method at its default knob: PSNR (dB) of the decoded frames against exact on a
# trained tiny model with DPM++ and CFG 6 (tests/models/test_accel.py holds every method to it at 20 steps; the
# bench's trained tiny model at 30 steps measured 44-70 dB, README "Fast generation").
PSNR_BOUNDS = {"first_block": 30.0, "mag": 32.0, "taylorseer": 38.0, "pab": 45.0, "faster": 40.0}

# Every key of the setting, fully resolved (the "exact" setting).
EXACT = AccelConfig(base="exact", cache="none", threshold=None, interval=None, compile=False, dtype="", fp8=False,
                    offload="none", vae_slicing=False, vae_tiling=False, attention="native")


class AccelError(ValueError):
    """An accel setting that is malformed or cannot run here; the message says what would work."""


# ---------------------------------------------------------------------------------------------------------------------
# parsing and resolving (pure: no torch import, so request validation can use it)

_BOOL = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
_FIELDS = [f.name for f in dataclasses.fields(AccelConfig) if f.name != "base"]


def default_setting(device: str = "cpu") -> AccelConfig:
    """The default of ``device`` ("cpu" or "cuda"): the fastest setting measured to meet the quality bar
    (>= 30 dB PSNR against exact on the trained tiny model, >= 1.8x denoise speed-up; README "Fast generation").

    TaylorSeer (whole blocks, first order, full compute every 3rd step after 3 warm-up steps) skips a fixed share of
    the block work (18 of 30 steps), so its speed-up does not depend on the prompt, and it kept the highest PSNR of
    the caches at that saving. CUDA: nothing was measured yet (no GPU in the sessions that built this), so the
    default is the same device-independent cache, with no compile, precision or offload change that could alter
    the output beyond the cache's own bound."""
    _ = str(device)  # one default today; kept per device so a measured GPU default can differ
    return dataclasses.replace(EXACT, base="default", cache="taylorseer", interval=DEFAULT_INTERVALS["taylorseer"])


def parse_spec(spec: str) -> AccelConfig:
    """``"default,cache=mag,threshold=0.1"`` → an (unresolved) :class:`AccelConfig`.

    A bare ``exact`` / ``default`` sets the base (first item only); ``key=value`` items set keys. A spec of only
    ``key=value`` items starts from ``exact``. Raises :class:`AccelError` naming the bad item and what is accepted."""
    if not isinstance(spec, str):
        raise AccelError(f"accel spec must be a string, got {type(spec).__name__}")
    items = [part.strip() for part in spec.split(",") if part.strip()]
    if not items:
        raise AccelError("accel spec is empty: expected 'exact', 'default' or key=value items "
                         f"({', '.join(_FIELDS)})")
    base = "exact"
    if "=" not in items[0]:
        base = items.pop(0).lower()
        if base not in BASES:
            raise AccelError(f"accel spec {spec!r}: {base!r} is not a base; expected 'exact' or 'default' first, then "
                             f"key=value items ({', '.join(_FIELDS)})")
    values: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise AccelError(f"accel spec {spec!r}: {item!r} is not key=value (only the first item may be a base)")
        key, raw = (x.strip() for x in item.split("=", 1))
        key = key.lower()
        if key not in _FIELDS:
            raise AccelError(f"accel spec {spec!r}: unknown key {key!r}; expected one of {', '.join(_FIELDS)}")
        if key in values:
            raise AccelError(f"accel spec {spec!r}: {key} is given twice")
        values[key] = _parse_value(key, raw, spec)
    return check(AccelConfig(base=base, **values))


def _parse_value(key: str, raw: str, spec: str) -> Any:
    if key in ("compile", "fp8", "vae_slicing", "vae_tiling"):
        if raw.lower() not in _BOOL:
            raise AccelError(f"accel spec {spec!r}: {key} must be true or false, got {raw!r}")
        return _BOOL[raw.lower()]
    if key == "threshold":
        try:
            return float(raw)
        except ValueError:
            raise AccelError(f"accel spec {spec!r}: threshold must be a number, got {raw!r}") from None
    if key == "interval":
        try:
            return int(raw)
        except ValueError:
            raise AccelError(f"accel spec {spec!r}: interval must be an integer, got {raw!r}") from None
    raw = raw.lower()
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": "", "none": ""}.get(raw, raw) \
        if key == "dtype" else raw


def check(cfg: AccelConfig) -> AccelConfig:
    """Validate the values of a (possibly partial) setting; returns it unchanged. Raises :class:`AccelError`."""
    if cfg.base not in BASES:
        raise AccelError(f"accel base must be one of {', '.join(BASES)}, got {cfg.base!r}")
    choices = {"cache": CACHE_METHODS, "offload": OFFLOAD_MODES, "dtype": COMPUTE_DTYPES,
               "attention": ATTENTION_BACKENDS}
    for key, allowed in choices.items():
        value = getattr(cfg, key)
        if value is not None and value not in allowed:
            shown = ", ".join(a or "'' (as loaded)" for a in allowed)
            raise AccelError(f"accel {key} must be one of {shown}, got {value!r}")
    if cfg.threshold is not None and not (math.isfinite(cfg.threshold) and 0.0 < cfg.threshold <= 1.0):
        raise AccelError(f"accel threshold must be a number in (0, 1], got {cfg.threshold!r}")
    if cfg.interval is not None and not 2 <= cfg.interval <= 10:
        raise AccelError(f"accel interval must be an integer in 2..10, got {cfg.interval!r}")
    return cfg


def resolve(accel: AccelConfig | str | None, device: str = "cpu") -> AccelConfig:
    """A setting (config section, spec string or None = exact) → every key concrete for ``device``.

    Checks combinations that cannot work at all or not on this device, with a message naming what would:
    a threshold for an interval method (or the reverse), fp8/offload without CUDA."""
    if accel is None:
        return EXACT
    cfg = parse_spec(accel) if isinstance(accel, str) else check(accel)
    base = default_setting(device) if cfg.base == "default" else EXACT
    given = {k: getattr(cfg, k) for k in _FIELDS if getattr(cfg, k) is not None}
    if "cache" in given and given["cache"] != base.cache:  # a new method starts from its own knob defaults
        base = dataclasses.replace(base, threshold=None, interval=None)
    out = dataclasses.replace(base, **given)
    if out.cache in THRESHOLD_METHODS:
        if "interval" in given:
            raise AccelError(f"accel cache={out.cache} takes threshold=, not interval= (interval is for "
                             f"{', '.join(INTERVAL_METHODS)})")
        out = dataclasses.replace(out, threshold=out.threshold or DEFAULT_THRESHOLDS[out.cache], interval=None)
    elif out.cache in INTERVAL_METHODS:
        if "threshold" in given:
            raise AccelError(f"accel cache={out.cache} takes interval=, not threshold= (threshold is for "
                             f"{', '.join(THRESHOLD_METHODS)})")
        out = dataclasses.replace(out, interval=out.interval or DEFAULT_INTERVALS[out.cache], threshold=None)
    else:
        if "threshold" in given or "interval" in given:
            raise AccelError("accel threshold / interval need a cache method (cache=first_block, mag, taylorseer, pab "
                             "or faster); cache=none has no knob")
        out = dataclasses.replace(out, threshold=None, interval=None)
    cuda = str(device).startswith("cuda")
    if out.fp8 and not cuda:
        raise AccelError("accel fp8=true (float8 weight storage) needs a CUDA GPU; on the CPU use dtype=bfloat16 "
                         "(half the weight memory, measured faster) or dtype= (as loaded)")
    if out.fp8 and out.dtype == "float32":
        raise AccelError("accel fp8=true computes in bfloat16 or float16; set dtype=bfloat16 or dtype=float16")
    if out.offload != "none" and not cuda:
        raise AccelError(f"accel offload={out.offload} moves weights between CPU and a GPU; this device is {device}, "
                         "where everything already lives in CPU memory: use offload=none")
    if out.offload == "group" and out.cache != "none":
        raise AccelError("accel offload=group cannot be combined with a step cache (both hook every block); use "
                         "offload=model with the cache, or cache=none with offload=group")
    if out.attention in ("flash", "sage") and not cuda:
        raise AccelError(f"accel attention={out.attention} is a CUDA kernel; on the CPU use attention=native")
    return out


def to_spec(cfg: AccelConfig) -> str:
    """The spec string of a setting. A resolved one (every key set) is written relative to exact (``exact`` when it
    is exact); a partial one keeps its base (``default``, ``default,cache=mag``) and only the keys it sets."""

    def item(key: str) -> str:
        value = getattr(cfg, key)
        return f"{key}={str(value).lower() if isinstance(value, bool) else value}"

    if all(getattr(cfg, k) is not None for k in _FIELDS if k not in ("threshold", "interval")):
        items = [item(k) for k in _FIELDS if getattr(cfg, k) != getattr(EXACT, k)]
        return ",".join(items) or "exact"
    items = [item(k) for k in _FIELDS if getattr(cfg, k) is not None]
    if cfg.base == "default":
        items.insert(0, "default")
    return ",".join(items) or "exact"


def is_exact(cfg: AccelConfig) -> bool:
    return dataclasses.replace(cfg, base="exact") == EXACT


# ---------------------------------------------------------------------------------------------------------------------
# applying (torch from here on)


def cache_config(settings: AccelConfig, num_inference_steps: int, current_timestep, mag_ratios=None,
                 do_cfg: bool = True):
    """The diffusers cache config object for a resolved setting (None for cache=none).

    ``current_timestep``: a callable giving the timestep of the running step (PAB / FasterCache skip by timestep
    range); ``do_cfg``: whether the transformer batch is ``[uncond, cond]`` (FasterCache approximates the first half).
    """
    import torch
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    method = settings.cache
    if method == "none":
        return None
    if method == "first_block":
        return FirstBlockCacheConfig(threshold=settings.threshold)
    if method == "mag":
        if mag_ratios is None:
            raise AccelError("cache=mag needs magnitude ratios: they are calibrated by an exact run first")
        return MagCacheConfig(threshold=settings.threshold, num_inference_steps=num_inference_steps,
                              mag_ratios=list(mag_ratios))
    if method == "taylorseer":
        # Whole blocks predicted (our blocks carry their residual and the U-ViT skip-add); factors in float32.
        return TaylorSeerCacheConfig(cache_interval=settings.interval, disable_cache_before_step=3, max_order=1,
                                     taylor_factors_dtype=torch.float32,
                                     cache_identifiers=[r"transformer_blocks\.\d+"])
    if method == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=settings.interval,
            temporal_attention_block_skip_range=settings.interval,
            cross_attention_block_skip_range=2 * settings.interval,
            spatial_attention_block_identifiers=(r"transformer_blocks\.\d+\.attn1$",),
            temporal_attention_block_identifiers=(r"attention_blocks\.\d+$",),
            cross_attention_block_identifiers=(r"transformer_blocks\.\d+\.attn2$",),
            current_timestep_callback=current_timestep,
        )
    if method == "faster":
        return FasterCacheConfig(
            spatial_attention_block_skip_range=settings.interval,
            temporal_attention_block_skip_range=settings.interval,
            spatial_attention_block_identifiers=(r"transformer_blocks\.\d+\.attn1$",),
            temporal_attention_block_identifiers=(r"attention_blocks\.\d+$",),
            tensor_format="BCFHW",
            is_guidance_distilled=not do_cfg,
            current_timestep_callback=current_timestep,
        )
    raise AccelError(f"unknown cache method {method!r}")


def check_device(settings: AccelConfig, device) -> None:
    """Re-check a resolved setting against the device a pipeline actually runs on."""
    resolve(dataclasses.replace(settings, base="exact"), str(device))


class MagRatioRecorder:
    """Records MagCache's magnitude ratios during one exact run: ``mean(|r_t| / |r_{t-1}|)`` over tokens, where
    ``r_t`` is the last block's output minus the first block's input at step t (diffusers' calibration formula)."""

    def __init__(self, transformer):
        self.ratios: list[float] = []
        self._prev = None
        self._head_input = None
        blocks = transformer.transformer_blocks
        self._handles = [
            blocks[0].register_forward_pre_hook(self._pre),
            blocks[-1].register_forward_hook(self._post),
        ]

    def _pre(self, _module, args):
        self._head_input = args[0]

    def _post(self, _module, _args, output):
        import torch

        residual = (output - self._head_input).float()
        if self._prev is None:
            self.ratios.append(1.0)
        else:
            cur, prev = torch.linalg.norm(residual, dim=-1), torch.linalg.norm(self._prev, dim=-1)
            self.ratios.append(float((cur / (prev + 1e-8)).mean()))
        self._prev = residual

    def close(self) -> list[float]:
        for h in self._handles:
            h.remove()
        return self.ratios



def _tensors(module):
    yield from module.named_parameters()
    yield from module.named_buffers()


class AccelRuntime:
    """Applies a resolved setting to one pipeline for one generation, and undoes what must not outlive it.

    Step caches are enabled at the start of every call (fresh state, the call's step count) and disabled at its end,
    so a pipeline shared by requests with different settings (the Triton model) never carries a hook over. The
    compute dtype, compile, attention backend and VAE flags stay applied until a call asks for other values; a
    downcast keeps the loaded weights on the side and restores them bit for bit when a later call wants them back.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.loaded_dtype = None
        self.compute_dtype = None
        self.stash: dict | None = None  # the loaded weights while the DiT runs in another dtype / fp8
        self.fp8 = False
        self.compiled = False
        self.attention = "native"
        self.offload = "none"
        self.mag_ratios: dict[int, list[float]] = {}  # steps -> calibrated MagCache ratios
        self._recorder: MagRatioRecorder | None = None
        self._recording_steps = 0
        self.current_timestep = 1000.0
        self.settings = EXACT

    # -- per call ----------------------------------------------------------------------------------------------------

    def prepare(self, settings: AccelConfig, num_inference_steps: int, do_cfg: bool, device):
        """Apply ``settings`` before the denoising loop; returns the DiT compute dtype."""
        import torch

        check_device(settings, device)
        transformer = self.pipe.transformer
        self.finish()  # a previous call that raised may have left hooks behind
        if self.loaded_dtype is None:
            self.loaded_dtype = transformer.dtype
        self._set_attention(settings.attention)
        compute = self._set_dtype(settings, torch)
        if settings.compile != self.compiled:
            self._set_compile(settings.compile)
        if settings.offload != self.offload:
            self._set_offload(settings.offload, device)
        self._set_vae(settings)
        self.settings = settings
        if settings.cache == "mag" and num_inference_steps not in self.mag_ratios:
            logger.info("cache=mag: this run is exact while it calibrates the magnitude ratios for %d steps",
                        num_inference_steps)
            self._recorder = MagRatioRecorder(transformer)
            self._recording_steps = num_inference_steps
        elif settings.cache != "none":
            config = cache_config(settings, num_inference_steps, lambda: self.current_timestep,
                                  self.mag_ratios.get(num_inference_steps), do_cfg=do_cfg)
            transformer.enable_cache(config)
            transformer._reset_stateful_cache()
        return compute

    def step_context(self, t):
        """Context for one transformer call at timestep ``t`` (the cache hooks' state lives in it)."""
        import contextlib

        self.current_timestep = float(t)
        transformer = self.pipe.transformer
        if transformer.is_cache_enabled:
            return transformer.cache_context("denoise")
        return contextlib.nullcontext()

    def finish(self) -> None:
        """After the denoising loop: keep calibrated MagCache ratios, drop the cache hooks."""
        if self._recorder is not None:
            ratios = self._recorder.close()
            if len(ratios) == self._recording_steps:  # an interrupted run does not calibrate
                self.mag_ratios[self._recording_steps] = ratios
            self._recorder = None
        transformer = self.pipe.transformer
        if transformer.is_cache_enabled:
            transformer.disable_cache()

    # -- sticky parts ------------------------------------------------------------------------------------------------

    def _set_attention(self, name: str) -> None:
        if name == self.attention:
            return
        try:
            self.pipe.transformer.set_attention_backend(name)
        except (ImportError, RuntimeError, ValueError) as exc:
            raise AccelError(f"accel attention={name} cannot run here ({exc}); attention=native always works") from None
        self.attention = name

    def _set_dtype(self, settings: AccelConfig, torch):
        transformer = self.pipe.transformer
        names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        compute = names[settings.dtype] if settings.dtype else self.loaded_dtype
        want_fp8 = bool(settings.fp8)
        if want_fp8 and compute == torch.float32:
            compute = torch.bfloat16
        if self.compute_dtype is None:
            self.compute_dtype = self.loaded_dtype
        if (want_fp8, compute) == (self.fp8, self.compute_dtype):
            return compute
        # Back to the loaded weights first (bit for bit), then to what this call wants.
        if self.stash is not None:
            if self.fp8:
                from diffusers.hooks import HookRegistry

                HookRegistry.check_if_exists_or_initialize(transformer).remove_hook("layerwise_casting", recurse=True)
                self.fp8 = False
            transformer.to(self.loaded_dtype)
            with torch.no_grad():
                for name, tensor in _tensors(transformer):
                    tensor.copy_(self.stash[name])
            self.stash = None
            self.compute_dtype = self.loaded_dtype
        if compute != self.loaded_dtype or want_fp8:
            # parameters and ALL buffers (the non-persistent 2D position table too: a round trip through bf16
            # would round it)
            self.stash = {name: t.detach().to("cpu", copy=True) for name, t in _tensors(transformer)}
            transformer.to(compute)
            if want_fp8:
                transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
                self.fp8 = True
            self.compute_dtype = compute
        return compute

    def _set_compile(self, on: bool) -> None:
        transformer = self.pipe.transformer
        if on:
            transformer.compile_repeated_blocks(dynamic=True)
        else:
            for block in transformer.transformer_blocks:
                block._compiled_call_impl = None
        self.compiled = on

    def _set_offload(self, mode: str, device) -> None:
        if self.offload != "none":
            raise AccelError(f"accel offload={self.offload} is already applied to this pipeline and cannot be switched "
                             f"to {mode} in place; load the pipeline again")
        import torch

        if mode == "model":
            self.pipe.enable_model_cpu_offload(device=device)
        elif mode == "group":
            self.pipe.transformer.enable_group_offload(onload_device=torch.device(device),
                                                       offload_device=torch.device("cpu"),
                                                       offload_type="block_level", num_blocks_per_group=1)
        self.offload = mode

    def _set_vae(self, settings: AccelConfig) -> None:
        vae = self.pipe.vae
        vae.use_slicing = bool(settings.vae_slicing)
        if settings.vae_tiling and not hasattr(vae, "use_tiling"):
            raise AccelError(f"accel vae_tiling=true: {type(vae).__name__} has no spatial tiling (its decode is "
                             "already chunked over frames, flat in memory); use vae_tiling=false, and vae_slicing=true "
                             "for batches")
        if hasattr(vae, "use_tiling"):
            vae.use_tiling = bool(settings.vae_tiling)


__all__ = ["ATTENTION_BACKENDS", "AccelError", "AccelRuntime", "CACHE_METHODS", "DEFAULT_INTERVALS",
           "DEFAULT_THRESHOLDS", "EXACT", "MagRatioRecorder", "PSNR_BOUNDS", "cache_config", "check", "check_device",
           "default_setting", "is_exact", "parse_spec", "resolve", "to_spec"]

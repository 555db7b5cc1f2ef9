"""EasyAnimate MagViT video VAE (``AutoencoderKLMagvit``): the V2 chunk layout and the slice VAE.

Architecture (V2 release, in our own words)
-------------------------------------------
A convolutional KL autoencoder for video clips ``[B, 3, T, H, W]`` in ``[-1, 1]``. Building blocks live in
:mod:`easyanimate.models.vae_blocks`.

* **Widths** are ``ch * ch_mult`` (V2: ``128 * [1, 2, 4, 4] = [128, 256, 512, 512]``).
* **Encoder**: causal 3x3x3 ``conv_in`` (3 -> 128); four down blocks of ``layers_per_block`` (2) residual blocks
  (GroupNorm -> SiLU -> causal conv, twice, plus a 1x1x1 shortcut conv where the width changes); the first three
  blocks end in a downsampler: block 0 (``SpatialDownBlock3D``) halves H, W; blocks 1 and 2
  (``SpatialTemporalDownBlock3D``) halve H, W and time (``T -> (T - 1) // 2 + 1``, so 9 -> 5 -> 3 and 1 -> 1);
  a mid block (res, single-head self-attention over *all* T*H*W positions, res); GroupNorm -> SiLU -> causal
  ``conv_out`` to ``2 * latent_channels`` (= 8) channels; then ``quant_conv`` (1x1x1) gives the moments
  (mean ‖ log-variance) of a diagonal Gaussian. Spatial /8, time 9 -> 3 (1 -> 1).
* **Decoder**: ``post_quant_conv`` (1x1x1, 4 -> 4); causal ``conv_in`` 4 -> 512; mid block; four up blocks of
  ``layers_per_block + 1`` (3) residual blocks (widths 512, 512, 256, 128); the first three end in an upsampler:
  nearest x2 in H, W followed by a causal conv, and for ``SpatialTemporalUpBlock3D`` additionally
  ``T -> 2T - 1`` (frame 0 kept, the rest linearly doubled in time), so 3 -> 5 -> 9 and 1 -> 1;
  GroupNorm -> SiLU -> causal ``conv_out`` to 3 channels.
* **Causality and chunks**: every conv is causal in time (first frame replicated twice in front), but GroupNorm and
  the mid-block attention see the whole clip they are given, so the model is only causal *within* a call.
  V2 therefore runs the VAE on fixed chunks at the pipeline level: 9 frames -> 3 latents when encoding,
  3 latents -> 9 frames when decoding (``mini_batch_encoder`` / ``mini_batch_decoder``). ``encode``/``decode``
  process whatever clip they get in one pass; :meth:`AutoencoderKLMagvit.encode_chunked` and
  :meth:`AutoencoderKLMagvit.decode_chunked` implement V2's chunking (and its seam-smoothing pass).
* **Slice VAE** (``slice_compression_vae=True``, the official slice mode of the V2 code and the V3 model):
  ``encode``/``decode`` slice the clip themselves. Encoding: a clip with an odd frame count has its first frame
  encoded alone (1 latent), then consecutive slices of ``mini_batch_encoder`` (8) frames are encoded independently
  (8 -> 2 latents with the default blocks; 8 -> 1 in the 8x temporal variant whose four blocks are all
  spatio-temporal); convolutions zero-pad time on both sides inside a slice (see ``vae_blocks``). Decoding: an odd
  latent count has its first latent decoded alone (1 frame), then slices of ``mini_batch_decoder`` (2, or 1 in the
  8x variant) latents, each decoded with its previous and following latent slices fed through ``conv_in`` and the
  mid block (then cropped), every slice giving ``2 ** n_temporal_up`` frames per latent. So ``1 + 8k`` frames <->
  ``1 + 2k`` latents (17 <-> 5, 145 <-> 37) and ``1 + 8k`` <-> ``1 + k`` in the 8x variant.
* **Causal cache** (``causal_cache=True``, with ``slice_compression_vae``; our option, after EasyAnimate V4's fix
  for slices that "stutter at scene changes"): the same slices, but every causal convolution continues from the
  frames it kept from the previous slice (and the temporal upsampler interpolates from the previous slice's last
  frame) instead of padding each slice on its own, so the clip's causal convolutions are computed once, seamlessly.
  GroupNorm and the mid-block attention still see one slice. Needs the ``1 + mini_batch_encoder * k`` layout.
* **Scaling**: no scaling factor is applied inside the model; callers multiply latents by ``scaling_factor``
  (0.18215 in V2) after encoding and divide before decoding.

Loading the released weights
----------------------------
The released ``vae/config.json`` says ``"_class_name": "AutoencoderKL"``. diffusers' config loader drops keys that
belong to the named class but not to ours, so every ``AutoencoderKL`` key carried by that file is a constructor
argument here. Released VAE checkpoints may also carry training-only ``loss.*`` tensors (discriminators); they are
skipped with one logged warning that says how many were ignored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook

from easyanimate.models.vae_blocks import (
    DOWN_BLOCK_TYPES,
    UP_BLOCK_TYPES,
    Decoder3D,
    Encoder3D,
    reset_temporal_cache,
    set_temporal_mode,
)

logger = logging.getLogger(__name__)

_DEFAULT_DOWN = (
    "SpatialDownBlock3D",
    "SpatialTemporalDownBlock3D",
    "SpatialTemporalDownBlock3D",
    "SpatialTemporalDownBlock3D",
)
_DEFAULT_UP = ("SpatialUpBlock3D", "SpatialTemporalUpBlock3D", "SpatialTemporalUpBlock3D", "SpatialTemporalUpBlock3D")

# Checkpoint entries that are not part of the model (V2-era VAE training losses / discriminators).
_IGNORED_CHECKPOINT_PATTERNS = (r"^loss\.",)


class AutoencoderKLMagvit(ModelMixin, AutoencoderMixin, ConfigMixin):
    r"""EasyAnimate V2 MagViT video VAE (see the module docstring for the architecture).

    Args:
        in_channels (`int`, defaults to 3): channels of the input video.
        out_channels (`int`, defaults to 3): channels of the decoded video.
        ch (`int`, defaults to 128): base width; block widths are ``ch * ch_mult``.
        ch_mult (`Sequence[int]`, defaults to ``(1, 2, 4, 4)``): width multiplier per down/up block.
        block_out_channels (`Sequence[int]`, *optional*): accepted for compatibility with the released config (and
            diffusers' ``AutoencoderKL``); the widths always come from ``ch * ch_mult``. If omitted it is recorded as
            ``ch * ch_mult``; if it disagrees a warning is logged and the given value is kept in the config.
        down_block_types (`Sequence[str]`): one per block, ``"SpatialDownBlock3D"`` (spatial /2) or
            ``"SpatialTemporalDownBlock3D"`` (spatial and temporal /2). The last block never downsamples.
        up_block_types (`Sequence[str]`): one per block, ``"SpatialUpBlock3D"`` or ``"SpatialTemporalUpBlock3D"``.
            The last block never upsamples.
        layers_per_block (`int`, defaults to 2): residual blocks per encoder block (decoder blocks get one more).
        act_fn (`str`, defaults to ``"silu"``): activation (``silu``/``swish``, ``gelu``, ``relu``, ``mish``).
        latent_channels (`int`, defaults to 4): latent channels (the encoder outputs twice as many moments).
        norm_num_groups (`int`, defaults to 32): GroupNorm groups; must divide every width.
        sample_size (`int`, defaults to 256): nominal training resolution (metadata only).
        scaling_factor (`float`, defaults to 0.18215): latent scale used by *callers* (pipeline / trainers); never
            applied inside ``encode``/``decode``.
        force_upcast (`bool`, defaults to True): tells pipelines to run this VAE in float32 (metadata only).
        slice_compression_vae (`bool`, defaults to False): the official slice VAE (module docstring): ``encode`` /
            ``decode`` slice the clip (first frame alone, then ``mini_batch_encoder`` frames / ``mini_batch_decoder``
            latents per slice). ``False`` is the V2 layout (whole clip per call; chunking in ``*_chunked``).
        mid_block_type (`str`, defaults to ``"MidBlock3D"``): only ``"MidBlock3D"`` is supported.
        mid_block_use_attention (`bool`, defaults to True): whether the mid blocks contain self-attention.
        mid_block_attention_type (`str`, defaults to ``"3d"``): only ``"3d"`` (attention over all T*H*W
            positions) is supported.
        mid_block_num_attention_heads (`int`, defaults to 1): heads of the mid-block attention.
        num_attention_heads (`int`, defaults to 1): heads of attention inside up/down blocks; V2 blocks have no
            attention, so it is only recorded.
        use_gc_blocks (`Sequence[bool]`, *optional*): global-context blocks of later releases; must be unset
            (``None`` or all false).
        mini_batch_encoder (`int`, defaults to 9): frames per chunk in :meth:`encode_chunked` (and the smoothing
            pass of :meth:`decode_chunked`); frames per slice of the slice VAE (8).
        mini_batch_decoder (`int`, defaults to 3): latent frames per chunk in :meth:`decode_chunked`; latent frames
            per slice of the slice VAE (2, or 1 in the 8x temporal variant).
        causal_cache (`bool`, defaults to False): slice VAE only — slices continue the causal convolutions of the
            previous slice from cached features (module docstring) instead of padding on their own.
    """

    _supports_gradient_checkpointing = True
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = list(_IGNORED_CHECKPOINT_PATTERNS)

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        block_out_channels: Sequence[int] | None = None,
        down_block_types: Sequence[str] = _DEFAULT_DOWN,
        up_block_types: Sequence[str] = _DEFAULT_UP,
        layers_per_block: int = 2,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 256,
        scaling_factor: float = 0.18215,
        force_upcast: bool = True,
        slice_compression_vae: bool = False,
        mid_block_type: str = "MidBlock3D",
        mid_block_use_attention: bool = True,
        mid_block_attention_type: str = "3d",
        mid_block_num_attention_heads: int = 1,
        num_attention_heads: int = 1,
        use_gc_blocks: Sequence[bool] | None = None,
        mini_batch_encoder: int = 9,
        mini_batch_decoder: int = 3,
        causal_cache: bool = False,
    ):
        super().__init__()
        widths = [int(ch) * int(m) for m in ch_mult]
        self._validate_config(
            widths=widths,
            down_block_types=list(down_block_types),
            up_block_types=list(up_block_types),
            norm_num_groups=norm_num_groups,
            slice_compression_vae=slice_compression_vae,
            mid_block_type=mid_block_type,
            mid_block_attention_type=mid_block_attention_type,
            mid_block_use_attention=mid_block_use_attention,
            use_gc_blocks=use_gc_blocks,
            layers_per_block=layers_per_block,
            mini_batch_encoder=mini_batch_encoder,
            mini_batch_decoder=mini_batch_decoder,
            causal_cache=causal_cache,
        )
        if block_out_channels is None:
            self.register_to_config(block_out_channels=list(widths))
        elif [int(c) for c in block_out_channels] != widths:
            logger.warning(
                "AutoencoderKLMagvit: config block_out_channels=%s disagrees with ch * ch_mult = %s * %s = %s; "
                "the model is built with ch * ch_mult (block_out_channels is only kept in the config).",
                list(block_out_channels),
                ch,
                list(ch_mult),
                widths,
            )

        self.encoder = Encoder3D(
            in_channels=in_channels,
            out_channels=2 * latent_channels,
            widths=widths,
            down_block_types=list(down_block_types),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            mid_block_use_attention=mid_block_use_attention,
            mid_block_num_attention_heads=mid_block_num_attention_heads,
        )
        self.decoder = Decoder3D(
            in_channels=latent_channels,
            out_channels=out_channels,
            widths=widths,
            up_block_types=list(up_block_types),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            mid_block_use_attention=mid_block_use_attention,
            mid_block_num_attention_heads=mid_block_num_attention_heads,
        )
        self.quant_conv = torch.nn.Conv3d(2 * latent_channels, 2 * latent_channels, kernel_size=1)
        self.post_quant_conv = torch.nn.Conv3d(latent_channels, latent_channels, kernel_size=1)

        self.use_slicing = False
        self.spatial_compression_ratio = 2 ** (len(widths) - 1)
        self._n_temporal_down = sum(1 for b in self.encoder.down_blocks if b.temporal_downsample)
        self._n_temporal_up = sum(1 for b in self.decoder.up_blocks if b.temporal_upsample)
        self.temporal_compression_ratio = 2**self._n_temporal_down
        if slice_compression_vae:
            per_slice = self._slice_latents(mini_batch_encoder)
            if per_slice != mini_batch_decoder or mini_batch_decoder * 2**self._n_temporal_up != mini_batch_encoder:
                raise ValueError(
                    f"slice VAE: a slice of mini_batch_encoder={mini_batch_encoder} frames encodes to {per_slice} "
                    f"latent frames and mini_batch_decoder={mini_batch_decoder} latents decode to "
                    f"{mini_batch_decoder * 2 ** self._n_temporal_up} frames with these blocks "
                    f"({self._n_temporal_down} temporal down / {self._n_temporal_up} up); they must be "
                    f"{mini_batch_decoder} and {mini_batch_encoder} (official: 8 frames <-> 2 latents, or 8 <-> 1 "
                    "with four spatio-temporal blocks)."
                )

    # ------------------------------------------------------------------ config checks
    @staticmethod
    def _validate_config(
        *,
        widths,
        down_block_types,
        up_block_types,
        norm_num_groups,
        slice_compression_vae,
        mid_block_type,
        mid_block_attention_type,
        mid_block_use_attention,
        use_gc_blocks,
        layers_per_block,
        mini_batch_encoder,
        mini_batch_decoder,
        causal_cache,
    ) -> None:
        prefix = "AutoencoderKLMagvit supports the EasyAnimate V2 / slice VAE layouts only: "
        if causal_cache and not slice_compression_vae:
            raise ValueError(
                "causal_cache=True needs slice_compression_vae=True (the cache continues one slice from the previous "
                "one); got slice_compression_vae=False."
            )
        if use_gc_blocks is not None and any(bool(x) for x in use_gc_blocks):
            raise ValueError(
                prefix + f"use_gc_blocks=None (no global-context blocks); got use_gc_blocks={use_gc_blocks!r}."
            )
        bad_down = [t for t in down_block_types if t not in DOWN_BLOCK_TYPES]
        if bad_down:
            raise ValueError(prefix + f"down_block_types from {list(DOWN_BLOCK_TYPES)}; got {down_block_types!r}.")
        bad_up = [t for t in up_block_types if t not in UP_BLOCK_TYPES]
        if bad_up:
            raise ValueError(prefix + f"up_block_types from {list(UP_BLOCK_TYPES)}; got {up_block_types!r}.")
        if not (len(down_block_types) == len(up_block_types) == len(widths)) or len(widths) == 0:
            raise ValueError(
                prefix + "one down block and one up block per ch_mult entry; got "
                f"{len(widths)} ch_mult entries, {len(down_block_types)} down_block_types, "
                f"{len(up_block_types)} up_block_types."
            )
        if mid_block_type != "MidBlock3D":
            raise ValueError(prefix + f"mid_block_type='MidBlock3D'; got {mid_block_type!r}.")
        if mid_block_use_attention and mid_block_attention_type != "3d":
            raise ValueError(prefix + f"mid_block_attention_type='3d'; got {mid_block_attention_type!r}.")
        bad_groups = [w for w in widths if w % norm_num_groups]
        if bad_groups:
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide every width ch*ch_mult={widths}.")
        if layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1; got {layers_per_block}.")
        if mini_batch_encoder < 1 or mini_batch_decoder < 1:
            raise ValueError(
                f"mini_batch_encoder/mini_batch_decoder must be >= 1; got {mini_batch_encoder}/{mini_batch_decoder}."
            )

    # ------------------------------------------------------------------ frame arithmetic
    def _slice_latents(self, num_frames: int) -> int:
        """Latents of ONE slice-mode slice of ``num_frames`` (zero time padding 1 both sides, stride 2: 8->4->2)."""
        n = int(num_frames)
        for _ in range(self._n_temporal_down):
            n = (n - 1) // 2 + 1
        return n

    @property
    def frame_rule(self) -> tuple[int, int]:
        """``(offset, step)`` of the clip lengths the pipeline uses besides 1 frame: ``offset + step * k``, k >= 1.

        V2 chunk layout ``(0, mini_batch_encoder)`` (9k frames); slice VAE ``(1, mini_batch_encoder)`` (1 + 8k)."""
        mbe = int(self.config.mini_batch_encoder)
        return (1, mbe) if self.config.slice_compression_vae else (0, mbe)

    def frame_rule_text(self) -> str:
        offset, step = self.frame_rule
        return f"1 + {step}k" if offset else f"a multiple of {step}"

    def is_valid_num_frames(self, num_frames: int) -> bool:
        """Whether the pipeline can make a clip of ``num_frames`` (1, or :attr:`frame_rule`)."""
        n = int(num_frames)
        offset, step = self.frame_rule
        return n == 1 or (n > offset and (n - offset) % step == 0)

    def check_num_frames(self, num_frames: int, what: str = "num_frames") -> None:
        """Raise ``ValueError`` naming the rule and the nearest valid counts unless ``num_frames`` is valid."""
        n = int(num_frames)
        if self.is_valid_num_frames(n):
            return
        offset, step = self.frame_rule
        k = max((n - offset) // step, 0)
        lower = offset + step * k if k >= 1 else 1
        upper = offset + step * (k + 1)
        layout = "slice VAE" if self.config.slice_compression_vae else "V2 VAE"
        raise ValueError(
            f"{what} must be 1 or {self.frame_rule_text()} (the {layout}: {step} frames -> "
            f"{int(self.config.mini_batch_decoder)} latent frames{', the first frame alone' if offset else ''}), "
            f"got {n} (nearest valid: {lower} or {upper})"
        )

    def video_latent_frames(self, num_frames: int) -> int:
        """Latent frames of a pipeline clip of ``num_frames`` (checked): V2 9k -> 3k; slice 1 + 8k -> 1 + 2k
        (8x variant 1 + 8k -> 1 + k); 1 -> 1."""
        self.check_num_frames(num_frames)
        n = int(num_frames)
        if n == 1:
            return 1
        offset, step = self.frame_rule
        return offset + (n - offset) // step * int(self.config.mini_batch_decoder)

    def video_frames(self, num_latent_frames: int) -> int:
        """Inverse of :meth:`video_latent_frames` (``ValueError`` for a count no pipeline clip gives)."""
        n = int(num_latent_frames)
        offset, step = self.frame_rule
        mbd = int(self.config.mini_batch_decoder)
        if n == 1:
            return 1
        if n <= offset or (n - offset) % mbd:
            raise ValueError(
                f"latent frame count must be 1 or {offset} + {mbd}k for this VAE; got {n}" if offset else
                f"latent frame count must be 1 or a multiple of {mbd} for this VAE; got {n}"
            )
        return offset + (n - offset) // mbd * step

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames :meth:`encode` gives for a clip of ``num_frames`` (V2: 9 -> 3, 1 -> 1; slice VAE:
        first frame alone if the count is odd, then ``mini_batch_encoder`` frame slices: 17 -> 5)."""
        n = int(num_frames)
        if self.config.slice_compression_vae:
            mbe = int(self.config.mini_batch_encoder)
            first, rest = (1, n - 1) if n % 2 else (0, n)
            return first + sum(self._slice_latents(min(mbe, rest - i)) for i in range(0, rest, mbe))
        for _ in range(self._n_temporal_down):
            n = (n - 1) // 2 + 1
        return n

    def decoded_frames(self, num_latent_frames: int) -> int:
        """Frames :meth:`decode` gives for ``num_latent_frames`` (V2: 3 -> 9, 1 -> 1; slice VAE: first latent
        alone if the count is odd, then ``2 ** n_up`` frames per latent: 5 -> 17)."""
        n = int(num_latent_frames)
        if self.config.slice_compression_vae:
            first = n % 2
            return first + (n - first) * 2**self._n_temporal_up
        for _ in range(self._n_temporal_up):
            n = 2 * n - 1
        return n

    # ------------------------------------------------------------------ slice VAE
    def _slice_modes(self) -> tuple[str, str]:
        return ("cached", "cached") if self.config.causal_cache else ("slice_first", "slice")

    def _check_cached_layout(self, n: int, per_slice: int, what: str) -> None:
        if self.config.causal_cache and n != 1 and (n % 2 == 0 or (n - 1) % per_slice):
            raise ValueError(
                f"the causal-cache slice VAE needs 1 or 1 + {per_slice}k {what} (first alone, then whole slices); "
                f"got {n}"
            )

    def _slice_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Official slice encoding (or the causal cache): first frame alone if odd, then independent slices."""
        mbe = int(self.config.mini_batch_encoder)
        n = x.shape[2]
        self._check_cached_layout(n, mbe, "frames")
        first_mode, mode = self._slice_modes()
        parts, start = [], 0
        reset_temporal_cache(self.encoder)
        try:
            if n % 2:
                set_temporal_mode(self.encoder, first_mode)
                parts.append(self.encoder(x[:, :, :1]))
                start = 1
            set_temporal_mode(self.encoder, mode)
            for s in range(start, n, mbe):
                parts.append(self.encoder(x[:, :, s : s + mbe]))
        finally:
            set_temporal_mode(self.encoder, "causal")
            reset_temporal_cache(self.encoder)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _iter_slice_decode(self, z: torch.Tensor, first_frame_alone: bool | None = None):
        """Yield the decoded slices of (post-quant) latents ``z`` in order (official slice decoding, or the cache).

        ``first_frame_alone=None`` follows the official rule (an odd latent count has its first latent alone)."""
        mbd = int(self.config.mini_batch_decoder)
        n = z.shape[2]
        if first_frame_alone is None:
            first_frame_alone = bool(n % 2)
        if self.config.causal_cache and n != 1 and (not first_frame_alone or (n - 1) % mbd):
            raise ValueError(
                f"the causal-cache slice VAE needs 1 or 1 + {mbd}k latent frames (first alone, then whole slices); "
                f"got {n}"
            )
        first_mode, mode = self._slice_modes()
        cached = bool(self.config.causal_cache)
        reset_temporal_cache(self.decoder)
        try:
            start = 0
            if first_frame_alone:
                set_temporal_mode(self.decoder, first_mode)
                yield self.decoder(z[:, :, :1])
                start = 1
            set_temporal_mode(self.decoder, mode)
            previous = None
            for s in range(start, n, mbd):
                current = z[:, :, s : s + mbd]
                if cached:
                    yield self.decoder(current)
                    continue
                following = z[:, :, s + mbd : s + 2 * mbd] if s + mbd < n else None
                yield self.decoder(current, previous, following)
                previous = current
        finally:
            set_temporal_mode(self.decoder, "causal")
            reset_temporal_cache(self.decoder)

    # ------------------------------------------------------------------ diffusers-style API
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.slice_compression_vae:
            return self.quant_conv(self._slice_encode(x))
        return self.quant_conv(self.encoder(x))

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Encode a whole clip ``[B, C, T, H, W]`` in one pass (no chunking, as V2's model does; the slice VAE
        slices internally, as the official slice mode does).

        Returns ``AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(moments))`` (or a 1-tuple) with
        ``moments = quant_conv(encoder(x))`` of shape ``[B, 2 * latent_channels, T', H / 8, W / 8]``. Unscaled.
        """
        if x.ndim != 5:
            raise ValueError(f"encode expects a video tensor [B, C, T, H, W]; got shape {tuple(x.shape)}")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(x_i) for x_i in x.split(1)], dim=0)
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.slice_compression_vae:
            parts = list(self._iter_slice_decode(self.post_quant_conv(z)))
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return self.decoder(self.post_quant_conv(z))

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Decode (unscaled) latents ``[B, latent_channels, T', h, w]`` in one pass -> ``DecoderOutput(sample)``
        (the slice VAE decodes slice by slice, as the official slice mode does).

        The output is not clamped. ``generator`` is accepted for diffusers API compatibility and unused.
        """
        if z.ndim != 5:
            raise ValueError(f"decode expects latents [B, C, T, H, W]; got shape {tuple(z.shape)}")
        if self.use_slicing and z.shape[0] > 1:
            dec = torch.cat([self._decode(z_i) for z_i in z.split(1)], dim=0)
        else:
            dec = self._decode(z)
        if not return_dict:
            return (dec,)
        return DecoderOutput(sample=dec)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """Encode then decode ``sample`` (posterior mode, or a draw when ``sample_posterior``), no chunking."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        dec = self.decode(z).sample
        if not return_dict:
            return (dec,)
        return DecoderOutput(sample=dec)

    # ------------------------------------------------------------------ V2 pipeline-level chunking
    def encode_chunked(
        self, x: torch.Tensor, *, sample: bool = True, generator: torch.Generator | list | None = None
    ) -> torch.Tensor:
        """Encode like the V2 pipeline / trainer: 1 frame in one pass, else independent ``mini_batch_encoder``
        (9) frame chunks -> ``latent_frames(9)`` (3) latents each, concatenated along time.

        ``sample=True`` draws ``posterior.sample(generator)`` per chunk (V2 training/smoothing); ``sample=False``
        takes the posterior mean. Returns UNSCALED latents ``[B, latent_channels, F // 9 * 3 (or 1), H/8, W/8]``.
        Runs under the caller's grad mode.

        Slice VAE: the clip must have 1 or ``1 + mini_batch_encoder * k`` frames; :meth:`encode` slices it
        (first frame alone, then 8-frame slices) and one posterior is drawn from / averaged over.
        """
        if x.ndim != 5:
            raise ValueError(f"encode_chunked expects a video tensor [B, C, F, H, W]; got shape {tuple(x.shape)}")
        if self.config.slice_compression_vae:
            self.check_num_frames(x.shape[2], what="encode_chunked frame count")
            posterior = self.encode(x).latent_dist
            return posterior.sample(generator=generator) if sample else posterior.mode()
        mb = int(self.config.mini_batch_encoder)
        n_frames = x.shape[2]
        if n_frames == 1:
            starts = [0]
            size = 1
        elif n_frames % mb == 0:
            starts = list(range(0, n_frames, mb))
            size = mb
        else:
            lower, upper = (n_frames // mb) * mb, (n_frames // mb + 1) * mb
            raise ValueError(
                f"encode_chunked needs 1 frame or a multiple of mini_batch_encoder={mb} frames; got {n_frames} "
                f"frames (nearest valid: {lower or 1} or {upper})."
            )
        latents = []
        for s in starts:
            posterior = self.encode(x[:, :, s : s + size]).latent_dist
            latents.append(posterior.sample(generator=generator) if sample else posterior.mode())
        return latents[0] if len(latents) == 1 else torch.cat(latents, dim=2)

    def decode_chunked(
        self, z: torch.Tensor, *, smooth: bool = False, generator: torch.Generator | list | None = None
    ) -> torch.Tensor:
        """Decode like the V2 pipeline: 1 latent in one pass, else independent ``mini_batch_decoder`` (3) latent
        chunks -> ``decoded_frames(3)`` (9) frames each, clamped to [-1, 1] and written into ONE preallocated output
        (peak memory does not grow with the clip beyond the output itself).

        ``z`` are UNSCALED latents (divide by ``scaling_factor`` first). With ``smooth=True`` V2's seam-smoothing
        pass follows (skipped when the clip has <= ``mini_batch_encoder`` frames): frames
        ``[mbe // 2 : -(mbe - mbe // 2)]`` (``[4:-5]``) are re-encoded in ``mini_batch_encoder`` frame chunks with
        ``posterior.sample(generator)``, decoded again, averaged 50/50 with the first decode and clamped — chunk by
        chunk, in place. Runs under the caller's grad mode.

        Slice VAE: ``1 + mini_batch_decoder * k`` (or 1) latent frames -> ``1 + mini_batch_encoder * k`` frames, the
        first latent decoded alone and each slice written into the preallocated output as it is decoded (same values
        as :meth:`decode`, clamped). V2's smoothing pass does not apply to slices (``smooth`` is ignored, logged).
        """
        if z.ndim != 5:
            raise ValueError(f"decode_chunked expects latents [B, C, T, H, W]; got shape {tuple(z.shape)}")
        if self.config.slice_compression_vae:
            return self._decode_slices_into_output(z, smooth)
        mbd = int(self.config.mini_batch_decoder)
        n_lat = z.shape[2]
        if n_lat == 1:
            size = 1
        elif n_lat % mbd == 0:
            size = mbd
        else:
            raise ValueError(
                f"decode_chunked needs 1 latent frame or a multiple of mini_batch_decoder={mbd} latent frames; "
                f"got {n_lat} (the V2 pipeline makes F // {self.config.mini_batch_encoder} * {mbd} latent frames)."
            )
        frames_per_chunk = self.decoded_frames(size)
        total = (n_lat // size) * frames_per_chunk

        out = None
        for i, s in enumerate(range(0, n_lat, size)):
            dec = self.decode(z[:, :, s : s + size]).sample.clamp(-1, 1)
            if out is None:
                b, c, _, h, w = dec.shape
                out = torch.empty((b, c, total, h, w), dtype=dec.dtype, device=dec.device)
            out[:, :, i * frames_per_chunk : (i + 1) * frames_per_chunk] = dec
            del dec

        mbe = int(self.config.mini_batch_encoder)
        if smooth and total > mbe:
            self._smooth_in_place(out, generator)
        return out

    def _decode_slices_into_output(self, z: torch.Tensor, smooth: bool) -> torch.Tensor:
        total = self.video_frames(z.shape[2])
        if smooth:
            logger.info("decode_chunked: smooth=True is a V2 chunk-mode pass; the slice VAE decodes without it.")
        out, pos = None, 0
        for dec in self._iter_slice_decode(self.post_quant_conv(z), first_frame_alone=True):
            if out is None:
                b, c, _, h, w = dec.shape
                out = torch.empty((b, c, total, h, w), dtype=dec.dtype, device=dec.device)
            n = dec.shape[2]
            out[:, :, pos : pos + n] = dec.clamp(-1, 1)
            pos += n
            del dec
        return out

    def _smooth_in_place(self, video: torch.Tensor, generator) -> None:
        """V2 ``smooth_output`` done chunk by chunk on ``video`` (already clamped first decode), in place."""
        mbe = int(self.config.mini_batch_encoder)
        mbd = int(self.config.mini_batch_decoder)
        if self.latent_frames(mbe) % mbd != 0 and self.latent_frames(mbe) != 1:
            raise ValueError(
                f"smoothing needs mini_batch_encoder={mbe} frames to encode to a multiple of mini_batch_decoder="
                f"{mbd} latents; this config gives {self.latent_frames(mbe)}."
            )
        before = mbe // 2
        after = mbe - before
        total = video.shape[2]
        middle = total - before - after
        if middle % mbe != 0:
            raise ValueError(
                f"smoothing needs (frames - {mbe}) to be a multiple of mini_batch_encoder={mbe}; got {total} frames."
            )
        grad = torch.is_grad_enabled()
        for s in range(before, before + middle, mbe):
            pixels = video[:, :, s : s + mbe]
            if grad:
                pixels = pixels.clone()
            latents = self.encode(pixels).latent_dist.sample(generator=generator)
            del pixels
            n_lat = latents.shape[2]
            step = min(mbd, n_lat)
            pos = s
            for j in range(0, n_lat, step):
                mid = self.decode(latents[:, :, j : j + step]).sample
                n = mid.shape[2]
                video[:, :, pos : pos + n] = ((video[:, :, pos : pos + n] + mid) / 2).clamp(-1, 1)
                pos += n
                del mid

    # ------------------------------------------------------------------ loading
    @classmethod
    def _load_pretrained_model(
        cls, model, state_dict, resolved_model_file, pretrained_model_name_or_path, loaded_keys, *args, **kwargs
    ):
        expected = set(model.state_dict().keys())
        ignored = [
            k
            for k in loaded_keys
            if k not in expected and any(re.search(p, k) for p in cls._keys_to_ignore_on_load_unexpected)
        ]
        if ignored:
            logger.warning(
                "AutoencoderKLMagvit: ignored %d checkpoint entries that are not part of the model "
                "(training-loss / discriminator weights, e.g. %r) in %s.",
                len(ignored),
                min(ignored),
                pretrained_model_name_or_path,
            )
        result = super()._load_pretrained_model(
            model, state_dict, resolved_model_file, pretrained_model_name_or_path, loaded_keys, *args, **kwargs
        )
        missing = result[1]
        if missing:
            shown = sorted(missing)[:10]
            raise ValueError(
                f"AutoencoderKLMagvit: checkpoint at {pretrained_model_name_or_path} lacks {len(missing)} model "
                f"weights (e.g. {shown}); is the config (ch={model.config.ch}, ch_mult={list(model.config.ch_mult)}) "
                "right for these weights?"
            )
        return result

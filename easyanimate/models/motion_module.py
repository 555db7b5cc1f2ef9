"""The EasyAnimate V2 motion module ("Vanilla"): a small transformer that attends across frames.

The DiT blocks of EasyAnimate V2 only mix tokens *within* a frame (spatial self-attention) and with the caption
(cross-attention). Motion comes from this module, inserted in every block: for every spatial location of every
sample it runs self-attention over the frame axis.

Data flow of one module (channels C, F frames, S = h*w tokens per frame)::

    x (B, F*S, C)  ──┬─▶ GroupNorm per frame (groups over channels, statistics over the S tokens of that frame)
                     │   ─▶ proj_in ─▶ regroup to (B*S, F, C')        one temporal sequence per spatial location
                     │   ─▶ N x [ 2 x (LayerNorm ─▶ + sinusoidal frame PE ─▶ self-attention over F ─▶ + residual)
                     │            ─▶ LayerNorm ─▶ GEGLU feed-forward ─▶ + residual ]
                     │   ─▶ proj_out (zero-initialised, so a fresh module is the identity)
                     └─▶ + x

The frame position encoding is added to the *normalised* input of each attention only (the residual path never
sees it). It is a fixed interleaved sin/cos table kept as a persistent buffer ``pos_encoder.pe`` of shape
``[1, max_len, C']`` because the official checkpoints store it.

State-dict names follow the official checkpoints (``temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q``,
``...norms.0``, ``...ff.net.0.proj``, ``...ff_norm``, ``...proj_out``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

# The V2 yaml (config/easyanimate_video_magvit_motion_module_v2.yaml); missing keys of a user dict fall back to these.
V2_MOTION_MODULE_KWARGS: dict[str, Any] = {
    "num_attention_heads": 8,
    "num_transformer_block": 1,
    "attention_block_types": ["Temporal_Self", "Temporal_Self"],
    "temporal_position_encoding": True,
    "temporal_position_encoding_max_len": 4096,
    "temporal_attention_dim_div": 1,
    "block_size": 1,
}
# Keys we understand. `block_size` only matters for the "VanillaGrid" variant (V1), so it is accepted and unused.
# `zero_initialize` (default True) and `norm_num_groups` (default 32) mirror knobs of the original module.
_KNOWN_KEYS = set(V2_MOTION_MODULE_KWARGS) | {"zero_initialize", "norm_num_groups"}

# CUDA attention kernels put the batch (and/or heads) dimension in a launch-grid axis limited to 65,535 blocks.
# Temporal attention has a batch of B*h*w short sequences, so very large latents are sent in slices of at most
# 65,535 // heads sequences. This is about kernel launch limits, not memory: SDPA never materialises F x F per head
# for more than one slice at a time anyway.
_GRID_LIMIT = 65535


def resolve_motion_module_kwargs(motion_module_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Fill missing keys with the V2 values and reject what this implementation does not support.

    Raises:
        ValueError: on unknown keys, non-"Temporal_Self" attention blocks or invalid sizes.
    """
    given = dict(motion_module_kwargs or {})
    unknown = sorted(set(given) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(
            f"motion_module_kwargs has unsupported keys {unknown}; supported keys are {sorted(_KNOWN_KEYS)}"
        )
    resolved = {**V2_MOTION_MODULE_KWARGS, **given}
    types = list(resolved["attention_block_types"])
    if not types or any(t != "Temporal_Self" for t in types):
        raise ValueError(
            "motion_module_kwargs.attention_block_types must be a non-empty list of 'Temporal_Self' "
            f"(the V2 motion module has no cross-attention), got {types}"
        )
    resolved["attention_block_types"] = types
    for key in (
        "num_attention_heads",
        "num_transformer_block",
        "temporal_position_encoding_max_len",
        "temporal_attention_dim_div",
    ):
        if not isinstance(resolved[key], int) or resolved[key] < 1:
            raise ValueError(f"motion_module_kwargs.{key} must be a positive int, got {resolved[key]!r}")
    return resolved


def interleaved_sincos_table(max_len: int, dim: int) -> torch.Tensor:
    """Frame PE ``[1, max_len, dim]``: even channels sin(pos*div), odd channels cos(pos*div),
    ``div = exp(arange(0, dim, 2) * -ln(10000) / dim)`` (float32, like the official buffer)."""
    if dim % 2:
        raise ValueError(f"the temporal position encoding needs an even channel count, got {dim}")
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


class TemporalPositionalEncoding(nn.Module):
    """Adds ``pe[:, :F]`` to a ``(N, F, C)`` input. ``pe`` is persistent: official checkpoints contain it."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.register_buffer("pe", interleaved_sincos_table(max_len, dim), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_frames = x.shape[1]
        if num_frames > self.pe.shape[1]:
            raise ValueError(f"{num_frames} frames exceed temporal_position_encoding_max_len={self.pe.shape[1]}")
        return x + self.pe[:, :num_frames].to(x.dtype)


class TemporalAttnProcessor:
    """Computes a :class:`TemporalSelfAttention` through diffusers' ``dispatch_attention_fn``.

    ``_attention_backend`` is what ``ModelMixin.set_attention_backend`` / the ``attention_backend`` context manager
    select (None = the active one, ``native`` SDPA by default). Holds no weights, so the state dict is unchanged.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: TemporalSelfAttention, x: torch.Tensor) -> torch.Tensor:
        n, f, _ = x.shape
        # dispatch_attention_fn takes (batch, seq, heads, head_dim); the native backend permutes to SDPA's layout,
        # which is exactly the view(...).transpose(1, 2) that the pre-dispatch code used.
        q, k, v = (proj(x).view(n, f, attn.heads, -1) for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = dispatch_attention_fn(q, k, v, backend=self._attention_backend)  # scale = head_dim ** -0.5, as in V2
        return out.reshape(n, f, -1)


class TemporalSelfAttention(nn.Module, AttentionModuleMixin):
    """Multi-head self-attention along the frame axis of ``(N, F, C)`` sequences (q/k/v without bias).

    An ``AttentionModuleMixin``: diffusers' attention-backend selection and its attention-level caches (Pyramid
    Attention Broadcast, FasterCache) see it like their own attention classes.
    """

    _default_processor_cls = TemporalAttnProcessor
    _available_processors = [TemporalAttnProcessor]
    _supports_qkv_fusion = False
    is_cross_attention = False

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        dropout: float = 0.0,
        position_encoding: bool = True,
        max_len: int = 4096,
    ):
        super().__init__()
        inner_dim = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim), nn.Dropout(dropout)])
        self.pos_encoder = TemporalPositionalEncoding(dim, max_len) if position_encoding else None
        self.set_processor(TemporalAttnProcessor())

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.processor(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        max_sequences = max(1, _GRID_LIMIT // self.heads)
        if x.shape[0] <= max_sequences:
            out = self._attend(x)
        else:
            out = torch.cat([self._attend(part) for part in x.split(max_sequences)])
        return self.to_out[1](self.to_out[0](out))


class TemporalTransformerBlock(nn.Module):
    """Pre-norm transformer block on ``(N, F, C)``: temporal self-attentions then a GEGLU feed-forward."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        attention_block_types: list[str],
        dropout: float = 0.0,
        position_encoding: bool = True,
        max_len: int = 4096,
    ):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            TemporalSelfAttention(dim, heads, head_dim, dropout, position_encoding, max_len)
            for _ in attention_block_types
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in attention_block_types)  # eps 1e-5, affine
        self.ff = FeedForward(dim, dropout=dropout, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms, strict=False):
            x = attention(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer3DModel(nn.Module):
    """GroupNorm → proj_in → blocks over frames → proj_out → + input, on frame-major tokens ``(B, F*S, C)``."""

    def __init__(
        self,
        in_channels: int,
        num_attention_heads: int,
        attention_head_dim: int,
        attention_block_types: list[str],
        num_layers: int = 1,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        position_encoding: bool = True,
        max_len: int = 4096,
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        if in_channels % norm_num_groups:
            raise ValueError(
                f"motion module GroupNorm needs channels divisible by {norm_num_groups} groups, got {in_channels}"
            )
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(
                inner_dim,
                num_attention_heads,
                attention_head_dim,
                attention_block_types,
                dropout,
                position_encoding,
                max_len,
            )
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(inner_dim, in_channels)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        batch, tokens, channels = hidden_states.shape
        spatial = tokens // num_frames
        residual = hidden_states

        # GroupNorm statistics are per frame, so normalise (B*F, C, S) before regrouping by location.
        x = self.norm(hidden_states.reshape(batch * num_frames, spatial, channels).transpose(1, 2))
        # (B*F, C, S) -> (B, S, F, C) -> one length-F sequence per (sample, location).
        x = (
            x.reshape(batch, num_frames, channels, spatial)
            .permute(0, 3, 1, 2)
            .reshape(batch * spatial, num_frames, channels)
        )
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x)
        x = self.proj_out(x)
        x = x.reshape(batch, spatial, num_frames, channels).transpose(1, 2).reshape(batch, tokens, channels)
        return x + residual


class VanillaTemporalModule(nn.Module):
    """The V2 "Vanilla" motion module (wrapper that owns ``temporal_transformer``; its proj_out starts at zero).

    Args:
        in_channels (`int`): token width C of the DiT (1152 for XL-2).
        num_attention_heads (`int`, default 8): heads; head width = C // heads // temporal_attention_dim_div.
        num_transformer_block (`int`, default 1): temporal transformer blocks.
        attention_block_types (`list[str]`, default 2 x "Temporal_Self"): one self-attention per entry.
        temporal_position_encoding (`bool`, default True): add the sinusoidal frame PE before q/k/v.
        temporal_position_encoding_max_len (`int`, default 4096): PE table length = max frames.
        temporal_attention_dim_div (`int`, default 1): shrinks the attention width.
        block_size (`int`, default 1): accepted for config compatibility; unused (VanillaGrid only).
        zero_initialize (`bool`, default True): zero proj_out so a new module starts as the identity.
        norm_num_groups (`int`, default 32): GroupNorm groups.
        dropout (`float`, default 0.0): dropout after attention output and inside the feed-forward.

    Forward: ``hidden_states (B, F*h*w, C)`` frame-major tokens and ``num_frames`` F → same shape.
    """

    def __init__(
        self,
        in_channels: int,
        num_attention_heads: int = 8,
        num_transformer_block: int = 1,
        attention_block_types: list[str] = ("Temporal_Self", "Temporal_Self"),
        temporal_position_encoding: bool = True,
        temporal_position_encoding_max_len: int = 4096,
        temporal_attention_dim_div: int = 1,
        block_size: int = 1,
        zero_initialize: bool = True,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        head_dim = in_channels // num_attention_heads // temporal_attention_dim_div
        if head_dim < 1:
            raise ValueError(
                f"motion module head width is {in_channels} // {num_attention_heads} // "
                f"{temporal_attention_dim_div} = {head_dim}; it must be >= 1"
            )
        self.temporal_transformer = TemporalTransformer3DModel(
            in_channels=in_channels,
            num_attention_heads=num_attention_heads,
            attention_head_dim=head_dim,
            attention_block_types=list(attention_block_types),
            num_layers=num_transformer_block,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            position_encoding=temporal_position_encoding,
            max_len=temporal_position_encoding_max_len,
        )
        if zero_initialize:
            nn.init.zeros_(self.temporal_transformer.proj_out.weight)
            nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.temporal_transformer(hidden_states, num_frames)

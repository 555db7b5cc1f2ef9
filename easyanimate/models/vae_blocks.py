"""Building blocks of the EasyAnimate V2 MagViT video VAE (see ``autoencoder_magvit.py`` for the whole model).

All blocks work on video tensors laid out ``[batch, channels, frames, height, width]``.

Conventions shared by every block (they decide numerical parity with the released V2 weights):

* Every 3x3x3 convolution is *causal in time*: before the convolution the first frame is repeated
  ``(kernel_t - 1)`` times in front of the clip (replicate padding, front only), so output frame ``t`` only sees
  input frames ``<= t``. Spatially the convolution zero-pads by ``kernel // 2`` (or not at all in the
  downsamplers, which zero-pad one row/column at the right/bottom themselves and then use stride 2).
* GroupNorm (eps 1e-6) normalises a group over its channels *and* all frames and pixels of the clip it is given,
  so a clip's statistics depend on every frame of that clip: the model is only causal within the chunk it is fed.
* Temporal downsampling (stride 2 with 2 replicated front frames) maps ``T -> (T - 1) // 2 + 1`` (9 -> 5 -> 3);
  temporal upsampling keeps frame 0 and linearly doubles the remaining frames, ``T -> 2T - 1`` (3 -> 5 -> 9).

Temporal modes. Every module that treats time specially (:class:`CausalConv3d`, :class:`SpatialTemporalUpsampler3D`)
has a run-time ``temporal_mode`` (set for a whole tree with :func:`set_temporal_mode`; never saved in a checkpoint):

* ``"causal"`` — the V2 rule above (the default).
* ``"slice_first"`` / ``"slice"`` — the official slice VAE (``slice_compression_vae``): convolutions zero-pad
  ``ceil(((k_t - 1) + (1 - stride_w)) / 2)`` (= 1) frames on *both* sides, so stride 2 maps 8 -> 4 -> 2 and 1 -> 1.
  The temporal upsampler does nothing to time for the lone first frame (``slice_first``) and doubles every frame
  of a slice (``slice``, ``T -> 2T``: 2 -> 4 -> 8).
* ``"cached"`` — the causal cache: a convolution prepends the frames it kept from the previous call instead of
  padding (the first call pads like ``"causal"``) and keeps, for the next call, the padded input from its next
  window start on; the temporal upsampler interpolates with the previous call's last frame in front (``T -> 2T``;
  the first call uses the V2 rule). Feeding a clip in consecutive calls thus gives the causal convolutions of the
  whole clip, each frame computed once. Clear the kept frames with :func:`reset_temporal_cache`.

State-dict names (``convs``, ``downsampler.conv``, ``upsampler.conv``, ``attentions``, ``norm1``/``conv1``/...,
``shortcut``, ``to_q``/``to_k``/``to_v``/``to_out``, ``group_norm``) follow the released checkpoint layout, and
modules are registered in the checkpoint's order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

GROUP_NORM_EPS = 1e-6

DOWN_BLOCK_TYPES = ("SpatialDownBlock3D", "SpatialTemporalDownBlock3D")
UP_BLOCK_TYPES = ("SpatialUpBlock3D", "SpatialTemporalUpBlock3D")
TEMPORAL_MODES = ("causal", "slice_first", "slice", "cached")


def set_temporal_mode(module: nn.Module, mode: str) -> None:
    """Set ``temporal_mode`` (see the module docstring) on every time-aware submodule of ``module``."""
    if mode not in TEMPORAL_MODES:
        raise ValueError(f"temporal mode must be one of {TEMPORAL_MODES}; got {mode!r}")
    for m in module.modules():
        if hasattr(m, "temporal_mode"):
            m.temporal_mode = mode


def reset_temporal_cache(module: nn.Module) -> None:
    """Drop the frames every ``"cached"``-mode submodule of ``module`` kept from its previous call."""
    for m in module.modules():
        if hasattr(m, "temporal_cache"):
            m.temporal_cache = None


def make_activation(name: str) -> nn.Module:
    """Activation module by config name (``silu``/``swish``, ``gelu``, ``relu``, ``mish``)."""
    table: dict[str, Callable[[], nn.Module]] = {
        "silu": nn.SiLU,
        "swish": nn.SiLU,
        "gelu": nn.GELU,
        "relu": nn.ReLU,
        "mish": nn.Mish,
    }
    key = str(name).lower()
    if key not in table:
        raise ValueError(f"Unsupported act_fn {name!r}; supported: {sorted(table)}")
    return table[key]()


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"expected an int or 3 ints, got {v!r}")
    return t  # type: ignore[return-value]


class CausalConv3d(nn.Conv3d):
    """3D convolution that is causal along time.

    The clip is extended in front by ``(kernel_t - 1)`` copies of its first frame (nothing is added at the end),
    so the temporal length only changes through the temporal stride: ``T -> (T - 1) // stride_t + 1``.
    Spatial padding is ordinary zero padding of ``spatial_padding`` pixels (default ``kernel // 2``).
    The parameters are those of a plain ``nn.Conv3d`` (``weight [out, in, kt, kh, kw]``, ``bias [out]``).
    ``temporal_mode`` switches to the slice VAE's zero padding or to the causal cache (module docstring).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        spatial_padding: int | None = None,
    ):
        kt, kh, kw = _triple(kernel_size)
        if spatial_padding is None:
            pad_h, pad_w = kh // 2, kw // 2
        else:
            pad_h = pad_w = int(spatial_padding)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size=(kt, kh, kw),
            stride=_triple(stride),
            padding=(0, pad_h, pad_w),
        )
        self.time_pad = kt - 1
        # the official slice mode pads symmetrically; its formula uses the *width* stride (kept for parity)
        self.slice_time_pad = math.ceil(((kt - 1) + (1 - self.stride[2])) / 2)
        self.temporal_mode = "causal"
        self.temporal_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.temporal_mode
        if mode in ("slice", "slice_first"):
            if self.slice_time_pad > 0:
                x = F.pad(x, (0, 0, 0, 0, self.slice_time_pad, self.slice_time_pad))
            return super().forward(x)
        if mode == "cached" and self.temporal_cache is not None:
            x = torch.cat([self.temporal_cache.to(x.dtype), x], dim=2)
        elif self.time_pad > 0:
            first = x[:, :, :1]
            x = torch.cat([first.expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        if mode == "cached":
            kt, st = self.kernel_size[0], self.stride[0]
            n_out = (x.shape[2] - kt) // st + 1
            if n_out < 1:
                raise ValueError(
                    f"causal cache: a call gave this conv {x.shape[2]} frames with what it kept, fewer than its "
                    f"temporal kernel {kt}; feed whole slices"
                )
            self.temporal_cache = x[:, :, n_out * st :]
        return super().forward(x)


class ResidualBlock3D(nn.Module):
    """``GN -> act -> CausalConv -> GN -> act -> dropout -> CausalConv`` plus a shortcut.

    The shortcut is the identity, or a 1x1x1 ``nn.Conv3d`` when the channel count changes. The sum is divided by
    ``output_scale_factor`` (1.0 in V2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=GROUP_NORM_EPS)
        self.act = make_activation(act_fn)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=GROUP_NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        if in_channels != out_channels:
            self.shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1)
        else:
            self.shortcut = nn.Identity()
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        out = h + shortcut
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Attention3D(nn.Module):
    """Self-attention over every (frame, row, column) position of the clip, with a GroupNorm pre-norm and residual.

    ``to_q``/``to_k``/``to_v``/``to_out`` are single ``nn.Linear(C, C)`` with bias (``to_out`` is *not* a
    ``Sequential``); heads split the channels (``C // heads`` each), scores are scaled by ``head_dim ** -0.5``.
    """

    def __init__(self, channels: int, num_heads: int = 1, norm_num_groups: int = 32):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"attention channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.group_norm = nn.GroupNorm(norm_num_groups, channels, eps=GROUP_NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, T*H*W, C]
        heads = self.num_heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, -1, heads, c // heads).transpose(1, 2)  # [B, heads, N, d]

        q, k, v = split(self.to_q(tokens)), split(self.to_k(tokens)), split(self.to_v(tokens))
        attn = F.scaled_dot_product_attention(q, k, v)
        attn = attn.transpose(1, 2).reshape(b, -1, c)
        out = self.to_out(attn).transpose(1, 2).reshape(b, c, t, h, w)
        return out + x


class MidBlock3D(nn.Module):
    """``res -> [attention -> res] * num_attn`` at the lowest resolution (V2: res, Attention3D, res)."""

    def __init__(
        self,
        channels: int,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        use_attention: bool = True,
        num_attention_heads: int = 1,
        num_layers: int = 1,
    ):
        super().__init__()
        self.convs = nn.ModuleList(
            [ResidualBlock3D(channels, channels, norm_num_groups, act_fn) for _ in range(num_layers + 1)]
        )
        self.attentions = nn.ModuleList(
            [
                Attention3D(channels, num_attention_heads, norm_num_groups) if use_attention else nn.Identity()
                for _ in range(num_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs[0](x)
        for attn, res in zip(self.attentions, self.convs[1:], strict=False):
            x = res(attn(x))
        return x


class SpatialDownsampler3D(nn.Module):
    """Halve H and W: zero-pad one column right and one row bottom, then a causal 3x3x3 conv, stride (1, 2, 2)."""

    temporal = False

    def __init__(self, channels: int):
        super().__init__()
        stride = (2, 2, 2) if self.temporal else (1, 2, 2)
        self.conv = CausalConv3d(channels, channels, 3, stride=stride, spatial_padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class SpatialTemporalDownsampler3D(SpatialDownsampler3D):
    """Like :class:`SpatialDownsampler3D` but stride (2, 2, 2): also ``T -> (T - 1) // 2 + 1`` (9 -> 5, 5 -> 3)."""

    temporal = True


class SpatialUpsampler3D(nn.Module):
    """Double H and W (nearest), then a causal 3x3x3 conv."""

    temporal = False

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return self.conv(x)


def _double_time(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=(2.0, 1.0, 1.0), mode="trilinear", align_corners=False)


class SpatialTemporalUpsampler3D(SpatialUpsampler3D):
    """Spatial x2 + conv as :class:`SpatialUpsampler3D`, then time ``T -> 2T - 1``: frame 0 is kept as is and
    frames ``1:`` are doubled by linear interpolation in time (trilinear with unit spatial scale,
    ``align_corners=False``). Slice VAE (``temporal_mode``): ``slice_first`` keeps time, ``slice`` doubles every
    frame (``T -> 2T``); ``cached`` doubles every frame with the previous call's last frame as left neighbour."""

    temporal = True

    def __init__(self, channels: int):
        super().__init__(channels)
        self.temporal_mode = "causal"
        self.temporal_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        mode = self.temporal_mode
        if mode == "slice_first":
            return x
        if mode == "slice":
            return _double_time(x)
        if mode == "cached" and self.temporal_cache is not None:
            prev = self.temporal_cache.to(x.dtype)
            self.temporal_cache = x[:, :, -1:]
            return _double_time(torch.cat([prev, x], dim=2))[:, :, 2:]
        if mode == "cached":
            self.temporal_cache = x[:, :, -1:]
        if x.shape[2] > 1:
            x = torch.cat([x[:, :, :1], _double_time(x[:, :, 1:])], dim=2)
        return x


class DownBlock3D(nn.Module):
    """``num_layers`` residual blocks, then (optionally) a spatial or spatio-temporal downsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        norm_num_groups: int,
        act_fn: str,
        add_downsample: bool,
        temporal: bool,
    ):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                ResidualBlock3D(in_channels if i == 0 else out_channels, out_channels, norm_num_groups, act_fn)
                for i in range(num_layers)
            ]
        )
        self.temporal_downsample = bool(add_downsample and temporal)
        if add_downsample:
            cls = SpatialTemporalDownsampler3D if temporal else SpatialDownsampler3D
            self.downsampler = cls(out_channels)
        else:
            self.downsampler = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
        return x


class UpBlock3D(nn.Module):
    """``num_layers`` residual blocks, then (optionally) a spatial or spatio-temporal upsampler.

    ``register_upsampler_first`` only changes the registration order (and so the state-dict order) — the released
    ``SpatialUpBlock3D`` lists its upsampler before its res blocks; the forward order is always res blocks first.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        norm_num_groups: int,
        act_fn: str,
        add_upsample: bool,
        temporal: bool,
        register_upsampler_first: bool = False,
    ):
        super().__init__()
        self.temporal_upsample = bool(add_upsample and temporal)
        upsampler = None
        if add_upsample:
            upsampler = (SpatialTemporalUpsampler3D if temporal else SpatialUpsampler3D)(out_channels)
        if register_upsampler_first:
            self.upsampler = upsampler
        self.convs = nn.ModuleList(
            [
                ResidualBlock3D(in_channels if i == 0 else out_channels, out_channels, norm_num_groups, act_fn)
                for i in range(num_layers)
            ]
        )
        if not register_upsampler_first:
            self.upsampler = upsampler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        if self.upsampler is not None:
            x = self.upsampler(x)
        return x


def _run(module: nn.Module, owner: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``module(x)``, through gradient checkpointing when the owner has it switched on and grads are enabled.

    Never in ``"cached"`` mode: a recomputation during backward would read (and overwrite) the causal cache of a
    later slice."""
    if (
        getattr(owner, "gradient_checkpointing", False)
        and torch.is_grad_enabled()
        and owner.conv_in.temporal_mode != "cached"
    ):
        return owner._gradient_checkpointing_func(module, x)
    return module(x)


class Encoder3D(nn.Module):
    """Video -> ``2 * latent_channels`` moments (mean and log-variance), spatial /8 and temporal 9 -> 3 in V2.

    ``conv_in`` -> down blocks (``layers_per_block`` res blocks each; every block but the last ends in a
    downsampler, temporal for ``SpatialTemporalDownBlock3D``) -> mid block -> GN -> act -> ``conv_out``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int],
        down_block_types: Sequence[str],
        layers_per_block: int,
        norm_num_groups: int,
        act_fn: str,
        mid_block_use_attention: bool,
        mid_block_num_attention_heads: int,
    ):
        super().__init__()
        self.gradient_checkpointing = False
        self.conv_in = CausalConv3d(in_channels, widths[0], 3)
        blocks = []
        prev = widths[0]
        for i, (block_type, width) in enumerate(zip(down_block_types, widths, strict=False)):
            blocks.append(
                DownBlock3D(
                    prev,
                    width,
                    layers_per_block,
                    norm_num_groups,
                    act_fn,
                    add_downsample=i < len(widths) - 1,
                    temporal=block_type == "SpatialTemporalDownBlock3D",
                )
            )
            prev = width
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock3D(
            widths[-1], norm_num_groups, act_fn, mid_block_use_attention, mid_block_num_attention_heads
        )
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, widths[-1], eps=GROUP_NORM_EPS)
        self.conv_act = make_activation(act_fn)
        self.conv_out = CausalConv3d(widths[-1], out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = _run(block, self, x)
        x = _run(self.mid_block, self, x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder3D(nn.Module):
    """Latents -> video: ``conv_in`` -> mid block -> up blocks (``layers_per_block + 1`` res blocks each; every
    block but the last ends in an upsampler, temporal for ``SpatialTemporalUpBlock3D``) -> GN -> act -> ``conv_out``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int],
        up_block_types: Sequence[str],
        layers_per_block: int,
        norm_num_groups: int,
        act_fn: str,
        mid_block_use_attention: bool,
        mid_block_num_attention_heads: int,
    ):
        super().__init__()
        self.gradient_checkpointing = False
        reversed_widths = list(reversed(widths))
        self.conv_in = CausalConv3d(in_channels, reversed_widths[0], 3)
        self.mid_block = MidBlock3D(
            reversed_widths[0], norm_num_groups, act_fn, mid_block_use_attention, mid_block_num_attention_heads
        )
        blocks = []
        prev = reversed_widths[0]
        for i, (block_type, width) in enumerate(zip(up_block_types, reversed_widths, strict=False)):
            temporal = block_type == "SpatialTemporalUpBlock3D"
            blocks.append(
                UpBlock3D(
                    prev,
                    width,
                    layers_per_block + 1,
                    norm_num_groups,
                    act_fn,
                    add_upsample=i < len(widths) - 1,
                    temporal=temporal,
                    register_upsampler_first=not temporal,
                )
            )
            prev = width
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, reversed_widths[-1], eps=GROUP_NORM_EPS)
        self.conv_act = make_activation(act_fn)
        self.conv_out = CausalConv3d(reversed_widths[-1], out_channels, 3)

    def forward(
        self, z: torch.Tensor, previous: torch.Tensor | None = None, following: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode ``z``. The official slice decoder passes the neighbouring latent slices as ``previous`` /
        ``following``: they go through ``conv_in`` and the mid block together with ``z`` (so its attention and
        GroupNorm see them) and are cropped off before the up blocks."""
        if previous is None and following is None:
            x = self.conv_in(z)
            x = _run(self.mid_block, self, x)
        else:
            parts = [t for t in (previous, z, following) if t is not None]
            x = _run(self.mid_block, self, self.conv_in(torch.cat(parts, dim=2)))
            start = 0 if previous is None else previous.shape[2]
            x = x[:, :, start : start + z.shape[2]]
        for block in self.up_blocks:
            x = _run(block, self, x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))

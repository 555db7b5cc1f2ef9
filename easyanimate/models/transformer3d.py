"""EasyAnimate V2 diffusion transformer (`Transformer3DModel`).

The model is PixArt-alpha's DiT turned into a video model with three changes:

1. **Frames as a batch of images for the 2D parts.** Latents ``(B, C, F, H, W)`` are patchified frame by frame
   (Conv2d with kernel = stride = patch size) and get the same fixed 2D sin-cos position table on every frame.
   Tokens are kept frame-major, ``(B, F*h*w, D)``. Spatial self-attention (``attn1``) runs within each frame only.
2. **A motion module in every block** (``attn_temporal``, see :mod:`easyanimate.models.motion_module`): after the
   spatial attention, every spatial location attends over the frames. It carries its own residual and starts as
   the identity (zero-initialised output projection).
3. **U-ViT long skips.** The first ``n = (num_layers - 2) // 2`` blocks push their outputs on a stack; the last
   ``n`` blocks pop it (last in, first out) and add ``long_connect_fc[k](skip)`` to their *input*; the middle
   blocks neither push nor pop. For V2's 28 layers: blocks 0..12 push, 13 and 14 are plain, 15..27 pop
   (15 takes 12, ..., 27 takes 0). The 13 skip Linears start at zero so a PixArt checkpoint behaves unchanged.

The rest is PixArt: one shared adaLN-single timestep embedding (``adaln_single``) modulates every block through a
learned per-block ``scale_shift_table`` (shift/scale/gate for attention and MLP), a T5 caption projection feeds the
cross-attention (``attn2``, no pre-norm, plain residual), and the output head is a non-affine LayerNorm modulated
by the timestep embedding, a Linear to ``p*p*out_channels`` and an unpatchify back to ``(B, out, F, H, W)``.
``out_channels = 2 * in_channels`` carries PixArt's learned variance.

One block, in order (x = tokens, t = per-block modulation)::

    x = x + gate_msa * attn1_per_frame(LN(x) * (1 + scale_msa) + shift_msa)
    x = motion_module(x)                        # own GroupNorm, residual
    x = x + attn2(x, captions, caption_mask)    # mask -> additive bias (1 - m) * -10000
    x = x + gate_mlp * ff(LN(x) * (1 + scale_mlp) + shift_mlp)

Spatial and cross attention are diffusers ``Attention`` modules whose processor (:class:`EasyAnimateAttnProcessor`)
computes through diffusers' ``dispatch_attention_fn``; the motion module's temporal attention does the same
(:class:`~easyanimate.models.motion_module.TemporalAttnProcessor`). So ``model.set_attention_backend("flash")`` /
``with attention_backend("sage"):`` select the kernel (``native`` SDPA by default, numerically what the code did
before dispatch existed). Parameter and buffer names match the official V2 checkpoints
(``alibaba-pai/EasyAnimateV2-XL-2-*``), including the persistent frame-PE buffers ``...pos_encoder.pe``.

Step caching: the model is a diffusers ``CacheMixin`` (``enable_cache(FirstBlockCacheConfig(...))`` and friends).
The block-level caches (First-Block-Cache, MagCache) hook the ``transformer_blocks`` list and replace skipped blocks
by the identity, so every block must map its own input to its own output. That is why the U-ViT long skip is
added INSIDE the block (its ``skip`` argument, already projected by ``long_connect_fc``) rather than between blocks:
a skipped block then skips its skip-add too, and the cached residual (tail output minus head output) covers it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import PixArtAlphaTextProjection
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from torch import nn

from easyanimate.models.motion_module import VanillaTemporalModule, resolve_motion_module_kwargs

__all__ = ["EasyAnimateAttnProcessor", "Transformer2DModelOutput", "Transformer3DModel", "get_2d_sincos_pos_embed",
           "uvit_skip_plan"]


# --------------------------------------------------------------------------------------------------------------
# Attention processor (spatial + cross attention)
# --------------------------------------------------------------------------------------------------------------
class EasyAnimateAttnProcessor:
    """diffusers ``AttnProcessor2_0`` (the V2 code's processor) with the kernel call routed through
    ``dispatch_attention_fn``, so the backend is selectable. The native backend reproduces ``AttnProcessor2_0`` bit for
    bit: same projections, same mask preparation (``prepare_attention_mask`` then ``(B, heads, Lq|1, Lk)``), same SDPA
    call and layout. Only the options V2's attentions use are supported (no norms, no residual, rescale 1).
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim) for t in (query, key, value))
        # Context parallelism (``enable_parallelism``) applies to self-attention only: the query tokens are split
        # across ranks, the captions of cross-attention are whole on every rank (local attention, no exchange).
        parallel = self._parallel_config if encoder_hidden_states is None else None
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=parallel)
        out = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


# --------------------------------------------------------------------------------------------------------------
# Fixed 2D position table
# --------------------------------------------------------------------------------------------------------------
def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[sin(pos*omega), cos(pos*omega)]`` with ``omega = 1 / 10000**(arange(dim/2) / (dim/2))``, in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(
    embed_dim: int,
    grid_h: int,
    grid_w: int,
    base_size: int,
    interpolation_scale: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """PixArt's 2D sin-cos table for a ``grid_h x grid_w`` token grid, as diffusers 0.27 computed it.

    Each axis is stretched to ``base_size`` units by its own length (``arange(n) / (n / base_size) /
    interpolation_scale``, positions in float32), so any grid covers the same coordinate range as the training grid.
    The first ``embed_dim/2`` channels encode the column (x) coordinate, the last half the row (y); tokens are
    row-major. Returns float32 ``[1, grid_h*grid_w, embed_dim]``.
    """
    if embed_dim % 4:
        raise ValueError(f"the 2D sin-cos position table needs embed_dim divisible by 4, got {embed_dim}")
    ys = torch.arange(grid_h, dtype=torch.float32, device=device) / (grid_h / base_size) / interpolation_scale
    xs = torch.arange(grid_w, dtype=torch.float32, device=device) / (grid_w / base_size) / interpolation_scale
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    table = torch.cat([_sincos_1d(embed_dim // 2, xx.reshape(-1)), _sincos_1d(embed_dim // 2, yy.reshape(-1))], dim=1)
    return table.to(torch.float32).unsqueeze(0)


class FramePatchEmbed(nn.Module):
    """Per-frame patchify + fixed 2D sin-cos PE: ``(N, C, H, W) -> (N, H/p * W/p, D)``.

    Keeps diffusers' ``PatchEmbed`` names (``proj``, non-persistent ``pos_embed``) so checkpoints load, but computes
    the table itself: the numbers must be those of diffusers 0.27, which the V2 weights were trained with.
    Tables for grids other than ``sample_size / p`` are built on first use and cached per (grid, device).
    """

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, embed_dim: int, interpolation_scale: float):
        super().__init__()
        self.patch_size = patch_size
        self.base_size = sample_size // patch_size
        self.interpolation_scale = interpolation_scale
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        table = get_2d_sincos_pos_embed(embed_dim, self.base_size, self.base_size, self.base_size, interpolation_scale)
        self.register_buffer("pos_embed", table, persistent=False)
        self._table_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def _table(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        if (grid_h, grid_w) == (self.base_size, self.base_size):
            return self.pos_embed  # follows .to(device/dtype), as the diffusers buffer did
        key = (grid_h, grid_w, device)
        if key not in self._table_cache:
            if len(self._table_cache) >= 16:  # bucketed training uses a handful of grids; never grow unbounded
                self._table_cache.clear()
            self._table_cache[key] = get_2d_sincos_pos_embed(
                self.pos_embed.shape[-1], grid_h, grid_w, self.base_size, self.interpolation_scale, device=device
            )
        return self._table_cache[key]

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        grid_h, grid_w = frames.shape[-2] // self.patch_size, frames.shape[-1] // self.patch_size
        tokens = self.proj(frames).flatten(2).transpose(1, 2)
        return (tokens + self._table(grid_h, grid_w, tokens.device)).to(tokens.dtype)


# --------------------------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------------------------
class TemporalTransformerBlock(nn.Module):
    """PixArt block (adaLN-single modulation) with a motion module between spatial and cross attention.

    Forward: ``hidden_states (B, F*h*w, D)``, ``encoder_hidden_states (B, L, D_cross)``, ``encoder_attention_mask``
    additive ``(B, 1, L)`` or None, ``timestep`` modulation ``(B, 6*D)``, ``num_frames`` F, ``skip`` the projected
    U-ViT long skip ``(B, F*h*w, D)`` added to the input first (None for blocks without one) → ``(B, F*h*w, D)``.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int,
        motion_module_kwargs: dict[str, Any],
        dropout: float = 0.0,
        activation_fn: str = "gelu-approximate",
        attention_bias: bool = True,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine, eps=norm_eps)
        self.attn1 = Attention(
            query_dim=dim,
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            dropout=dropout,
            bias=attention_bias,
            upcast_attention=upcast_attention,
            processor=EasyAnimateAttnProcessor(),
        )
        self.attn_temporal = VanillaTemporalModule(dim, dropout=dropout, **motion_module_kwargs)
        self.attn2 = Attention(
            query_dim=dim,
            cross_attention_dim=cross_attention_dim,
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            dropout=dropout,
            bias=attention_bias,
            upcast_attention=upcast_attention,
            processor=EasyAnimateAttnProcessor(),
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine, eps=norm_eps)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        timestep: torch.Tensor,
        num_frames: int,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if skip is not None:
            hidden_states = hidden_states + skip
        batch, tokens, dim = hidden_states.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(batch, 6, -1)
        ).chunk(6, dim=1)

        # Spatial self-attention, each frame on its own: fold frames into the batch.
        x = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa
        x = self.attn1(x.reshape(batch * num_frames, tokens // num_frames, dim))
        hidden_states = hidden_states + gate_msa * x.reshape(batch, tokens, dim)

        hidden_states = self.attn_temporal(hidden_states, num_frames)

        # PixArt cross-attention: no norm, no gate.
        hidden_states = hidden_states + self.attn2(
            hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask
        )

        x = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        return hidden_states + gate_mlp * self.ff(x)


def uvit_skip_plan(num_layers: int) -> tuple[int, int]:
    """``(n_skip, first_pop)``: blocks ``[0, n_skip)`` push, blocks ``[first_pop, num_layers)`` pop (LIFO).

    ``n_skip = (num_layers - 2) // 2`` keeps at least two middle blocks without skips, which for 28 layers gives
    V2's hard-coded wiring (13 skips, blocks 13 and 14 in the middle, pops from block 15).
    """
    n_skip = max(num_layers - 2, 0) // 2
    return n_skip, num_layers - n_skip


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
# The block-level caches (First-Block-Cache, MagCache) find blocks through this registry: our block returns one
# tensor (the hidden states) and takes no encoder stream to pass through.
TransformerBlockRegistry.register(
    TemporalTransformerBlock,
    TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
)


class Transformer3DModel(ModelMixin, AttentionMixin, CacheMixin, ConfigMixin):
    r"""EasyAnimate V2 DiT: PixArt-alpha + a motion module in every block + U-ViT long skips.

    Defaults are the released ``EasyAnimateV2-XL-2`` values (1,446,296,864 parameters). The constructor accepts every
    key of the official ``transformer/config.json``; PixArt keys that do not apply to this patch-input model are
    stored but have no effect (marked *unused*). Unsupported variants raise ``ValueError``.

    Args:
        num_attention_heads (`int`, defaults to 16): heads of the spatial and cross attention.
        attention_head_dim (`int`, defaults to 72): width per head; token width ``D = heads * head_dim`` (1152).
        in_channels (`int`, defaults to 4): latent channels C.
        out_channels (`int` or `None`, defaults to 8): output channels (8 = 4 noise + 4 learned-variance);
            None means ``in_channels``.
        num_layers (`int`, defaults to 28): transformer blocks (>= 2 when ``enable_uvit``).
        dropout (`float`, defaults to 0.0): dropout in attention outputs and feed-forwards.
        norm_num_groups (`int`, defaults to 32): *unused* (PixArt continuous-input option).
        cross_attention_dim (`int` or `None`, defaults to 1152): width of the tokens ``attn2`` attends to. With a
            caption projection these are projected captions, so it must equal D (None means D).
        attention_bias (`bool`, defaults to True): bias in the q/k/v Linears of attn1/attn2.
        sample_size (`int`, defaults to 64): training latent size; sets the 2D PE base grid ``sample_size //
            patch_size``, ``interpolation_scale = max(sample_size // 64, 1)``, and, when 128, PixArt's
            resolution/aspect-ratio micro-conditioning.
        num_vector_embeds (`int` or `None`, defaults to None): discrete inputs; only None is supported.
        patch_size (`int`, defaults to 2): spatial patch size p; H and W must be multiples of p.
        activation_fn (`str`, defaults to "gelu-approximate"): activation of the block feed-forward
            (any diffusers ``FeedForward`` activation).
        num_embeds_ada_norm (`int` or `None`, defaults to 1000): *unused* (ada_norm_single embeds any timestep).
        use_linear_projection (`bool`, defaults to False): *unused* (continuous-input option).
        only_cross_attention (`bool`, defaults to False): only False is supported.
        double_self_attention (`bool`, defaults to False): only False is supported.
        upcast_attention (`bool`, defaults to False): compute attn1/attn2 scores in float32.
        norm_type (`str`, defaults to "ada_norm_single"): only "ada_norm_single" (PixArt) is supported.
        norm_elementwise_affine (`bool`, defaults to False): learnable affine in the block LayerNorms.
        norm_eps (`float`, defaults to 1e-6): eps of the block LayerNorms.
        attention_type (`str`, defaults to "default"): only "default" is supported.
        caption_channels (`int` or `None`, defaults to 4096): text-encoder width (T5-XXL); a two-layer GELU-tanh
            projection maps it to D. None: captions are used as given (width ``cross_attention_dim``).
        patch_3d (`bool`, defaults to False): 3D patchify; only False (V2) is supported.
        fake_3d (`bool`, defaults to False): only False (V2) is supported.
        time_patch_size (`int` or `None`, defaults to None): *unused* (belongs to ``patch_3d``).
        basic_block_type (`str`, defaults to "motionmodule"): only "motionmodule" (V2) is supported.
        motion_module_type (`str`, defaults to "Vanilla"): only "Vanilla" (V2) is supported.
        motion_module_kwargs (`dict` or `None`, defaults to the V2 yaml): options of
            :class:`~easyanimate.models.motion_module.VanillaTemporalModule` (8 heads, 1 block, two
            "Temporal_Self" attentions, frame PE with max_len 4096, dim_div 1, block_size 1). Missing keys take the
            V2 values; the resolved dict is what the config records.
        enable_uvit (`bool`, defaults to True): U-ViT long skips (see module docstring).
        time_position_encoding_before_transformer (`bool`, defaults to False): only False (V2) is supported.
        casual_3d (`bool`, defaults to False): only False (V2) is supported.
        casual_3d_upsampler_index (`list` or `None`, defaults to None): *unused* (belongs to ``casual_3d``).

    Forward shapes: ``hidden_states (B, C, F, H, W)`` → ``sample (B, out_channels, F, H, W)``; see :meth:`forward`.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["TemporalTransformerBlock", "FramePatchEmbed"]
    _repeated_blocks: ClassVar[list[str]] = ["TemporalTransformerBlock"]  # regional torch.compile (accel compile=true)
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["pos_embed", "norm", "adaln_single"]
    # diffusers context parallelism (``enable_parallelism(config=ContextParallelConfig(...))``): each rank takes a
    # slice of every frame's spatial tokens (the patch embedding's (B*F, h*w, D) output split on h*w), so a location
    # keeps all its frames on one rank and the motion module's temporal attention stays local; spatial self-attention
    # exchanges through Ulysses/ring; the motion module's GroupNorm reduces its per-frame statistics across ranks
    # (installed by ``enable_parallelism`` below); the head's (B, F, h*w, C) output is gathered on h*w.
    # See easyanimate.parallel.
    _cp_plan: ClassVar[dict[str, Any]] = {
        "pos_embed": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "proj_out": ContextParallelOutput(gather_dim=2, expected_dims=4),
    }

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 64,
        num_vector_embeds: int | None = None,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        attention_type: str = "default",
        caption_channels: int | None = 4096,
        # EasyAnimate additions
        patch_3d: bool = False,
        fake_3d: bool = False,
        time_patch_size: int | None = None,
        basic_block_type: str = "motionmodule",
        motion_module_type: str = "Vanilla",
        motion_module_kwargs: dict[str, Any] | None = None,
        enable_uvit: bool = True,
        time_position_encoding_before_transformer: bool = False,
        casual_3d: bool = False,
        casual_3d_upsampler_index: list[int] | None = None,
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        cross_attention_dim = inner_dim if cross_attention_dim is None else cross_attention_dim
        out_channels = in_channels if out_channels is None else out_channels

        _require(norm_type == "ada_norm_single", "norm_type", "'ada_norm_single' (PixArt adaLN-single)", norm_type)
        _require(num_vector_embeds is None, "num_vector_embeds", "None (continuous latents)", num_vector_embeds)
        _require(not patch_3d, "patch_3d", "False (per-frame 2D patches, as in V2)", patch_3d)
        _require(not fake_3d, "fake_3d", "False (as in V2)", fake_3d)
        _require(not casual_3d, "casual_3d", "False (as in V2)", casual_3d)
        _require(basic_block_type == "motionmodule", "basic_block_type", "'motionmodule' (as in V2)", basic_block_type)
        _require(motion_module_type == "Vanilla", "motion_module_type", "'Vanilla' (as in V2)", motion_module_type)
        _require(
            not time_position_encoding_before_transformer,
            "time_position_encoding_before_transformer",
            "False (as in V2)",
            time_position_encoding_before_transformer,
        )
        _require(attention_type == "default", "attention_type", "'default'", attention_type)
        _require(not only_cross_attention, "only_cross_attention", "False", only_cross_attention)
        _require(not double_self_attention, "double_self_attention", "False", double_self_attention)
        _require(isinstance(sample_size, int) and sample_size > 0, "sample_size", "a positive int", sample_size)
        _require(
            isinstance(patch_size, int) and sample_size % patch_size == 0,
            "patch_size",
            f"an int dividing sample_size={sample_size}",
            patch_size,
        )
        _require(
            num_layers >= (2 if enable_uvit else 1), "num_layers", ">= 2 with enable_uvit (>= 1 without)", num_layers
        )
        if sample_size == 128:
            _require(
                inner_dim % 3 == 0,
                "num_attention_heads * attention_head_dim",
                "divisible by 3 when sample_size == 128 (resolution + aspect-ratio embeddings take D/3 each)",
                inner_dim,
            )
        if caption_channels is not None:
            _require(
                cross_attention_dim == inner_dim,
                "cross_attention_dim",
                f"None or {inner_dim} (= heads * head_dim: attn2 reads projected captions)",
                cross_attention_dim,
            )
        motion_module_kwargs = resolve_motion_module_kwargs(motion_module_kwargs)
        # Record the resolved dict so a saved config is explicit, whatever defaults future code has.
        self.register_to_config(motion_module_kwargs=motion_module_kwargs)

        self.inner_dim = inner_dim
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.use_additional_conditions = sample_size == 128  # PixArt's 1024-px micro-conditioning
        self.gradient_checkpointing = False

        # Registration order = state-dict order of the official checkpoints.
        self.pos_embed = FramePatchEmbed(
            sample_size, patch_size, in_channels, inner_dim, interpolation_scale=max(sample_size // 64, 1)
        )
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(
                inner_dim,
                num_attention_heads,
                attention_head_dim,
                cross_attention_dim=cross_attention_dim,
                motion_module_kwargs=motion_module_kwargs,
                dropout=dropout,
                activation_fn=activation_fn,
                attention_bias=attention_bias,
                upcast_attention=upcast_attention,
                norm_elementwise_affine=norm_elementwise_affine,
                norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        )
        self.num_skips, self.first_pop = uvit_skip_plan(num_layers) if enable_uvit else (0, num_layers)
        if enable_uvit:
            self.long_connect_fc = nn.ModuleList(nn.Linear(inner_dim, inner_dim) for _ in range(self.num_skips))
            for fc in self.long_connect_fc:  # zero: the skips start silent, a PixArt init is unchanged
                nn.init.zeros_(fc.weight)
                nn.init.zeros_(fc.bias)
        else:
            self.long_connect_fc = None

        self.norm_out = nn.LayerNorm(inner_dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, inner_dim) / inner_dim**0.5)
        self.proj_out = nn.Linear(inner_dim, patch_size * patch_size * out_channels)
        self.adaln_single = AdaLayerNormSingle(inner_dim, use_additional_conditions=self.use_additional_conditions)
        self.caption_projection = (
            PixArtAlphaTextProjection(in_features=caption_channels, hidden_size=inner_dim)
            if caption_channels is not None
            else None
        )

    def _resolve_parallel_config(self, config):
        # diffusers 0.42 picks the device as rank % torch.accelerator.device_count(), which divides by zero on a
        # CPU-only host: resolve there with the CPU device (gloo), the rest as diffusers does
        if torch.accelerator.device_count() == 0:
            from easyanimate.parallel import resolve_parallel_config_cpu

            return resolve_parallel_config_cpu(self, config)
        return super()._resolve_parallel_config(config)

    def enable_parallelism(self, *, config, cp_plan=None):
        """diffusers' ``enable_parallelism``, plus the one cross-rank statistic V2 needs under context parallelism:
        the motion modules' GroupNorm (per-frame statistics over all spatial tokens) all-reduces its sums."""
        super().enable_parallelism(config=config, cp_plan=cp_plan)
        if self._parallel_config.context_parallel_config is not None:
            from easyanimate.parallel import install_context_parallel_group_norms

            install_context_parallel_group_norms(self, self._parallel_config.context_parallel_config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor | None] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict noise (and variance) for a batch of latent videos.

        Args:
            hidden_states: latents ``(B, C, F, H, W)``; F >= 1 (1 = an image), H and W multiples of ``patch_size``.
            timestep: diffusion step, ``(B,)`` int or float tensor, a one-element tensor or a Python number
                (broadcast to the batch).
            encoder_hidden_states: caption tokens ``(B, L, caption_channels)`` (T5 output).
            encoder_attention_mask: ``(B, L)`` with 1 = keep, 0 = padding (int, bool or float); turned into the
                additive bias ``(1 - m) * -10000`` in the latent dtype. A ready ``(B, 1, L)`` bias is used as is.
                None = attend to every token.
            added_cond_kwargs: ``{"resolution": (B, 2), "aspect_ratio": (B, 1)}``; required only when
                ``sample_size == 128``, ignored otherwise (the V2 pipeline passes Nones).
            return_dict: return a ``Transformer2DModelOutput`` (else a 1-tuple).

        Returns:
            ``.sample`` of shape ``(B, out_channels, F, H, W)``.
        """
        batch, _, num_frames, height, width = hidden_states.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent height and width must be multiples of patch_size={p}, got {height}x{width}")
        grid_h, grid_w = height // p, width // p

        timestep = _batch_timestep(timestep, batch, hidden_states.device)
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            # Large negative bias rather than -inf: a fully padded row stays finite (and matches V2's numbers).
            bias = (1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0
            encoder_attention_mask = bias.unsqueeze(1)

        # Patchify each frame, then lay tokens out frame-major: (B, F*h*w, D).
        frames = hidden_states.permute(0, 2, 1, 3, 4).reshape(batch * num_frames, -1, height, width)
        # -1, not F*h*w: under context parallelism this rank holds a slice of each frame's tokens (see _cp_plan)
        x = self.pos_embed(frames).reshape(batch, -1, self.inner_dim)

        if self.use_additional_conditions:
            cond = added_cond_kwargs or {}
            if cond.get("resolution") is None or cond.get("aspect_ratio") is None:
                raise ValueError(
                    "sample_size == 128 enables resolution/aspect-ratio conditioning: pass added_cond_kwargs="
                    "{'resolution': (B, 2), 'aspect_ratio': (B, 1)}"
                )
            cond = {"resolution": cond["resolution"], "aspect_ratio": cond["aspect_ratio"]}
        else:
            cond = None
        modulation, embedded_timestep = self.adaln_single(
            timestep, cond, batch_size=batch, hidden_dtype=hidden_states.dtype
        )

        if self.caption_projection is not None:
            encoder_hidden_states = self.caption_projection(encoder_hidden_states)
            encoder_hidden_states = encoder_hidden_states.view(batch, -1, self.inner_dim)

        skips: list[torch.Tensor] = []
        for index, block in enumerate(self.transformer_blocks):
            # The long skip is added inside the block (see the module docstring: step caches skip whole blocks).
            skip = self.long_connect_fc[index - self.first_pop](skips.pop()) if index >= self.first_pop else None
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(
                    block, x, encoder_hidden_states, encoder_attention_mask, modulation, num_frames, skip
                )
            else:
                x = block(x, encoder_hidden_states, encoder_attention_mask, modulation, num_frames, skip)
            if index < self.num_skips:
                skips.append(x)

        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale) + shift
        # (B, F, tokens per frame, D) so a context-parallel gather joins each frame's slices (same numbers otherwise)
        x = self.proj_out(x.reshape(batch, num_frames, -1, x.shape[-1]))

        # Unpatchify: (B, F*h*w, p*p*C) -> (B, C, F, h*p, w*p).
        x = x.reshape(batch, num_frames, grid_h, grid_w, p, p, self.out_channels)
        x = torch.einsum("nfhwpqc->ncfhpwq", x)
        sample = x.reshape(batch, self.out_channels, num_frames, height, width)

        if not return_dict:
            return (sample,)
        return Transformer2DModelOutput(sample=sample)


def _require(ok: bool, name: str, supported: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"Transformer3DModel: {name} must be {supported}; got {got!r}")


def _batch_timestep(timestep: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Any scalar / 0-d / (1,) / (B,) timestep → a ``(B,)`` tensor."""
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], device=device)
    timestep = timestep.to(device).reshape(-1)
    if timestep.shape[0] == 1 and batch != 1:
        timestep = timestep.expand(batch)
    if timestep.shape[0] != batch:
        raise ValueError(f"timestep must have 1 or {batch} (batch) elements, got {timestep.shape[0]}")
    return timestep

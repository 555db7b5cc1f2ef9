"""Discriminators of VAE training (V2: a 2D PatchGAN on frames and a 3D discriminator on clips), our own code.

Both return patch logits (no sigmoid) for the hinge losses in :mod:`easyanimate.train.losses`. Inputs are in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def _init_gan_weights(module: nn.Module) -> None:
    """DCGAN/pix2pix init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator2D(nn.Module):
    """PatchGAN (pix2pix ``NLayerDiscriminator``) applied to every frame.

    Args:
        in_channels (`int`, defaults to 3): image channels.
        base_channels (`int`, defaults to 64): width of the first conv; doubles per layer, capped at 8×.
        n_layers (`int`, defaults to 3): stride-2 convs after the first (V2: 3).

    ``forward(x)``: frames ``[N, C, H, W]`` or clips ``[B, C, T, H, W]`` (each frame scored) → logits
    ``[N or B·T, 1, h, w]``; for ``H = W = 64`` and 3 layers, ``h = w = 6`` (4×4 kernels, stride 2, 2, 2, 1, 1).
    Needs ``H, W >= 2**(n_layers+1)`` or so; BatchNorm after every conv but the first and the last.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(base_channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_gan_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5:
            x = x.transpose(1, 2).flatten(0, 1)
        return self.main(x)


class _DownBlock3D(nn.Module):
    """Residual block that halves T (when > 1), H and W: ``LReLU(GN(conv3)) → stride-2 conv3`` + avg-pooled 1×1×1
    shortcut."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, in_ch, 3, 1, 1)
        self.norm1 = nn.GroupNorm(min(32, in_ch), in_ch)
        self.conv2 = nn.Conv3d(in_ch, out_ch, 3, 1, 1)
        self.norm2 = nn.GroupNorm(min(32, out_ch), out_ch)
        self.skip = nn.Conv3d(in_ch, out_ch, 1, bias=False)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pool T only when there are frames to pool (images arrive as 1-frame clips)
        kernel = (2 if x.shape[2] > 1 else 1, 2, 2)
        pool = nn.functional.avg_pool3d
        h = self.act(self.norm1(self.conv1(x)))
        h = self.act(self.norm2(self.conv2(pool(h, kernel, kernel, ceil_mode=True))))
        return (h + self.skip(pool(x, kernel, kernel, ceil_mode=True))) / 2**0.5


class Discriminator3D(nn.Module):
    """3D (spatio-temporal) patch discriminator on clips, widths ``channels`` (V2: 64, 128, 256).

    Args:
        in_channels (`int`, defaults to 3): video channels.
        channels (`Sequence[int]`, defaults to (64, 128, 256)): ``conv_in`` width, then one down block per further
            entry (each halves T — ceil, T=1 stays 1 — and H, W).

    ``forward(x)``: clips ``[B, C, T, H, W]`` → logits ``[B, 1, T', H', W']``; for 9×64×64 and the default widths
    ``T' = 3, H' = W' = 16``.
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (64, 128, 256)) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels:
            raise ValueError("Discriminator3D needs at least one width in channels")
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, 1, 1)
        self.blocks = nn.ModuleList(_DownBlock3D(a, b) for a, b in zip(channels[:-1], channels[1:], strict=True))
        self.conv_out = nn.Conv3d(channels[-1], 1, 3, 1, 1)
        self.act = nn.LeakyReLU(0.2)
        self.apply(_init_gan_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"Discriminator3D expects clips [B, C, T, H, W], got shape {tuple(x.shape)}")
        h = self.act(self.conv_in(x))
        for block in self.blocks:
            h = block(h)
        return self.conv_out(h)

"""VAE training losses and reconstruction metrics (EasyAnimate V2 MagViT recipe, in our own code).

Loss of the autoencoder for a clip ``x`` and its reconstruction ``y`` (both ``[B, C, T, H, W]`` in [-1, 1]):

    rec   = l1_weight · mean|x − y| + l2_weight · mean (x − y)² + perceptual_weight · mean_frames LPIPS(x_t, y_t)
    kl    = Σ_latent KL(q(z|x) ‖ N(0, I)) / (pixels per sample)                 (per sample, then batch mean)
    total = rec + kl_weight · kl + d_weight · (g_2d + g_3d)                        (GAN part only after disc_start)

Everything is divided by the number of pixels of a sample, so the *relative* weights are V2's (whose loss sums the
per-pixel terms and the latent KL per sample) while the logged numbers stay readable (an L1 of 0.05 reads as one).
V2's NLL carries a learned scalar ``logvar`` (``rec / exp(logvar) + logvar``); we use ``logvar ≡ 0``, i.e. the plain
weighted reconstruction: it keeps the loss interpretable and a log-variance that drifts only rescales the AE loss,
which Adam and the adaptive GAN weight (a ratio of gradient norms) largely absorb.

GAN: hinge losses, ``d = ½(mean relu(1 − D(x)) + mean relu(1 + D(y)))`` for the discriminators and ``g = −mean D(y)``
for the generator; the generator weight is adaptive (:func:`adaptive_weight`).

Metrics: :func:`psnr` and :func:`ssim` take frames in **[-1, 1]** (the model's range; mapped to [0, 1] and clamped
inside), per frame, averaged over frames.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

PSNR_CAP = 100.0  # dB reported for identical frames (keeps logs finite and JSON-valid)


# --- reconstruction / KL ----------------------------------------------------------------------------------------------


def reconstruction_loss(target: torch.Tensor, recon: torch.Tensor, l1_weight: float = 1.0,
                        l2_weight: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weighted, l1, l2)``: per-pixel mean L1 and L2 of ``recon`` against ``target`` (any equal shapes).

    ``weighted = l1_weight · l1 + l2_weight · l2`` (V2: 1.0 and 0.1). Computed in float32.
    """
    if target.shape != recon.shape:
        raise ValueError(f"target and recon must have equal shapes, got {tuple(target.shape)} and {tuple(recon.shape)}")
    diff = recon.float() - target.float()
    l1 = diff.abs().mean()
    l2 = diff.pow(2).mean()
    return l1_weight * l1 + l2_weight * l2, l1, l2


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, pixels_per_sample: int) -> torch.Tensor:
    """KL of ``N(mean, exp(logvar))`` to ``N(0, I)``, summed over a sample's latent, divided by ``pixels_per_sample``,
    averaged over the batch (dim 0). ``mean``/``logvar``: ``[B, C, T', h, w]`` (a ``DiagonalGaussianDistribution``'s
    ``.mean``/``.logvar``; its own ``.kl()`` sums over dims 1-3 only, wrong for 5-D latents)."""
    logvar = logvar.float().clamp(-30.0, 20.0)
    kl = 0.5 * (mean.float().pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean() / float(pixels_per_sample)


# --- GAN --------------------------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0 when real logits ≥ 1 and fake logits ≤ −1; 1 at chance (all logits 0)."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss: ``−mean D(fake)`` (lower when the discriminator calls the fakes real)."""
    return -logits_fake.float().mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 0.5, max_weight: float = 1e4) -> torch.Tensor:
    """``disc_weight · ‖∇_W rec‖ / (‖∇_W g‖ + 1e-4)`` at ``last_layer`` (the decoder's last conv weight), clamped to
    ``[0, max_weight]`` and detached: the GAN gradient reaching the decoder is kept at a fixed fraction of the
    reconstruction gradient, whatever the two losses' scales. Both losses must depend on ``last_layer``."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return (weight.clamp(0.0, max_weight) * disc_weight).detach()


# --- perceptual (LPIPS-style, local weights only) ---------------------------------------------------------------------

# VGG16 ``features`` convolution widths ("M" = 2x2 max-pool); indices of the built Sequential equal torchvision's.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # features indices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class PerceptualLoss(nn.Module):
    """LPIPS (VGG16 variant) with weights from a local safetensors file; never downloads.

    Accepted layout (one ``.safetensors`` file, or a folder holding exactly one): the VGG16 convolutions under
    torchvision's names ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}`` and the five LPIPS linear
    heads as ``lin{0..4}.model.1.weight`` (shape ``[1, C, 1, 1]``, the ``lpips`` package's names) or
    ``lin{0..4}.weight``. A ``net.`` / ``perceptual_loss.`` prefix on the feature keys is stripped. Pickle files
    (``.pth``) are refused: convert them once with ``safetensors.torch.save_file``.

    ``forward(x, y)``: frames ``[N, 3, H, W]`` (or clips ``[B, 3, T, H, W]``, scored per frame) in [-1, 1] → ``[N]``
    distances (0 for identical inputs). Parameters are frozen; the module stays in eval mode.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        from safetensors.torch import load_file

        file = self._find(Path(path))
        state = load_file(str(file))
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = int(v)
        self.features = nn.Sequential(*layers[: _LPIPS_TAPS[-1] + 1])
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self._load(state, file)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _find(path: Path) -> Path:
        if not path.exists():
            raise FileNotFoundError(
                f"perceptual_model {str(path)!r} does not exist; expected a local LPIPS-VGG16 .safetensors file "
                "(VGG16 'features.*' + 'lin{0..4}.model.1.weight'); none ships offline - set "
                "train.vae.perceptual_weight=0 to train without it")
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise FileNotFoundError(f"perceptual_model folder {str(path)!r} must hold exactly one .safetensors "
                                        f"file, found {[f.name for f in files]}")
            return files[0]
        if path.suffix != ".safetensors":
            raise ValueError(f"perceptual_model must be a .safetensors file (no pickles), got {path.name!r}")
        return path

    def _load(self, state: dict[str, torch.Tensor], file: Path) -> None:
        own: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            for prefix in ("perceptual_loss.", "net."):
                if key.startswith(prefix):
                    key = key[len(prefix):]
            if key.startswith("features."):
                own[key] = value
            elif key.startswith("lin"):
                head, _, rest = key.partition(".")
                own[f"lins.{head[3:]}.weight"] = value if rest in ("weight", "model.1.weight") else None
        own = {k: v for k, v in own.items() if v is not None}
        wanted = set(self.state_dict())
        missing = sorted(wanted - set(own))
        if missing:
            raise ValueError(f"perceptual weights {file} lack {len(missing)} tensors (e.g. {missing[:4]}); expected "
                             "VGG16 'features.N.weight/bias' and 'lin0..4.model.1.weight'")
        self.load_state_dict({k: own[k] for k in wanted})

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = _frames(x), _frames(y)
        dtype = self.shift.dtype
        h = torch.cat([x, y]).to(dtype)
        h = (h - self.shift) / self.scale
        total = torch.zeros(x.shape[0], device=x.device, dtype=dtype)
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == _LPIPS_TAPS[tap]:
                fx, fy = h.chunk(2)
                fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[tap]((fx - fy).pow(2)).mean(dim=(1, 2, 3))
                tap += 1
        return total

    def train(self, mode: bool = True) -> PerceptualLoss:  # frozen network: always eval
        return super().train(False)


# --- metrics ----------------------------------------------------------------------------------------------------------


def _frames(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, H, W]`` → ``[B·T, C, H, W]``; ``[N, C, H, W]`` as is."""
    if x.ndim == 5:
        return x.transpose(1, 2).flatten(0, 1)
    if x.ndim == 4:
        return x
    raise ValueError(f"expected frames [N, C, H, W] or clips [B, C, T, H, W], got shape {tuple(x.shape)}")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((_frames(x).float() + 1.0) * 0.5).clamp(0.0, 1.0)


@torch.no_grad()
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-frame PSNR (dB) of two equal-shaped frame/clip tensors in [-1, 1] (peak = the [0, 1] range);
    identical frames score :data:`PSNR_CAP`."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (_unit(a) - _unit(b)).pow(2).flatten(1).mean(1)
    per_frame = (10.0 * torch.log10(1.0 / mse.clamp_min(1e-30))).clamp(max=PSNR_CAP)
    return float(per_frame.mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


@torch.no_grad()
def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean per-frame SSIM (Wang et al. 2004: 11×11 Gaussian window σ 1.5, K1 0.01, K2 0.03, 'valid' filtering, per
    channel then averaged) of two equal-shaped frame/clip tensors in [-1, 1]; 1.0 for identical frames.

    Frames smaller than the window use a window of their smaller side (odd)."""
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    x, y = _unit(a), _unit(b)
    n, c, h, w = x.shape
    size = min(window, h, w)
    size -= 1 - size % 2
    kernel = _gaussian_window(size, sigma).to(x.device).expand(c, 1, size, size).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.flatten(1).mean(1).mean())

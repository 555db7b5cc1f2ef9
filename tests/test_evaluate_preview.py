"""The animated previews logged beside the sample MP4s (MLflow's artifact viewer shows a GIF inline, at a visible
size, where it cannot play an MP4)."""

import io

import numpy as np
from PIL import Image, ImageSequence

from easyanimate.evaluate import preview_gif


def test_preview_gif_loops_upscaled_with_every_frame():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 64, 48, 3), dtype=np.uint8)
    frames[:, :, :, :] = (frames // 64) * 64  # few colours: the GIF palette keeps them exactly
    gif = Image.open(io.BytesIO(preview_gif(frames, fps=8)))
    assert gif.format == "GIF" and gif.info["loop"] == 0 and gif.info["duration"] in (120, 130)  # GIF counts in 10 ms
    assert gif.size == (48 * 6, 64 * 6)  # the short side reaches 256 px by a whole factor (48 → 288)
    decoded = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
    assert len(decoded) == 5
    for got, want in zip(decoded, frames, strict=True):
        assert np.array_equal(got[::6, ::6], want), "nearest upscaling keeps every source pixel"

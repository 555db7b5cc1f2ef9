"""Video and image I/O with PyAV: H.264 MP4 (yuv420p), PNG for single frames, MP4 bytes in memory, frame reading.

Frames travel as ``uint8`` arrays ``(F, H, W, 3)``; ``to_uint8_frames`` converts the pipeline's float tensors.
Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from .fsutil import atomic_write_bytes


def to_uint8_frames(video) -> np.ndarray:
    """``(C,F,H,W)`` / ``(F,H,W,C)`` float in [0,1] (tensor or array) or uint8 ``(F,H,W,3)`` → uint8 ``(F,H,W,3)``."""
    if isinstance(video, torch.Tensor):
        video = video.detach().float().cpu()
        if video.ndim == 4 and video.shape[0] in (1, 3) and video.shape[-1] not in (1, 3):
            video = video.permute(1, 2, 3, 0)  # (C,F,H,W) -> (F,H,W,C)
        video = video.numpy()
    arr = np.asarray(video)
    if arr.ndim == 3:  # one image (H,W,C)
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected frames shaped (F,H,W,3) or (C,F,H,W), got {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


def _encode_mp4(frames: np.ndarray, target, fps: int, crf: int) -> None:
    frames = to_uint8_frames(frames)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even height and width, got {h}x{w}")
    with av.open(target, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # threads=1 keeps the bitstream identical run to run (same seed -> same bytes)
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_to_mp4_bytes(frames, fps: int = 24, crf: int = 18) -> bytes:
    """Encode frames to an H.264 MP4 in memory."""
    buf = io.BytesIO()
    _encode_mp4(frames, buf, fps, crf)
    return buf.getvalue()


def image_to_png_bytes(frame) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(to_uint8_frames(frame)[0]).save(buf, format="PNG")
    return buf.getvalue()


def encode_media(frames, fps: int = 24) -> tuple[bytes, str]:
    """(bytes, suffix): PNG for one frame, MP4 otherwise (V2 saves single frames as images)."""
    frames = to_uint8_frames(frames)
    if frames.shape[0] == 1:
        return image_to_png_bytes(frames), ".png"
    return video_to_mp4_bytes(frames, fps), ".mp4"


def write_video(path: str | Path, frames, fps: int = 24) -> Path:
    """Write an MP4 (or a PNG when ``path`` ends in .png and there is one frame), atomically."""
    path = Path(path)
    frames = to_uint8_frames(frames)
    if path.suffix.lower() == ".png":
        if frames.shape[0] != 1:
            raise ValueError(f"a .png holds one frame, got {frames.shape[0]}; use an .mp4 path")
        return atomic_write_bytes(path, image_to_png_bytes(frames))
    return atomic_write_bytes(path, video_to_mp4_bytes(frames, fps))


def read_video(source, max_frames: int | None = None, start: int = 0, step: int = 1) -> np.ndarray:
    """Decode frames ``start, start+step, …`` of any container PyAV opens (path or bytes) → uint8 ``(F,H,W,3)``."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    out = []
    with av.open(source if not isinstance(source, Path) else str(source)) as container:
        if not container.streams.video:
            raise ValueError(f"{source}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i < start or (i - start) % step:
                continue
            out.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(out) >= max_frames:
                break
    if not out:
        raise ValueError(f"{source}: no frames decoded")
    return np.stack(out)


def probe_video(source) -> dict:
    """Width, height, fps and frame count of a video (frame count decoded when the container does not say)."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    with av.open(source if not isinstance(source, Path) else str(source)) as container:
        stream = container.streams.video[0]
        frames = stream.frames or sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate or 0
        return {"width": stream.width, "height": stream.height, "fps": float(rate), "num_frames": int(frames)}

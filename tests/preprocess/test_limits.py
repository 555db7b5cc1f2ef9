"""Limits before work: decoded-pixel caps on images and video frames, checked from the header before decoding."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from easyanimate.preprocess.filters import PixelLimitError, load_image

REPO = Path(__file__).resolve().parents[2]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bomb_png(path: Path, side: int = 12000) -> Path:
    """A valid grey PNG of ``side × side`` pixels (12000² = 144 MP) streamed row by row: ~150 KB on disk, never held
    decoded in this process."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte 0 + one zero byte per pixel
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def test_load_image_refuses_past_the_cap_from_the_header(tmp_path):
    bomb = write_bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(PixelLimitError, match=r"12000x12000 = 144,000,000 pixels; the decoded-pixel cap is 40,000,000"):
        load_image(bomb)
    from PIL import Image

    small = tmp_path / "small.png"
    Image.fromarray(np.full((20, 30, 3), 7, np.uint8)).save(small)
    assert load_image(small, max_pixels=600).shape == (20, 30, 3)  # exactly at the cap: fine
    with pytest.raises(PixelLimitError, match="30x20"):
        load_image(small, max_pixels=599)
    with pytest.raises(PixelLimitError, match="decompression-bomb guard"):
        load_image(bomb, max_pixels=0)  # our cap off: PIL's own guard (a warning past 89 MP) is an error here


def test_preprocess_rejects_a_144_megapixel_png_under_500_mb_rss(tmp_path):
    """``easyanimate preprocess`` in a child that reports its own peak RSS (VmHWM) after the run."""
    raw = tmp_path / "raw"
    raw.mkdir()
    write_bomb_png(raw / "bomb.png")
    (raw / "bomb.txt").write_text("a grey square")
    code = ("import sys, runpy; sys.argv = ['easyanimate', 'preprocess', sys.argv[1], '--output', "
            "sys.argv[2], '--preset', 'tiny', '--workers', '1']\n"
            "try:\n    runpy.run_module('easyanimate', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            # VmHWM: this process image's peak RSS (ru_maxrss would carry the forking pytest's over the exec)
            "print('MAXRSS_KB', [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code, str(raw), str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_kb = int(done.stdout.split("MAXRSS_KB")[-1].split()[0])
    assert peak_kb < 500 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB while rejecting a 144 MP PNG"
    rejects = (tmp_path / "out" / "rejects.csv").read_text()
    assert "bomb.png" in rejects and "pixels" in rejects and "144,000,000 pixels" in rejects, rejects
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == []


def test_video_frames_past_the_frame_cap_are_refused_before_decoding(tmp_path):
    from easyanimate.config import load_config
    from easyanimate.preprocess.run import run_preprocess
    from easyanimate.video import write_video

    raw = tmp_path / "raw"
    raw.mkdir()
    write_video(raw / "clip.mp4", np.zeros((9, 64, 96, 3), np.uint8), fps=8)
    (raw / "clip.txt").write_text("a black screen")
    cfg = load_config("tiny", ["preprocess.max_frame_pixels=6000", "preprocess.workers=1"]).preprocess
    run_preprocess(raw, tmp_path / "out", cfg)
    rejects = (tmp_path / "out" / "rejects.csv").read_text()
    assert "clip.mp4" in rejects and "video frame is 96x64 = 6,144 pixels; the decoded-pixel cap is 6,000" in rejects, rejects

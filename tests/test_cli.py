import json
import os
import subprocess
import sys
from pathlib import Path

from easyanimate.video import probe_video, read_video

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "easyanimate", *args], capture_output=True, text=True, env=env,
                          check=check, cwd=ROOT)


def test_generate_tiny_writes_a_readable_mp4(tmp_path):
    out = tmp_path / "kite.mp4"
    res = _cli("generate", "--model", "tiny", "--prompt", "a red kite", "--frames", "9", "--height", "64",
               "--width", "80", "--steps", "2", "--seed", "7", "--sampler", "Euler A", "--out", str(out))
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["frames"] == 9 and Path(info["out"]) == out
    frames = read_video(out)
    assert frames.shape == (9, 64, 80, 3)
    assert probe_video(out)["fps"] == 24


def test_generate_image(tmp_path):
    _cli("generate", "--model", "tiny", "--frames", "1", "--steps", "1", "--out", str(tmp_path / "img.mp4"))
    assert read_video(tmp_path / "img.png").shape == (1, 64, 64, 3)


def test_generate_rejects_bad_frames_clearly(tmp_path):
    res = _cli("generate", "--model", "tiny", "--frames", "10", "--steps", "1", "--out", str(tmp_path / "x.mp4"),
               check=False)
    assert res.returncode != 0
    assert "multiple of 9" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_config_command_with_overrides():
    res = _cli("config", "--preset", "tiny", "--set", "generate.steps=3", "--format", "json")
    assert json.loads(res.stdout)["generate"]["steps"] == 3
    bad = _cli("config", "--set", "generate.nope=1", check=False)
    assert bad.returncode != 0 and "generate.nope" in bad.stderr

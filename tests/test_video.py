import numpy as np
import pytest
import torch

from easyanimate.video import encode_media, probe_video, read_video, to_uint8_frames, video_to_mp4_bytes, write_video


def _frames(n=9, h=48, w=64):
    t = np.linspace(0, 1, n)[:, None, None, None]
    y = np.linspace(0, 1, h)[None, :, None, None]
    x = np.linspace(0, 1, w)[None, None, :, None]
    return np.concatenate([np.broadcast_to(t, (n, h, w, 1)), np.broadcast_to(y, (n, h, w, 1)),
                           np.broadcast_to(x, (n, h, w, 1))], axis=-1).astype(np.float32)


def test_mp4_round_trip(tmp_path):
    frames = _frames()
    path = write_video(tmp_path / "a.mp4", torch.from_numpy(frames).permute(3, 0, 1, 2), fps=12)
    back = read_video(path)
    assert back.shape == (9, 48, 64, 3) and back.dtype == np.uint8
    # lossy, but a smooth gradient survives H.264 closely
    assert np.abs(back.astype(float) - to_uint8_frames(frames).astype(float)).mean() < 4
    info = probe_video(path)
    assert (info["width"], info["height"], info["num_frames"]) == (64, 48, 9)
    assert info["fps"] == pytest.approx(12)


def test_mp4_bytes_deterministic_and_decodable():
    frames = _frames()
    a, b = video_to_mp4_bytes(frames, fps=24), video_to_mp4_bytes(frames, fps=24)
    assert a == b
    assert read_video(a).shape == (9, 48, 64, 3)


def test_single_frame_is_png(tmp_path):
    data, suffix = encode_media(_frames(1))
    assert suffix == ".png" and data[:8] == b"\x89PNG\r\n\x1a\n"
    path = write_video(tmp_path / "img.png", _frames(1))
    assert read_video(path).shape == (1, 48, 64, 3)


def test_bad_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="expected frames shaped"):
        to_uint8_frames(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="even height and width"):
        video_to_mp4_bytes(np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="one frame"):
        write_video(tmp_path / "x.png", _frames(2))


def test_no_partial_file_on_error(tmp_path):
    with pytest.raises(ValueError):
        write_video(tmp_path / "bad.mp4", np.zeros((2, 15, 16, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []

"""The similarity measure behind "does the model show what it was trained on" (easyanimate.evaluate): scene
features, the own-clip ranking, its metrics and the labelled side-by-side sheet."""

from __future__ import annotations

import numpy as np
import pytest

from easyanimate.evaluate import (
    own_clip_ranks,
    scene_features,
    side_by_side,
    similarity_matrix,
    similarity_metrics,
)


def _scene(kind: int, frames: int = 9, size: int = 32, seed: int = 0) -> np.ndarray:
    """A small synthetic clip: a coloured blob on a coloured background, drifting, plus a little noise."""
    rng = np.random.default_rng(seed)
    palette = [((30, 120, 40), (220, 60, 40)), ((20, 20, 90), (240, 240, 200)), ((200, 170, 120), (60, 40, 30)),
               ((120, 160, 220), (250, 250, 250)), ((90, 90, 90), (250, 200, 0))]
    back, fore = palette[kind % len(palette)]
    cy, cx = [(8, 8), (24, 20), (16, 26), (10, 22), (22, 8)][kind % 5]
    yy, xx = np.mgrid[:size, :size]
    video = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        blob = ((yy - cy) ** 2 + (xx - cx - f // 3) ** 2) < 40
        img = np.where(blob[..., None], np.array(fore), np.array(back)).astype(np.float64)
        video[f] = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return video


def test_scene_features_ignore_brightness_and_contrast_but_not_layout():
    clip = _scene(0)
    f = scene_features(clip)
    assert f.shape == (8 * 8 * 3,) and abs(np.linalg.norm(f) - 1) < 1e-9
    brighter = np.clip(clip.astype(np.float64) * 0.6 + 60, 0, 255).astype(np.uint8)
    assert f @ scene_features(brighter) > 0.99
    mirrored = clip[:, :, ::-1]  # same colours, other layout
    assert f @ scene_features(mirrored) < 0.9
    assert not scene_features(np.full((3, 16, 16, 3), 77, np.uint8)).any()  # a flat video has no layout


def test_identical_clips_rank_first():
    clips = [_scene(k) for k in range(5)]
    generated = [_scene(k, seed=100 + k) for k in range(5)]  # the same scenes, other noise
    sim = similarity_matrix(generated, clips)
    assert sim.shape == (5, 5)
    ranks = own_clip_ranks(sim, [[k] for k in range(5)])
    assert [r["rank"] for r in ranks] == [1] * 5, sim
    assert all(r["own"] > 0.95 and r["own"] > r["other"] for r in ranks)
    m = similarity_metrics(ranks)
    assert m["similarity_rank1_frac"] == 1.0 and m["similarity_prompts"] == 5.0
    assert m["similarity_margin"] > 0 and m["similarity_own"] > m["similarity_other"]


def test_a_shuffled_clip_does_not_rank_first():
    clips = [_scene(k) for k in range(5)]
    # the generated videos handed to the wrong captions (a derangement): no prompt's own clip looks most alike
    generated = [_scene(k, seed=50 + k) for k in (1, 2, 3, 4, 0)]
    ranks = own_clip_ranks(similarity_matrix(generated, clips), [[k] for k in range(5)])
    assert all(r["rank"] > 1 for r in ranks), ranks
    assert similarity_metrics(ranks)["similarity_rank1_frac"] == 0.0
    # one video shuffled into another caption's place: only that prompt loses its first rank
    generated = [_scene(k, seed=50 + k) for k in range(5)]
    generated[2] = _scene(4, seed=9)
    ranks = own_clip_ranks(similarity_matrix(generated, clips), [[k] for k in range(5)])
    assert [r["rank"] == 1 for r in ranks] == [True, True, False, True, True]
    assert similarity_metrics(ranks)["similarity_rank1_frac"] == pytest.approx(0.8)


def test_several_own_clips_count_their_best_and_a_row_needs_one():
    sim = np.array([[0.2, 0.9, 0.5], [0.1, 0.3, 0.6]])
    ranks = own_clip_ranks(sim, [[0, 1], [0]])
    assert ranks[0] == {"own": 0.9, "own_index": 1, "other": 0.5, "other_index": 2, "rank": 1}
    assert ranks[1]["rank"] == 3 and ranks[1]["other_index"] == 2  # both other clips look more alike
    with pytest.raises(ValueError, match="no own clip"):
        own_clip_ranks(sim, [[], [0]])


def test_side_by_side_is_labelled_rows_of_frames():
    clip, gen = _scene(0, size=16), _scene(1, size=32)
    sheet = side_by_side([("training clip", clip), ("generated", gen), ("image", clip[:1])], ["title line"],
                         columns=4, scale=2)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3
    # label column + 4 tiles of 16*2 px (the first row sets the size) with the contact sheet's 2-px gaps, doubled
    assert sheet.shape[1] == 150 + (4 * 16 + 3 * 2) * 2 + 4
    assert sheet.shape[0] > 3 * 32
    assert (sheet[:18, :150] < 128).any()  # the title is drawn
    with pytest.raises(ValueError, match="at least one"):
        side_by_side([], ["t"])

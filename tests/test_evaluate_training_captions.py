"""``evaluate`` on prompts that are training captions: the similarity ranking of each generated video against every
clip of the data (metrics, ``similarity.csv``) and the labelled side-by-side sheets, end to end on a tiny pipeline.

The clips are the tiny VAE's decodings of four distinct smooth latent videos (so the decoder can produce each one
exactly). The pipeline is untrained: these tests check what the evaluation writes and that the table, the metrics and
the sheets agree, not that the model learned (a briefly trained tiny DiT does not yet reproduce its clips; see the
README's demo section).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from easyanimate.config import load_config
from easyanimate.evaluate import SIDE_BY_SIDE_DIR, SIMILARITY_FILE, evaluate
from easyanimate.video import to_uint8_frames, write_video

CAPTIONS = (
    "In this video, warm light sweeps from left to right across a quiet room.",
    "A deep blue sky over a dark harbour, with a bright pier in the foreground.",
    "In this video, a green field rolls towards a line of tall trees under grey clouds.",
    "A close-up of a copper kettle on a stove, steam rising in front of a tiled wall.",
)


def _latents() -> torch.Tensor:
    """Four smooth (scaled) latent videos (4 channels, 3 frames, 8x8): ramps in four directions, drifting."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    videos = []
    for k in range(len(CAPTIONS)):
        ramp = math.cos(k * math.pi / 2) * xx + math.sin(k * math.pi / 2) * yy
        chans = torch.stack([ramp * 1.5, -ramp * 1.5, torch.full_like(ramp, (k - 1.5) * 0.6), ramp * (-1) ** k])
        videos.append(torch.stack([chans + 0.2 * f * ramp for f in range(3)], dim=1))
    return torch.stack(videos)


def _write_clips(pipe, z: torch.Tensor, folder: Path) -> Path:
    """The decoded clips as 12-frame MP4s (the dataset reads the middle 80 %: 9 frames) + meta.json."""
    with torch.no_grad():
        videos = pipe.vae.decode_chunked(z / pipe.vae.config.scaling_factor).float()
    entries = []
    for k, (video, caption) in enumerate(zip(videos, CAPTIONS, strict=True)):
        frames = to_uint8_frames((video + 1) / 2)
        frames = np.concatenate([frames[:1], frames[:1], frames, frames[-1:]])
        write_video(folder / f"clip-{k}.mp4", frames, fps=8)
        entries.append({"file_path": f"clip-{k}.mp4", "text": caption, "type": "video", "width": 64, "height": 64,
                        "num_frames": len(frames)})
    meta = folder / "meta.json"
    meta.write_text(json.dumps(entries, indent=1))
    return meta


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from easyanimate.pipeline import build_pipeline

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("learns")
    cfg = load_config("tiny", ["data.enable_bucket=false", "data.validation_count=0", "data.random_frame_crop=false",
                               "evaluate.steps=10", "evaluate.guidance_scale=4.0",
                               "evaluate.prompts=" + json.dumps(list(CAPTIONS) + ["a prompt no clip has"])])
    pipe = build_pipeline(cfg.model, sampler="DPM++")
    pipe.set_progress_bar_config(disable=True)
    z = _latents()
    meta = _write_clips(pipe, z, root / "data")
    folder = pipe.save_pretrained(root / "pipeline")
    return cfg, root / "eval", evaluate(cfg, folder, meta, root / "eval")


def test_training_captions_are_ranked_against_every_clip(evaluated):
    cfg, out, result = evaluated
    assert result["similarity_prompts"] == len(CAPTIONS)  # the prompt no clip has is not ranked
    assert 0 <= result["similarity_rank1_frac"] <= 1 and -1 <= result["similarity_own"] <= 1
    assert result["similarity_margin"] == pytest.approx(result["similarity_own"] - result["similarity_other"])
    assert 0 < result["accel_psnr"] <= 100  # accel=default against exact, same seeds
    on_file = json.loads((out / "metrics.json").read_text())
    assert {k: on_file[k] for k in on_file if k.startswith("similarity_")} == {
        k: result[k] for k in result if k.startswith("similarity_")}


def test_similarity_table_and_side_by_side_sheets(evaluated):
    from PIL import Image

    cfg, out, result = evaluated
    with (out / SIMILARITY_FILE).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(CAPTIONS) * len(CAPTIONS)  # prompt x clip
    for k in range(len(CAPTIONS)):
        mine = [r for r in rows if r["prompt_index"] == str(k)]
        own = [r for r in mine if r["own_clip"] == "1"]
        assert [r["clip"] for r in own] == [f"clip-{k}.mp4"] and own[0]["prompt"] == CAPTIONS[k]
        higher = sum(float(r["similarity"]) > float(own[0]["similarity"]) for r in mine)
        assert own[0]["rank_of_own"] == str(1 + higher)  # the rank is the table's own ordering
    sheets = sorted((out / SIDE_BY_SIDE_DIR).glob("*.png"))
    assert [p.name for p in sheets] == [f"prompt-{k:02d}.png" for k in range(len(CAPTIONS))]
    assert result["side_by_side"] == [str(p) for p in sheets]
    ranks = [r for r in rows if r["own_clip"] == "1"]
    assert result["similarity_rank1_frac"] == pytest.approx(sum(r["rank_of_own"] == "1" for r in ranks) / len(ranks))
    with Image.open(sheets[0]) as im:
        assert im.width > 150 + 8 * 64 and im.height > 3 * 64 * 2  # label column + frames, three rows enlarged

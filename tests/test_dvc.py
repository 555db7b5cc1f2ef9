"""`dvc repro` runs the same CLI stages as the pipeline, with the thresholds DVC tracks in params.yaml."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).parent / "dvc"
STAGES = ("sample_data", "preprocess", "train_vae", "train_dit", "evaluate")


def _dvc(cwd, *args):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([str(DVC), *args], cwd=cwd, capture_output=True, text=True, env=env, check=True)


def _project(tmp_path: Path) -> Path:
    """A copy of the DVC project in ``tmp_path/proj`` (code and venv symlinked), with the committed .dvc/config."""
    work = tmp_path / "proj"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, work / name)
    for name in (".venv", "easyanimate"):
        os.symlink(ROOT / name, work / name)
    _dvc(work, "init", "--no-scm", "-q")
    config = (ROOT / ".dvc" / "config").read_text()  # the remote as committed; no git in the temp copy
    (work / ".dvc" / "config").write_text(config.replace("[core]\n", "[core]\n    no_scm = True\n", 1))
    return work


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_params_yaml_is_the_preset_the_stages_use():
    from easyanimate.config import load_config

    cfg = load_config(str(ROOT / "params.yaml"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert cfg.preprocess.min_seconds == params["preprocess"]["min_seconds"]
    assert cfg.preprocess.motion.max_score == params["preprocess"]["motion"]["max_score"]
    assert cfg.train.max_steps == params["train"]["max_steps"]
    assert cfg.evaluate.gate_max_flicker == params["evaluate"]["gate_max_flicker"]
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert tuple(stages) == STAGES
    for name in STAGES[1:]:
        assert "--preset params.yaml" in stages[name]["cmd"], name
    assert stages["evaluate"]["metrics"] == [{"metrics/metrics.json": {"cache": False}}]


def test_dvc_config_has_a_relative_local_remote():
    config = (ROOT / ".dvc" / "config").read_text()
    assert "analytics = false" in config and "remote = local" in config
    url = next(line.split("=", 1)[1].strip() for line in config.splitlines() if line.strip().startswith("url"))
    assert not os.path.isabs(url) and "://" not in url  # works wherever the repository is cloned


@pytest.mark.slow
def test_dvc_repro_preprocess(tmp_path):
    work = _project(tmp_path)
    _dvc(work, "repro", "preprocess")
    meta = json.loads((work / "data" / "processed" / "meta.json").read_text())
    assert any(m["type"] == "video" for m in meta) and any(m["type"] == "image" for m in meta)
    status = _dvc(work, "status", "preprocess").stdout  # the later stages have not run: status of this one only
    assert "up to date" in status.lower() or status.strip() == ""
    # a changed threshold makes the stage stale
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["preprocess"]["max_seconds"] = 3.0
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    status = _dvc(work, "status", "preprocess").stdout
    assert "preprocess" in status and "params.yaml" in status


@pytest.mark.slow
def test_dvc_repro_all_stages_metrics_and_push_pull(tmp_path):
    work = _project(tmp_path)

    # every stage runs, in order: data -> clips -> VAE -> DiT -> evaluation
    out = _dvc(work, "repro").stdout
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert ran == list(STAGES)
    assert (work / "models" / "vae" / "final" / "config.json").is_file()
    assert (work / "models" / "dit" / "final" / "model_index.json").is_file()  # a pipeline folder
    assert (work / "metrics" / "contact_sheet.png").is_file()
    assert sorted(p.name for p in (work / "metrics" / "samples").glob("*.mp4")) == ["prompt-00.mp4", "prompt-01.mp4"]

    # nothing changed: nothing runs
    again = _dvc(work, "repro").stdout
    assert "Running stage" not in again and "up to date" in again.lower()

    # the evaluation metrics are DVC metrics
    shown = json.loads(_dvc(work, "metrics", "show", "--json").stdout)[""]["data"]["metrics/metrics.json"]["data"]
    assert {"vae_psnr", "vae_ssim", "val_loss", "flicker", "flicker_score", "motion", "gates_passed"} <= set(shown)
    assert shown == json.loads((work / "metrics" / "metrics.json").read_text())

    # push to the committed local remote (beside the checkout), drop the cache and the data, pull it back
    _dvc(work, "push")
    remote = tmp_path / "dvc-remote"
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*"))
    tracked = [work / "data" / "raw" / "videos" / "bikes.mp4", work / "data" / "processed" / "meta.json",
               work / "models" / "dit" / "final" / "transformer" / "diffusion_pytorch_model.safetensors",
               work / "models" / "vae" / "final" / "diffusion_pytorch_model.safetensors",
               work / "metrics" / "samples" / "prompt-00.mp4", work / "metrics" / "contact_sheet.png"]
    before = {p: _sha256(p) for p in tracked}
    for path in (".dvc/cache", "data", "models", "metrics/samples"):
        shutil.rmtree(work / path)
    (work / "metrics" / "contact_sheet.png").unlink()
    _dvc(work, "pull")
    assert {p: _sha256(p) for p in tracked} == before
    assert "up to date" in _dvc(work, "status").stdout.lower()

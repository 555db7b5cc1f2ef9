"""`dvc repro` runs the same CLI stages as the pipeline, with the thresholds DVC tracks in params.yaml."""

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


def _dvc(cwd, *args):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([str(DVC), *args], cwd=cwd, capture_output=True, text=True, env=env, check=True)


def test_params_yaml_is_the_preset_the_stages_use():
    from easyanimate.config import load_config

    cfg = load_config(str(ROOT / "params.yaml"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert cfg.preprocess.min_seconds == params["preprocess"]["min_seconds"]
    assert cfg.preprocess.motion.max_score == params["preprocess"]["motion"]["max_score"]
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "--preset params.yaml" in stages["preprocess"]["cmd"]


@pytest.mark.slow
def test_dvc_repro_preprocess(tmp_path):
    work = tmp_path / "proj"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, work / name)
    for name in (".venv", "easyanimate"):
        os.symlink(ROOT / name, work / name)
    _dvc(work, "init", "--no-scm", "-q")
    _dvc(work, "config", "core.analytics", "false")
    _dvc(work, "repro", "preprocess")
    meta = json.loads((work / "data" / "processed" / "meta.json").read_text())
    assert any(m["type"] == "video" for m in meta) and any(m["type"] == "image" for m in meta)
    assert "up to date" in _dvc(work, "status").stdout.lower() or _dvc(work, "status").stdout.strip() == ""
    # a changed threshold makes the stage stale
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["preprocess"]["max_seconds"] = 3.0
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    status = _dvc(work, "status").stdout
    assert "preprocess" in status and "params.yaml" in status

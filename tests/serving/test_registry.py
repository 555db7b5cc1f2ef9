"""MLflow tracker, registry and pyfunc against a real ``mlflow server`` (see conftest)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from components.mlflow_tracker import MlflowTracker, end_run, start_parent_run
from serving import registry
from serving.pyfunc import POINTER_FILE, request_rows

GATES = {"val_loss": {"max": 1.0}, "psnr": {"min": 20.0}}
DEFAULTS = {"num_frames": 9, "height": 64, "width": 64, "steps": 2, "fps": 8}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------------
# tracker


def test_tracker_parent_and_nested_runs(mlflow_server, tmp_path, caplog):
    client = MlflowClient(mlflow_server)
    parent = start_parent_run(mlflow_server, "tracker-test", "pipeline", {"kfp_run_id": "local-1"})
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "a.txt").write_text("a")

    with MlflowTracker(tracking_uri=mlflow_server, run_name="train_dit", parent_run_id=parent,
                       tags={"step": "train"}) as tracker:
        cfg = {"model": {"dtype": "float32", "transformer": {"num_layers": 4}}, "lr": 1e-3, "long": "x" * 7000,
               "sizes": [64, 128]}
        tracker.log_params(cfg)
        tracker.log_params(cfg)  # same values again: skipped, no MLflow conflict
        tracker.log_params({"lr": 2e-3})  # MLflow cannot change a param: warned, kept as a tag
        tracker.log_metrics({"loss": 0.5, "bad": float("nan"), "inf": float("inf")}, step=1)
        tracker.log_metrics({"loss": 0.25}, step=2)
        tracker.log_artifact(tmp_path / "report.json")
        tracker.log_artifact(tmp_path / "samples", artifact_path="outputs")
        child = tracker.run_id
    with pytest.raises(RuntimeError), MlflowTracker(tracking_uri=mlflow_server, parent_run_id=parent) as failing:
        raise RuntimeError("boom")
    end_run(mlflow_server, parent, "FINISHED")

    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["mlflow.runName"] == "train_dit" and run.data.tags["step"] == "train"
    assert run.info.experiment_id == client.get_run(parent).info.experiment_id
    params = run.data.params
    assert params["model.transformer.num_layers"] == "4" and params["model.dtype"] == "float32"
    assert params["lr"] == "0.001" and run.data.tags["param_changed.lr"] == "0.002"
    assert params["sizes"] == "[64, 128]" and len(params["long"]) == 6000
    assert [m.value for m in client.get_metric_history(child, "loss")] == [0.5, 0.25]
    assert "bad" not in run.data.metrics and "inf" not in run.data.metrics
    assert "dropping metric 'bad'" in caplog.text
    assert {a.path for a in client.list_artifacts(child)} == {"report.json", "outputs"}
    assert [a.path for a in client.list_artifacts(child, "outputs/samples")] == ["outputs/samples/a.txt"]
    assert run.info.status == "FINISHED"
    assert client.get_run(failing.run_id).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FINISHED"

    # attaching to an existing run logs into it and leaves its status alone
    attached = MlflowTracker(child, tracking_uri=mlflow_server)
    attached.log_metrics({"late": 1.0}, step=3)
    attached.log_params({"model": {"dtype": "float32"}})  # already there with this value
    attached.close()
    run = client.get_run(child)
    assert run.data.metrics["late"] == 1.0 and run.info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------------------------------
# registry


def _register(folder, uri, metrics, **kwargs):
    tags = {"dvc_data_hash": "md5-3f2a9c", "preset": "tiny", "pipeline_run_id": "kfp-run-42",
            "config": "model:\n  dtype: float32\n" * 400}  # longer than a tag may hold
    return registry.register_pipeline(folder, tracking_uri=uri, tags=tags, metrics=metrics,
                                      generate_defaults=DEFAULTS, **kwargs)


def test_register_promote_and_load_in_fresh_process(mlflow_server, tiny_pipeline_folder, tmp_path):
    client = MlflowClient(mlflow_server)
    name = "easyanimate"

    # 1. a first version: lineage tags, manifest, challenger; the gates pass and there is no champion → champion
    v1 = _register(tiny_pipeline_folder, mlflow_server, {"val_loss": 0.5, "psnr": 25.0})
    assert v1.tags["dvc_data_hash"] == "md5-3f2a9c" and v1.tags["preset"] == "tiny"
    assert v1.tags["pipeline_run_id"] == "kfp-run-42" and v1.run_id
    assert v1.tags["git_commit"] == registry.git_commit()
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", v1.tags["git_commit"])
    assert v1.tags["storage"] == "copied" and v1.tags["metric.val_loss"] == "0.5"
    assert v1.tags["config"].endswith(f"(full text: runs:/{v1.run_id}/version_tags/config.txt)")
    assert client.get_run(v1.run_id).data.metrics["psnr"] == 25.0
    assert client.get_model_version_by_alias(name, "challenger").version == v1.version

    manifest_path = mlflow.artifacts.download_artifacts(v1.tags["weights_manifest"], dst_path=str(tmp_path / "m"),
                                                       tracking_uri=mlflow_server)
    manifest = json.loads(Path(manifest_path).read_text())
    assert v1.tags["weights_files"] == str(len(manifest["files"]))
    files = _files(tiny_pipeline_folder)
    assert set(manifest["files"]) == set(files)
    assert any(k.endswith(".safetensors") for k in files) and "model_index.json" in files
    for rel, path in files.items():
        assert manifest["files"][rel] == {"sha256": _sha256(path), "size": path.stat().st_size}, rel
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert v1.tags["weights_sha256"] == hashlib.sha256(canonical).hexdigest()

    # the registered copy holds exactly these bytes
    local = registry.download_pipeline(f"models:/{name}/{v1.version}", mlflow_server, cache_dir=tmp_path / "cache")
    registered = {rel: _sha256(p) for rel, p in _files(local).items()}
    assert registered == {rel: entry["sha256"] for rel, entry in manifest["files"].items()}

    promoted, reasons = registry.promote_if_better(name, v1.version, {"val_loss": 0.5, "psnr": 25.0}, GATES,
                                                   tracking_uri=mlflow_server)
    assert promoted, reasons
    assert client.get_model_version_by_alias(name, "champion").version == v1.version

    # 2. a failing gate: not promoted, the reason names the gate; still the challenger
    v2 = _register(tiny_pipeline_folder, mlflow_server, {"val_loss": 1.5, "psnr": 30.0})
    assert client.get_model_version_by_alias(name, "challenger").version == v2.version
    promoted, reasons = registry.promote_if_better(name, v2.version, {"val_loss": 1.5, "psnr": 30.0}, GATES,
                                                   tracking_uri=mlflow_server)
    assert not promoted
    assert any("val_loss" in r and "max 1" in r for r in reasons), reasons
    assert not any(r.startswith("gate psnr") for r in reasons), reasons
    assert client.get_model_version(name, v2.version).tags["promotion"].startswith("rejected")

    # 3. gates pass but worse than the champion on a gated metric (champion's metrics read from the registry)
    v3 = _register(tiny_pipeline_folder, mlflow_server, {"val_loss": 0.8, "psnr": 26.0})
    promoted, reasons = registry.promote_if_better(name, v3.version, {"val_loss": 0.8, "psnr": 26.0}, GATES,
                                                   tracking_uri=mlflow_server,
                                                   higher_is_better={"val_loss": False, "psnr": True})
    assert not promoted
    assert reasons == [f"val_loss: 0.8 is higher (worse) than champion version {v1.version}'s 0.5"]
    assert client.get_model_version_by_alias(name, "champion").version == v1.version

    # 4. better on every gated metric → the champion moves
    v4 = _register(tiny_pipeline_folder, mlflow_server, {"val_loss": 0.4, "psnr": 25.0})
    promoted, reasons = registry.promote_if_better(name, v4.version, {"val_loss": 0.4, "psnr": 25.0}, GATES,
                                                   tracking_uri=mlflow_server)
    assert promoted, reasons
    version, source = registry.resolve_alias(name, "champion", mlflow_server)
    assert version == v4.version and source.rstrip("/").endswith("tiny_pipe")

    # 5. models:/easyanimate@champion in a fresh process (no repo on sys.path: the wrapper travels in the model)
    out = tmp_path / "out.mp4"
    code = (
        "import base64, sys, mlflow\n"
        "model = mlflow.pyfunc.load_model('models:/easyanimate@champion')\n"
        "res = model.predict({'prompt': 'a red ball bounces on the grass', 'num_frames': 9, 'height': 64,"
        " 'width': 64, 'steps': 2, 'seed': 1})\n"
        "row = res.iloc[0]\n"
        "assert row['mime'] == 'video/mp4' and row['num_frames'] == 9, row\n"
        "open(sys.argv[1], 'wb').write(base64.b64decode(row['media']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from easyanimate.video import read_video

    frames = read_video(out.read_bytes())
    assert frames.shape == (9, 64, 64, 3)


def test_register_by_reference(mlflow_server, tiny_pipeline_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # for mlflow.pyfunc.load_model below
    folder = tmp_path / "official_like"
    shutil.copytree(tiny_pipeline_folder, folder)
    client = MlflowClient(mlflow_server)
    name = "easyanimate-ref"
    mv = registry.register_pipeline(folder, tracking_uri=mlflow_server, name=name, by_reference=True,
                                    tags={"dvc_data_hash": "none", "preset": "v2_512"})
    assert mv.tags["storage"] == "by_reference" and mv.tags["pipeline_ref"] == str(folder.resolve())
    assert client.get_model_version_by_alias(name, "challenger").version == mv.version
    assert registry.resolve_alias(name, "challenger", mlflow_server) == (mv.version, str(folder.resolve()))

    # the model holds a pointer, not the weights
    model_dir = Path(mlflow.artifacts.download_artifacts(client.get_model_version_download_uri(name, mv.version),
                                                         dst_path=str(tmp_path / "model"), tracking_uri=mlflow_server))
    stored = _files(model_dir)
    assert not any(rel.endswith(".safetensors") for rel in stored), sorted(stored)
    assert any(rel.endswith(POINTER_FILE) for rel in stored)
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert sum(p.stat().st_size for p in stored.values()) < min(200_000, weights / 20)

    # it loads (pyfunc: one PNG frame; direct: the pipeline reads the referenced folder)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{mv.version}")
    res = model.predict({"prompt": "a lighthouse at dusk", "num_frames": 1, "height": 64, "width": 64, "steps": 1})
    assert res.iloc[0]["mime"] == "image/png"
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(res.iloc[0]["media"]))).size == (64, 64)
    cache = tmp_path / "cache"
    assert registry.download_pipeline(f"models:/{name}@challenger", mlflow_server, cache) == folder.resolve()

    # the folder gone: a clear error naming the path
    folder.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="registered by reference.*official_like"):
        registry.load_pipeline(f"models:/{name}@challenger", mlflow_server, cache)


# ---------------------------------------------------------------------------------------------------------------------
# pure parts


def test_gates_and_requests():
    assert registry.check_gates({"val_loss": 0.5, "psnr": 21}, GATES) == []
    assert registry.check_gates({"val_loss": 0.5}, GATES) == ["gate psnr: metric missing"]
    assert registry.check_gates({"val_loss": 2.0, "psnr": 19}, GATES) == ["gate val_loss: 2 > max 1",
                                                                         "gate psnr: 19 < min 20"]
    rows = request_rows({"prompt": ["a", "b"], "steps": [2, float("nan")]})
    assert rows == [{"prompt": "a", "steps": 2}, {"prompt": "b"}]
    with pytest.raises(ValueError, match="unknown columns"):
        request_rows([{"prompt": "a", "frames": 9}])
    with pytest.raises(ValueError, match="prompt"):
        request_rows({"steps": 2})

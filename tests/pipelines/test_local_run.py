"""The whole pipeline on this machine (kfp.local, SubprocessRunner) against a real MLflow server, twice:

1. with the VAE branch, gates at their (permissive) preset values → a parent run with nested step runs, metrics,
   sample MP4s and a contact sheet; a registered version with lineage tags and the sha256 manifest; ``champion``;
2. without the VAE, with ``evaluate.gate_max_val_loss=0`` → a new version that does NOT become champion.
"""

import hashlib
import json
import re
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.cli import run_local

from .conftest import FAST_OVERRIDES

STEPS = {"preprocess", "train_vae", "train_dit", "evaluate", "register"}
pytestmark = pytest.mark.slow  # both runs: 1.5-2 min on 2 cores


@pytest.fixture(scope="module")
def runs(mlflow_server, small_sample_data, tmp_path_factory):
    name = f"pipeline-test-{uuid.uuid4().hex[:8]}"
    experiment = f"pipeline-test-{uuid.uuid4().hex[:8]}"
    common = {"data": str(small_sample_data), "preset": "tiny", "num_shards": 2, "tracking_uri": mlflow_server,
              "experiment": experiment, "model_name": name}
    first = run_local(pipeline_root=tmp_path_factory.mktemp("run_pass"), overrides=FAST_OVERRIDES,
                      train_vae=True, **common)
    second = run_local(pipeline_root=tmp_path_factory.mktemp("run_gate"),
                       overrides=[*FAST_OVERRIDES, "evaluate.gate_max_val_loss=0"], train_vae=False, **common)
    return {"first": first, "second": second, "name": name, "experiment": experiment,
            "client": MlflowClient(mlflow_server, registry_uri=mlflow_server)}


def _children(client, parent_id):
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def test_parent_run_with_nested_step_runs(runs):
    client, first = runs["client"], runs["first"]
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED"  # closed by the exit handler
    assert parent.data.tags["kfp_final_state"] == "SUCCEEDED" and parent.data.tags["kfp_run_id"]
    assert parent.data.params["train.max_steps"] == "2" and parent.data.params["pipeline.train_vae"] == "True"
    children = {r.data.tags["mlflow.runName"]: r for r in _children(client, first["parent_run_id"])}
    assert set(children) == STEPS
    for run in children.values():
        assert run.info.status == "FINISHED"
        assert run.data.params["name"] == "tiny"  # the resolved config, as params
    assert "loss" in children["train_dit"].data.metrics
    assert "val_psnr" in children["train_vae"].data.metrics
    assert {"val_loss", "vae_psnr", "flicker"} <= set(children["evaluate"].data.metrics)
    assert children["preprocess"].data.metrics["kept_videos"] >= 1
    shards = [f.path for f in client.list_artifacts(children["preprocess"].info.run_id, "shards")]
    assert shards == ["shards/0-of-2", "shards/1-of-2"]  # every shard's summary, from the fan-out


def test_samples_and_contact_sheet_are_logged(runs):
    client = runs["client"]
    children = {r.data.tags["mlflow.runName"]: r for r in _children(client, runs["first"]["parent_run_id"])}
    evaluate = [f.path for f in client.list_artifacts(children["evaluate"].info.run_id, "samples")]
    assert "samples/prompt-00.mp4" in evaluate and "samples/contact_sheet.png" in evaluate
    dit = [f.path for f in client.list_artifacts(children["train_dit"].info.run_id, "samples")]
    assert any(p.endswith(".mp4") for p in dit)
    local = client.download_artifacts(children["evaluate"].info.run_id, "samples/prompt-00.mp4")
    assert Path(local).read_bytes()[4:8] == b"ftyp"  # a real MP4 container


def test_registered_version_has_lineage_and_manifest(runs):
    client, first, name = runs["client"], runs["first"], runs["name"]
    mv = client.get_model_version(name, first["model_version"])
    tags = mv.tags
    assert tags["pipeline_run_id"] == first["parent_run_id"]
    assert tags["preset"] == "tiny"
    assert re.fullmatch(r"[0-9a-f]{64}", tags["weights_sha256"])
    assert re.fullmatch(r"[0-9a-f]{64}", tags["config_sha256"])
    assert re.fullmatch(r"[0-9a-f]{64}", tags["data_meta_sha256"])
    assert tags["dvc_data_hash"] == "unknown"  # the test input is not DVC-tracked
    assert "git_commit" in tags and "evaluate.gate_max_val_loss=0" not in tags["overrides"]
    manifest_path = client.download_artifacts(mv.run_id, "weights_manifest.json")
    manifest = json.loads(Path(manifest_path).read_text())
    assert manifest["algorithm"] == "sha256"
    model = Path(first["model"])
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((model / rel).read_bytes()).hexdigest() == entry["sha256"], rel
    assert any(rel.endswith(".safetensors") for rel in manifest["files"])
    register_run = client.get_run(mv.run_id)
    assert register_run.data.tags["mlflow.parentRunId"] == first["parent_run_id"]


def test_champion_only_when_the_gates_pass(runs):
    client, first, second, name = runs["client"], runs["first"], runs["second"], runs["name"]
    assert first["champion"] is True and second["champion"] is False
    assert client.get_model_version_by_alias(name, "champion").version == first["model_version"]
    assert client.get_model_version_by_alias(name, "challenger").version == second["model_version"]
    rejected = client.get_model_version(name, second["model_version"])
    assert rejected.tags["promotion"].startswith("rejected") and "val_loss" in rejected.tags["promotion"]
    parent = client.get_run(second["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["pipeline.train_vae"] == "False"
    steps = {r.data.tags["mlflow.runName"] for r in _children(client, second["parent_run_id"])}
    assert steps == STEPS - {"train_vae"}


def test_kfp_artifacts_and_reports(runs):
    first = runs["first"]
    assert (Path(first["dataset"]) / "meta.json").is_file()
    assert (Path(first["model"]) / "model_index.json").is_file()
    assert first["metrics"]["val_loss"] > 0 and "vae_psnr" in first["metrics"]
    run_dir = Path(first["run_dir"])
    html = (run_dir / "evaluate" / "report").read_text()
    assert "<table>" in html and "data:image/png;base64," in html and "prompt-00.mp4" in html
    register = (run_dir / "register" / "report").read_text()
    assert register.startswith(f"# {runs['name']} version {first['model_version']}")

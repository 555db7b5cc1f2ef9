"""The whole pipeline on this machine (kfp.local, SubprocessRunner) against a real MLflow server, twice (the
``runs`` fixture, tests/pipelines/conftest.py):

1. with the VAE branch, gates at their (permissive) preset values → a parent run with nested step runs, metrics,
   sample MP4s and a contact sheet; a registered version with lineage tags and the sha256 manifest; ``champion``;
2. without the VAE, a LoRA, with ``evaluate.gate_max_val_loss=0`` → a new version that does NOT become champion.
"""

import hashlib
import json
import re
from pathlib import Path

import pytest

STEPS = {"preprocess", "train_vae", "train_dit", "evaluate", "register"}
pytestmark = pytest.mark.slow  # both runs: 1.5-2 min on 2 cores


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
    assert "train/loss" in children["train_dit"].data.metrics
    assert "val/psnr" in children["train_vae"].data.metrics
    assert {"eval/val_loss", "eval/vae_psnr", "eval/flicker"} <= set(children["evaluate"].data.metrics)
    assert children["preprocess"].data.metrics["data/kept_videos"] >= 1
    shards = [f.path for f in client.list_artifacts(children["preprocess"].info.run_id, "shards")]
    assert shards == ["shards/0-of-2", "shards/1-of-2"]  # every shard's summary, from the fan-out


def test_samples_and_contact_sheet_are_logged(runs):
    client = runs["client"]
    children = {r.data.tags["mlflow.runName"]: r for r in _children(client, runs["first"]["parent_run_id"])}
    evaluate = [f.path for f in client.list_artifacts(children["evaluate"].info.run_id, "samples")]
    assert "samples/prompt-00.mp4" in evaluate and "samples/contact_sheet.png" in evaluate
    assert "samples/prompt-00.gif" in evaluate and "samples/prompts.json" in evaluate  # preview + the prompts
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


def test_mlflow_shows_datasets_system_metrics_and_outcomes(runs):
    """What an ML engineer looks for in the MLflow UI: the dataset each step read (source, digest = data version,
    schema), system metrics on training runs, the outcome on the pipeline's parent run, descriptions in the
    registry."""
    client, first, name = runs["client"], runs["first"], runs["name"]
    children = {r.data.tags["mlflow.runName"]: r for r in _children(client, first["parent_run_id"])}
    digests = set()
    for step, context in (("preprocess", "preprocessing"), ("train_vae", "training"), ("train_dit", "training"),
                          ("evaluate", "evaluation")):
        inputs = client.get_run(children[step].info.run_id).inputs.dataset_inputs
        assert len(inputs) == 1, f"{step}: expected one dataset input, got {inputs}"
        ds = inputs[0].dataset
        assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == context
        assert json.loads(ds.source)["uri"] and json.loads(ds.profile)["data_version"].startswith("files:")
        assert [c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]] == ["file_path", "text", "type"]
        digests.add(ds.digest)
    assert len(digests) == 1  # every step saw the same data version
    for step in ("train_vae", "train_dit"):
        metrics = client.get_run(children[step].info.run_id).data.metrics
        assert any(k.startswith("system/cpu_utilization") for k in metrics), f"{step}: {sorted(metrics)}"
    parent = client.get_run(first["parent_run_id"]).data
    assert {"eval/val_loss", "eval/vae_psnr", "eval/flicker", "registry/champion"} <= set(parent.metrics)
    assert parent.metrics["registry/champion"] == 1
    assert parent.tags["model_version"] == first["model_version"]
    mv = client.get_model_version(name, first["model_version"])
    assert mv.description.startswith("**promoted") and "| val_loss |" in mv.description
    rejected = client.get_model_version(name, runs["second"]["model_version"])
    assert rejected.description.startswith("**rejected") and "≤ 0" in rejected.description
    assert f"Champion: version {first['model_version']}" in client.get_registered_model(name).description
    # the pyfunc says what it takes and returns, with an example request (MLflow's "Schema" panel)
    import mlflow
    from mlflow.models import Model

    root = client.get_model_version_download_uri(name, first["model_version"]).rstrip("/")
    mlmodel = Model.load(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel",
                                                             tracking_uri=client.tracking_uri))
    assert "prompt" in mlmodel.signature.inputs.input_names() and mlmodel.signature.outputs is not None
    assert mlmodel.saved_input_example_info is not None
    logged = client.get_logged_model(mv.source.split("/")[-1])  # models:/<model id>
    assert {m.key for m in logged.metrics} >= {"val_loss", "vae_psnr"} and logged.params["preset"] == "tiny"


PREFIXES = ("train/", "val/", "eval/", "data/", "system/")


def test_metric_names_line_up_across_runs(runs):
    """"Compare runs" charts line up: the VAE, DiT and LoRA runs name the same things the same way (``train/…``,
    ``val/…``), per-step series stay series, the DiT's end-of-run summary is tags, not one-point charts; the
    evaluation and the pipeline's parent run share ``eval/…``; the files our code reads keep the plain names."""
    client = runs["client"]
    first = {r.data.tags["mlflow.runName"]: r for r in _children(client, runs["first"]["parent_run_id"])}
    second = {r.data.tags["mlflow.runName"]: r for r in _children(client, runs["second"]["parent_run_id"])}
    trainers = {"vae": first["train_vae"], "dit": first["train_dit"], "lora": second["train_dit"]}
    assert second["train_dit"].data.tags["lora"] == "True"
    for step, run in [*trainers.items(), *first.items(), *second.items()]:
        if step == "register":  # the registry's record: the logged model's metrics, as promote_if_better reads them
            continue
        names = set(run.data.metrics)
        assert all(k.startswith(PREFIXES) for k in names), f"{step}: unprefixed metrics {sorted(names)}"
    common = {"train/loss", "train/lr", "train/grad_norm", "train/epoch", "train/samples_per_s"}
    for kind, run in trainers.items():
        assert common <= set(run.data.metrics), f"{kind}: {sorted(run.data.metrics)}"
        # a series, one point per logged optimizer step (train.log_every=1, train.max_steps=2), not a summary dot
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in history] == [1, 2], f"{kind}: {[(m.step, m.value) for m in history]}"
    assert {"val/psnr", "val/ssim"} <= set(trainers["vae"].data.metrics)
    assert [m.step for m in client.get_metric_history(trainers["vae"].info.run_id, "val/psnr")] == [0, 2]
    for kind in ("dit", "lora"):
        run = trainers[kind]
        assert {"val/loss", "val/mse", "val/vb", "train/tokens_per_s"} <= set(run.data.metrics), kind
        tags = run.data.tags  # the end-of-run summary row: tags, and none of it as a metric
        assert tags["summary.steps"] == "2" and float(tags["summary.final_loss"]) > 0, kind
        assert not {"train/final_loss", "train/steps", "train/seconds", "final_loss"} & set(run.data.metrics), kind
    evaluate, parent = first["evaluate"].data.metrics, client.get_run(runs["first"]["parent_run_id"]).data.metrics
    shared = {k for k in evaluate if k in parent}
    assert {"eval/val_loss", "eval/vae_psnr", "eval/flicker"} <= shared
    assert all(parent[k] == evaluate[k] for k in shared)
    # what our code reads stays as it was: the KFP metrics (gates, promote_if_better) and the registry version
    assert {"val_loss", "vae_psnr", "flicker"} <= set(runs["first"]["metrics"])
    mv = client.get_model_version(runs["name"], runs["first"]["model_version"])
    assert float(mv.tags["metric.val_loss"]) == runs["first"]["metrics"]["val_loss"]

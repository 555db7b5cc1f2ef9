"""The components' shared glue (components/_runtime.py): config and overrides, model assembly between steps, the
parent-run exit path, the TrainJob launcher (rendered and driven against a fake Kubernetes API)."""

import json
import subprocess
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from components import _runtime as rt


class FakeArtifact:
    """What KFP hands a component for an artifact: a path and a metadata dict."""

    def __init__(self, path):
        self.path, self.metadata = str(path), {}


def test_overrides_are_a_json_list():
    assert rt.parse_overrides("") == [] and rt.parse_overrides('["a.b=1"]') == ["a.b=1"]
    for bad in ("train.max_steps=2", '{"a": 1}', "[1]"):
        with pytest.raises(ValueError, match="JSON list"):
            rt.parse_overrides(bad)
    cfg = rt.config("tiny", '["train.max_steps=3"]')
    assert cfg.train.max_steps == 3
    assert rt.shard_specs(3) == ["0/3", "1/3", "2/3"]
    with pytest.raises(ValueError):
        rt.shard_specs(0)


def test_gates_follow_the_evaluate_config():
    cfg = rt.config("tiny", '["evaluate.gate_max_val_loss=0.5", "evaluate.gate_min_vae_psnr=20"]')
    limits, higher = rt.gates(cfg.evaluate)
    assert limits["val_loss"] == {"max": 0.5} and limits["vae_psnr"] == {"min": 20.0}
    assert higher == {"val_loss": False, "vae_psnr": True, "flicker": False}


def test_vae_swap_and_lora_export_give_pipeline_folders(tmp_path, tiny_config):
    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit
    from easyanimate.pipeline import EasyAnimatePipeline, build_pipeline
    from easyanimate.train.lora import add_lora, save_lora_official

    torch.set_num_threads(2)
    torch.manual_seed(7)
    vae = AutoencoderKLMagvit(**tiny_config.model.vae.to_model_kwargs())
    vae.save_pretrained(tmp_path / "vae")
    cfg = rt.pipeline_with_vae(tiny_config, str(tmp_path / "vae"), tmp_path / "work")
    assert cfg.model.pretrained == str(tmp_path / "work" / "base_pipeline")
    pipe = EasyAnimatePipeline.from_pretrained(cfg.model.pretrained)
    for (name, a), b in zip(pipe.vae.state_dict().items(), vae.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    # a LoRA run's final/ (official-format file) → base pipeline with the LoRA merged + lora/ kept
    trained = build_pipeline(cfg.model)
    add_lora(trained.transformer, rank=2, alpha=2.0)
    with torch.no_grad():
        for n, p in trained.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)  # peft starts B at 0: make the update non-zero
    save_lora_official(trained.transformer, tmp_path / "final" / "lora.safetensors")
    artifact = FakeArtifact(tmp_path / "artifact")
    rt.export_pipeline(cfg, tmp_path / "final", artifact, lora=True)
    assert artifact.metadata["lora"] is True and artifact.metadata["lora_layers_merged"] > 0
    assert (tmp_path / "artifact" / "lora" / "lora.safetensors").is_file()
    merged = EasyAnimatePipeline.from_pretrained(artifact.path)
    base = build_pipeline(cfg.model)
    changed = [n for (n, a), b in zip(merged.transformer.state_dict().items(),
                                      base.transformer.state_dict().values(), strict=True) if not torch.equal(a, b)]
    assert changed


def test_failed_pipeline_closes_its_parent_run_failed(mlflow_server):
    cfg = rt.config("tiny", "[]")
    run_id = rt.start_pipeline_run(mlflow_server, "runtime-test", "kfp-run-x", cfg, {"data": "/x"},
                                   tags={"kfp_run_id": "job-123"})
    with rt.step_run(mlflow_server, run_id, "train_dit") as tracker:
        child = tracker.run_id
    assert rt.find_pipeline_run(mlflow_server, "runtime-test", "job-123") == run_id
    status = rt.end_pipeline_run(mlflow_server, "runtime-test", "job-123",
                                 {"state": "FAILED", "error": {"message": "Task train-dit failed."}})
    assert status == "FAILED"
    client = MlflowClient(mlflow_server)
    parent = client.get_run(run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["kfp_error"] == "Task train-dit failed."
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == run_id
    assert rt.end_pipeline_run(mlflow_server, "runtime-test", "no-such-job", None) == "NOT_FOUND"


def test_trainjob_manifest_renders_a_runnable_launch(tmp_path):
    manifest = rt.trainjob_manifest(
        name="ea-dit-x", namespace="team", image="registry/easyanimate-mlops:1", preset="v2_512",
        overrides=['train.sample_prompts=["a b", "c"]', "generate.prompt=it's"], data="/mnt/work/r/data/meta.json",
        output="/mnt/work/r/run", lora=True, nodes=2, gpus_per_node=8)
    assert manifest["kind"] == "TrainJob" and manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    trainer = manifest["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert trainer["image"] == "registry/easyanimate-mlops:1"
    mounts = manifest["spec"]["podTemplateOverrides"][0]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "work", "mountPath": "/mnt/work"} in mounts
    # run the launch script with `accelerate` replaced by an argv printer: quoting and the PET_* arithmetic hold
    script = trainer["args"][0].replace("cd /opt/easyanimate", "true").replace(
        "exec accelerate launch", 'python3 -c "import json, sys; print(json.dumps(sys.argv[1:]))"')
    env = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "node-0", "PET_MASTER_PORT": "29500",
           "PET_NPROC_PER_NODE": "8", "PATH": "/usr/bin:/bin"}
    argv = json.loads(subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                                     check=True).stdout)
    assert argv[:12] == ["--config_file", "infra/accelerate/deepspeed_zero2.yaml", "--num_machines", "2",
                         "--machine_rank", "1", "--main_process_ip", "node-0", "--main_process_port", "29500",
                         "--num_processes", "16"]
    assert argv[12:] == ["-m", "easyanimate", "train-dit", "--data", "/mnt/work/r/data/meta.json", "--output",
                         "/mnt/work/r/run", "--preset", "v2_512", "--resume", "latest", "--lora",
                         "--set", 'train.sample_prompts=["a b", "c"]', "--set", "generate.prompt=it's"]
    with pytest.raises(ValueError, match="EA_EXTRA"):
        (tmp_path / "t.yaml").write_text("a: ${EA_EXTRA}\n")
        rt.trainjob_manifest(name="n", namespace="n", image="i", preset="p", overrides=[], data="d", output="o",
                             lora=False, nodes=1, gpus_per_node=1, template=tmp_path / "t.yaml")


class FakeApiException(Exception):
    def __init__(self, status):
        super().__init__(status)
        self.status = status


class FakeCustomObjects:
    """A TrainJob store: create → Running; every get advances it (Running → Complete)."""

    def __init__(self, existing=None):
        self.jobs, self.calls = dict(existing or {}), []

    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        self.calls.append("create")
        if body["metadata"]["name"] in self.jobs:
            raise FakeApiException(409)
        self.jobs[body["metadata"]["name"]] = {"status": {"conditions": []}, "polls": 0}

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        if name not in self.jobs:
            raise FakeApiException(404)
        job = self.jobs[name]
        job["polls"] += 1
        if job["polls"] >= 2 and not job["status"]["conditions"]:
            job["status"]["conditions"] = [{"type": "Complete", "status": "True", "message": "done"}]
        return job

    def delete_namespaced_custom_object(self, group, version, ns, plural, name, propagation_policy=None):
        self.calls.append("delete")
        self.jobs.pop(name)


@pytest.fixture
def fake_kube(monkeypatch):
    import kubernetes

    state = {}

    def make_api():
        return state["api"]

    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", make_api)
    monkeypatch.setattr(kubernetes.client, "ApiException", FakeApiException)
    return state


def test_run_trainjob_waits_and_recreates_a_failed_job(fake_kube):
    manifest = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "metadata": {"name": "j", "namespace": "ns"}}
    fake_kube["api"] = FakeCustomObjects()
    assert rt.run_trainjob(manifest, poll_s=0)["type"] == "Complete"
    assert fake_kube["api"].calls == ["create"]

    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "message": "OOM"}]}, "polls": 0}
    fake_kube["api"] = FakeCustomObjects({"j": failed})
    assert rt.run_trainjob(manifest, poll_s=0)["type"] == "Complete"  # a retried step starts it over
    assert fake_kube["api"].calls == ["create", "delete", "create"]


def test_replay_jsonl_copies_a_trainjob_run_into_a_tracker(tmp_path):
    from easyanimate.tracking import JsonlTracker

    src = JsonlTracker(tmp_path / "run")
    src.log_params({"train": {"max_steps": 2}})
    src.log_metrics({"loss": 1.5}, 1)
    src.log_metrics({"loss": 1.2, "val_loss": 1.3}, 2)
    (tmp_path / "run" / "samples").mkdir()
    (tmp_path / "run" / "samples" / "step-2.mp4").write_bytes(b"x")
    got = SimpleNamespace(params={}, metrics=[], artifacts=[])
    tracker = SimpleNamespace(log_params=got.params.update, log_metrics=lambda m, s: got.metrics.append((s, m)),
                              log_artifact=lambda p, a=None: got.artifacts.append((p.name, a)))
    last = rt.replay_jsonl(tmp_path / "run", tracker)
    assert got.params == {"train": {"max_steps": 2}}
    assert got.metrics == [(1, {"loss": 1.5}), (2, {"loss": 1.2, "val_loss": 1.3})]
    assert got.artifacts == [("step-2.mp4", "samples")] and last == {"loss": 1.2, "val_loss": 1.3}


def test_data_version_tracks_the_input_folder(tmp_path):
    raw = tmp_path / "raw"
    (raw / "videos").mkdir(parents=True)
    (raw / "videos" / "a.mp4").write_bytes(b"1")
    (raw / "captions.json").write_text("[]")
    v1 = rt.data_version(raw)
    assert v1.startswith("files:") and rt.data_version(raw) == v1
    (raw / "captions.json").write_text('[{"file": "videos/a.mp4", "text": "a cat"}]')  # a caption edit counts
    v2 = rt.data_version(raw)
    assert v2 != v1
    (raw / "videos" / "b.mp4").write_bytes(b"2")
    assert rt.data_version(raw) != v2
    (tmp_path / "raw.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  path: raw\n")
    assert rt.data_version(raw) == "dvc:0123abcd.dir" and rt.dvc_hash(raw) == "0123abcd.dir"

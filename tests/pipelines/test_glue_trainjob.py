"""components/glue/trainjob.py: the TrainJob launcher, rendered and driven against a fake Kubernetes API."""

import json
import subprocess

import pytest

from components.glue import trainjob


def test_trainjob_manifest_renders_a_runnable_launch(tmp_path):
    manifest = trainjob.trainjob_manifest(
        name="ea-dit-x", namespace="team", image="registry/easyanimate-mlops:1", preset="v2_512",
        overrides=['train.sample_prompts=["a b", "c"]', "generate.prompt=it's"], data="/mnt/work/r/data/meta.json",
        output="/mnt/work/r/run", lora=True, nodes=2, gpus_per_node=8)
    assert manifest["kind"] == "TrainJob" and manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    trainer = manifest["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert trainer["image"] == "registry/easyanimate-mlops:1"
    pod = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    mounts = pod["containers"][0]["volumeMounts"]
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
        trainjob.trainjob_manifest(name="n", namespace="n", image="i", preset="p", overrides=[], data="d", output="o",
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
    assert trainjob.run_trainjob(manifest, poll_s=0)["type"] == "Complete"
    assert fake_kube["api"].calls == ["create"]

    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "message": "OOM"}]}, "polls": 0}
    fake_kube["api"] = FakeCustomObjects({"j": failed})
    assert trainjob.run_trainjob(manifest, poll_s=0)["type"] == "Complete"  # a retried step starts it over
    assert fake_kube["api"].calls == ["create", "delete", "create"]

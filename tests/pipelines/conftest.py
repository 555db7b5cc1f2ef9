"""Fixtures of the pipeline tests: a small real input folder, and two local pipeline runs against the session's MLflow
server (the MLflow server fixture is in tests/conftest.py)."""

import shutil
import uuid
from pathlib import Path

import pytest

# a quick local pipeline run: tiny preset, 2 optimizer steps, 1 held-out clip, 1 evaluation prompt, 1 sampler step
FAST_OVERRIDES = [
    "preprocess.workers=1",
    "data.validation_count=1",
    "train.max_steps=2",
    "train.validation_steps=0",
    "train.checkpointing_steps=0",
    "train.log_every=1",
    "train.sample_steps=1",
    "evaluate.steps=1",
    'evaluate.prompts=["In this video, waves roll onto a sandy beach at sunset."]',
]


@pytest.fixture(scope="session")
def small_sample_data(tmp_path_factory) -> Path:
    """A subset of the packaged sample dataset (``write_sample_dataset``): one real video and three photos with
    their sidecar captions — the full set preprocesses in ~20 s per run on 2 cores, this one in ~2 s."""
    from easyanimate.data.sample import write_sample_dataset

    full = write_sample_dataset(tmp_path_factory.mktemp("sample_full"))
    sub = tmp_path_factory.mktemp("sample_small")
    for rel in ("videos/carphone_pristine.mp4", "images/astronaut.png", "images/chelsea.png", "images/rocket.jpg",
                "captions.json"):
        (sub / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(full / rel, sub / rel)
    return sub


@pytest.fixture(scope="session")
def runs(mlflow_server, small_sample_data, tmp_path_factory):
    """Two whole local pipeline runs (kfp.local) against the session's MLflow server, shared by every module that
    looks at them (test_local_run, test_mlflow_ui): 1.5-2 min on 2 cores.

    ``first``: with the VAE branch, the preset's gates → champion; ``second``: without the VAE, a LoRA, with
    ``evaluate.gate_max_val_loss=0`` → rejected, stays challenger."""
    from mlflow.tracking import MlflowClient

    from pipelines.cli import run_local

    monkey = pytest.MonkeyPatch()
    monkey.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # the quick training steps last a few seconds
    name = f"pipeline-test-{uuid.uuid4().hex[:8]}"
    experiment = f"pipeline-test-{uuid.uuid4().hex[:8]}"
    common = {"data": str(small_sample_data), "preset": "tiny", "num_shards": 2, "tracking_uri": mlflow_server,
              "experiment": experiment, "model_name": name}
    try:
        first = run_local(pipeline_root=tmp_path_factory.mktemp("run_pass"), overrides=FAST_OVERRIDES,
                          train_vae=True, **common)
        second = run_local(pipeline_root=tmp_path_factory.mktemp("run_gate"),
                           overrides=[*FAST_OVERRIDES, "evaluate.gate_max_val_loss=0"], train_vae=False, lora=True,
                           **common)
    finally:
        monkey.undo()
    return {"first": first, "second": second, "name": name, "experiment": experiment,
            "client": MlflowClient(mlflow_server, registry_uri=mlflow_server)}

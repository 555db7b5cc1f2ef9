"""Fixtures of the pipeline tests: a small real input folder (the MLflow server fixture is in tests/conftest.py)."""

import shutil
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

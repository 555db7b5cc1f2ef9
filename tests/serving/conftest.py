"""A tiny pipeline folder shared by the serving tests (the MLflow server fixture is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_pipeline_folder(tmp_path_factory, tiny_config) -> Path:
    """A saved tiny pipeline (random DiT/VAE; MiniLM by reference): the model artifact the registry handles."""
    import torch

    from easyanimate.pipeline import build_pipeline

    torch.set_num_threads(2)
    folder = tmp_path_factory.mktemp("registry") / "tiny_pipe"
    build_pipeline(tiny_config.model).save_pretrained(folder)
    return folder

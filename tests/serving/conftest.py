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


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """One real official-format LoRA for the tiny model (``style.safetensors``): the UI lists it, the server applies
    it (test_webui.py, test_models.py; test_security.py has its own folder of good and hostile files)."""
    from tests.serving.test_triton_lora import _write_official_lora

    folder = tmp_path_factory.mktemp("lora")
    _write_official_lora(folder / "style.safetensors")
    return folder


@pytest.fixture(scope="session")
def endpoint(tmp_path_factory):
    """The public endpoint as ``easyanimate serve`` runs it: the validating front (serving/front.py) before a
    supervised tritonserver on loopback (serving/supervisor.py), tiny model, both models. Used by test_fuzz.py and
    test_hostile.py; its process group must be gone after."""
    from serving.launch import TritonServer, _group_alive
    from serving.supervisor import Endpoint

    tmp = tmp_path_factory.mktemp("endpoint")
    server = TritonServer("tiny", exit_timeout=5, parameters={"torch_threads": "1"},
                          env={"EASYANIMATE_MODEL_CACHE": str(tmp / "cache")}, log=str(tmp / "tritonserver.log"))
    with Endpoint(server, backoff=(0.5,)) as ep:
        yield ep
        pgid = ep.pid
    assert not _group_alive(pgid), f"tritonserver process group {pgid} survived the endpoint's stop"

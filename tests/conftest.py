import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_config():
    from easyanimate.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_config):
    """The tiny pipeline (random DiT/VAE, real MiniLM), shared read-only by tests."""
    import torch

    from easyanimate.pipeline import build_pipeline

    torch.set_num_threads(2)
    return build_pipeline(tiny_config.model, sampler="DPM++")


@pytest.fixture(scope="session")
def spiece_dir(tmp_path_factory) -> Path:
    """A folder holding only a real (tiny) sentencepiece ``spiece.model``, like the official T5 tokenizer folder."""
    import io

    import sentencepiece as spm

    words = ("a cat runs on the grass while a dog sleeps under a tree near the river at sunset with red clouds "
             "video of people walking in a city street at night cars lights rain camera moves slowly").split()
    sentences = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=50,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    folder = tmp_path_factory.mktemp("spiece")
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` (SQLite store, local artifacts, free loopback port) for the whole session; stopped
    at the end, and the test fails if it left processes behind."""
    from serving.mlflow_local import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    try:
        yield server.uri
    finally:
        assert server.stop(), "mlflow server left processes behind after SIGTERM"

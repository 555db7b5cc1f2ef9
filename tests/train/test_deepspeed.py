"""DeepSpeed ZeRO-2 through accelerate on CPU (infra/accelerate/deepspeed_zero2.yaml): 2 processes over gloo train,
checkpoint the partitioned optimizer state per rank, and a resume from the middle checkpoint ends bit-identical."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
from pathlib import Path

import pytest

from .conftest import FAST, PYTHON, REPO, cli_env

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def _launch(meta: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(PYTHON).parent / "accelerate"), "launch", "--config_file",
           str(REPO / "infra" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "2",
           "--main_process_port", str(port), "-m", "easyanimate", "train-dit", "--data", str(meta), "--output",
           str(out), "--preset", "tiny"]
    for s in [*FAST, "train.max_steps=4", "train.checkpointing_steps=2", "train.validation_steps=4",
              "train.checkpoints_total_limit=0"]:
        cmd += ["--set", s]
    return subprocess.run(cmd + list(extra), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)


def _final_digests(out: Path) -> dict[int, list[str]]:
    """Per rank, the digest of its final weights for each run into ``out`` (in run order)."""
    logs = {r: (out / f"rank-{r}-samples.jsonl").read_text().splitlines() for r in (0, 1)}
    return {r: [json.loads(line)["weights_sha256"] for line in lines if "weights_sha256" in line]
            for r, lines in logs.items()}


def test_zero2_two_processes_train_checkpoint_and_resume_exactly(dit_meta, tmp_path):
    out = tmp_path / "ds"
    first = _launch(dit_meta, out)
    assert first.returncode == 0, first.stderr[-4000:]
    ckpt = out / "checkpoints" / "checkpoint-2"
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert meta["deepspeed"] is True and meta["world_size"] == 2
    for r in (0, 1):
        assert (ckpt / f"optimizer-transformer.rank-{r}.safetensors").is_file()
    assert {p.suffix for p in ckpt.rglob("*") if p.is_file()} <= {".json", ".safetensors"}
    digests = _final_digests(out)
    assert len(digests[0]) == 1 and digests[0] == digests[1]  # identical replicas

    again = _launch(dit_meta, out, "--resume", str(ckpt))  # replay steps 3-4 from the step-2 checkpoint
    assert again.returncode == 0, again.stderr[-4000:]
    assert '"resumed_from"' in again.stdout and "checkpoint-2" in again.stdout
    replay = _final_digests(out)
    for r in (0, 1):  # each rank: the replayed steps 3-4 end bit-identical to the uninterrupted ones
        assert len(replay[r]) == 2 and replay[r][1] == replay[r][0]

"""Exact resume: a CLI run SIGKILLed right after a checkpoint, resumed with --resume latest, ends with the weights of an
uninterrupted run (model, Adam state, LR schedule, EMA, RNG streams and the data position all restored)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from safetensors.torch import load_file

from .conftest import FAST, PYTHON, REPO, cli_env, run_cli

# -----------------------------------------------------------------------------------

RESUME = [*FAST, "train.max_steps=16", "train.checkpointing_steps=6", "train.validation_steps=8",
          "train.use_ema=true", "train.ema_decay=0.9", "train.checkpoints_total_limit=2"]


def _train_args(meta: Path, out: Path, *extra: str) -> list[str]:
    args = ["train-dit", "--data", str(meta), "--output", str(out), "--preset", "tiny"]
    for s in RESUME:
        args += ["--set", s]
    return args + list(extra)


def test_resume_after_sigkill_matches_uninterrupted_run(dit_meta, tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    cmd = [PYTHON, "-m", "easyanimate"]
    # both runs at once (one thread each): the uninterrupted one, and the one we kill after its first checkpoint
    ref = subprocess.Popen(cmd + _train_args(dit_meta, full), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(cmd + _train_args(dit_meta, broken), cwd=REPO, env=cli_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (broken / "checkpoints" / "checkpoint-6").is_dir():
            assert victim.poll() is None, "the run ended before writing checkpoint-6"
            assert time.monotonic() < deadline, "no checkpoint-6 within 120 s"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    assert not (broken / "final").exists()  # it really died mid-run
    stdout, stderr = ref.communicate(timeout=180)
    assert ref.returncode == 0, stderr[-3000:]

    resumed = run_cli(_train_args(dit_meta, broken, "--resume", "latest"), timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] and summary["steps"] == 16 and summary["steps_this_run"] < 16

    a = load_file(str(full / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(broken / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= 1e-6, diff  # EMA weights (use_ema) after 16 steps; in practice bit-identical
    ckpts = sorted(p.name for p in (broken / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-12", "checkpoint-6"]  # checkpoints_total_limit=2, no temp folder left

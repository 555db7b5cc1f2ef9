"""FSDP2 (torch ``fully_shard`` per ``TemporalTransformerBlock`` + root, the infra/accelerate/fsdp2.yaml policy) on
two CPU processes (gloo), fused AdamW on the DTensor shards: the training loss follows the one-process full-batch
loss, and a run resumed from a safetensors full-state checkpoint is bit-identical to the uninterrupted run.
(accelerate's own FSDP launch path is GPU-only in accelerate 1.15; see easyanimate.train.fsdp.)"""

from __future__ import annotations

import json
import socket

import pytest


@pytest.fixture(scope="module")
def fsdp2_result(tmp_path_factory):
    import torch.multiprocessing as mp

    from tests.parallel.workers import fsdp2_train

    out = tmp_path_factory.mktemp("fsdp2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fsdp2_train, args=(2, port, str(out), "tiny", 4), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    for r, rec in enumerate(ranks):
        assert rec["ok"], f"rank {r} failed:\n{rec.get('error')}"
    return ranks


def test_fsdp2_two_process_loss_follows_single_process(fsdp2_result):
    rec = fsdp2_result[0]
    assert rec["sharded"], "the model's parameters should be FSDP2 DTensors"
    assert rec["ref_losses"][-1] < rec["ref_losses"][0], f"training should lower the loss: {rec['ref_losses']}"
    for step, (a, b) in enumerate(zip(rec["losses"], rec["ref_losses"], strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: FSDP2 loss {a} vs one-process loss {b}"
    assert rec["param_max_abs_vs_ref"] < 1e-3, f"weights drifted from the one-process run: {rec['param_max_abs_vs_ref']}"
    assert fsdp2_result[1]["losses"] == rec["losses"], "ranks disagree on the (all-reduced) loss"


def test_fsdp2_resume_from_safetensors_is_bit_identical(fsdp2_result):
    rec = fsdp2_result[0]
    # the trainers' checkpoint (save_checkpoint / load_checkpoint): full tensors in safetensors, as one process writes
    assert "transformer/diffusion_pytorch_model.safetensors" in rec["checkpoint_files"], rec["checkpoint_files"]
    assert "optimizer-transformer.safetensors" in rec["checkpoint_files"], rec["checkpoint_files"]
    assert rec["resumed_losses"] == rec["losses"], f"resumed {rec['resumed_losses']} vs straight {rec['losses']}"
    assert rec["resume_bit_identical"], f"resumed weights differ by up to {rec['resume_param_max_abs']}"

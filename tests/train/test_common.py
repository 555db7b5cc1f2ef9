"""Checkpoints (safetensors only, atomic, exact resume), resume resolution, meters and the JSONL tracker."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from easyanimate.tracking import JsonlTracker, NullTracker, Tracker
from easyanimate.train import common
from easyanimate.train.common import (
    Throughput,
    grad_norm,
    latent_tokens,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)


def _objects(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)  # a frozen tensor must round-trip too
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.03, eps=1e-10)
    sched = get_scheduler("constant_with_warmup", optimizer=opt, num_warmup_steps=3, num_training_steps=20)
    ema = EMAModel(params, decay=0.9)
    return model, params, opt, sched, ema


def _step(model, params, opt, sched, ema) -> float:
    x = torch.randn(5, 4)  # global torch RNG: restored by load_checkpoint
    noise = float(np.random.rand()) + random.random()  # numpy / python RNGs too
    loss = (model(x) - noise).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    ema.step(params)
    return loss.item()


def _save(out, step, objs, **kw):
    model, _, opt, sched, ema = objs
    kw.setdefault("keep_last", 3)
    return save_checkpoint(out, step, models={"net": model}, optimizers={"net": opt}, schedulers={"net": sched},
                           ema={"net": ema}, **kw)


def test_round_trip_restores_everything_exactly(tmp_path):
    objs = _objects()
    for _ in range(4):
        _step(*objs)
    extra = {"step": 4, "epoch": 1, "data": {"epoch": 1, "batches_consumed": 2}, "config": {"a": [1, 2], "b": None}}
    path = _save(tmp_path, 4, objs, extra=extra)
    assert path == tmp_path / "checkpoints" / "checkpoint-4"
    expected = [_step(*objs) for _ in range(5)]  # continue the original

    fresh = _objects(seed=123)  # different weights and RNG until loaded
    got_extra = load_checkpoint(path, models={"net": fresh[0]}, optimizers={"net": fresh[2]},
                                schedulers={"net": fresh[3]}, ema={"net": fresh[4]})
    assert got_extra == extra
    got = [_step(*fresh) for _ in range(5)]
    assert got == expected  # bit-exact losses: weights, Adam moments, LR schedule and all RNG streams restored
    for a, b in zip(objs[0].state_dict().values(), fresh[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(objs[4].shadow_params, fresh[4].shadow_params, strict=True):
        assert torch.equal(a, b)
    assert fresh[4].optimization_step == objs[4].optimization_step
    assert fresh[3].get_last_lr() == objs[3].get_last_lr()
    assert fresh[2].state_dict()["param_groups"][0]["betas"] == (0.9, 0.99)


def test_checkpoint_holds_only_safetensors_and_json(tmp_path):
    objs = _objects()
    _step(*objs)
    path = _save(tmp_path, 1, objs)
    files = [p for p in path.rglob("*") if p.is_file()]
    assert files
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
    assert {p.suffix for p in files} <= {".json", ".safetensors"}
    for p in files:
        raw = p.read_bytes()
        assert not raw.startswith(b"PK\x03\x04"), p  # torch.save's zip container
        assert b"_rebuild_tensor" not in raw and b"cnumpy" not in raw and b"ctorch" not in raw, p  # pickle opcodes
        if p.suffix == ".safetensors":
            load_file(str(p))  # parses as safetensors (a JSON header + raw bytes)
        else:
            json.loads(raw)
    rng = load_file(str(path / "rng" / "rank-0.safetensors"))
    assert rng["torch"].dtype == torch.uint8
    assert json.loads((path / "rng" / "rank-0.json").read_text())["python"]


def test_failure_mid_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    objs = _objects()
    _step(*objs)
    _save(tmp_path, 1, objs)
    real = common.save_tree

    def failing(tree, folder, stem):
        if stem.startswith("scheduler-"):  # after weights and optimizer were written
            raise OSError("disk full")
        return real(tree, folder, stem)

    monkeypatch.setattr(common, "save_tree", failing)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, objs)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-1"]  # no checkpoint-2, no temp folder left behind
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"


def test_stale_temp_folder_is_ignored_and_cleaned(tmp_path):
    objs = _objects()
    stale = tmp_path / "checkpoints" / ".tmp-checkpoint-7-deadbeef"
    stale.mkdir(parents=True)
    (stale / "net").mkdir()  # what a SIGKILL mid-save leaves
    assert latest_checkpoint(tmp_path) is None
    _save(tmp_path, 3, objs)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-3"]


def test_keep_last_prunes_oldest(tmp_path):
    objs = _objects()
    for step in (1, 2, 3, 10, 11):
        _step(*objs)
        _save(tmp_path, step, objs, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-11"]
    _save(tmp_path, 12, objs, keep_last=0)  # 0 keeps everything
    assert len(list_checkpoints(tmp_path)) == 3


def test_resave_same_step_replaces(tmp_path):
    objs = _objects()
    _save(tmp_path, 5, objs, extra={"v": 1})
    _save(tmp_path, 5, objs, extra={"v": 2})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-5"]
    fresh = _objects()
    assert load_checkpoint(tmp_path / "checkpoints" / "checkpoint-5", models={"net": fresh[0]}, optimizers={},
                           schedulers={})["v"] == 2


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "") is None
    assert resolve_resume(tmp_path, "latest") is None  # nothing yet: start fresh
    objs = _objects()
    for step in (2, 9):
        _save(tmp_path, step, objs)
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoints" / "checkpoint-9"
    explicit = tmp_path / "checkpoints" / "checkpoint-2"
    assert resolve_resume(tmp_path, str(explicit)) == explicit
    assert resolve_resume(tmp_path, "checkpoint-2") == explicit  # bare name under output/checkpoints
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "empty"))


def test_load_names_missing_parts(tmp_path):
    objs = _objects()
    path = save_checkpoint(tmp_path, 1, models={"net": objs[0]}, optimizers={}, schedulers={}, keep_last=1)
    with pytest.raises(KeyError, match="no optimizer"):
        load_checkpoint(path, models={"net": objs[0]}, optimizers={"net": objs[2]}, schedulers={})


def test_diffusers_model_part_loads_with_from_pretrained(tmp_path, tiny_config):
    from easyanimate.models.transformer3d import Transformer3DModel

    torch.manual_seed(0)
    model = Transformer3DModel(**tiny_config.model.transformer.to_model_kwargs())
    path = save_checkpoint(tmp_path, 1, models={"transformer": model}, optimizers={}, schedulers={}, keep_last=1)
    loaded = Transformer3DModel.from_pretrained(path / "transformer")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_trainable_only_stores_the_trainable_part(tmp_path):
    objs = _objects()
    _step(*objs)
    path = _save(tmp_path, 1, objs, trainable_only=True)
    stored = load_file(str(path / "net" / "model.safetensors"))
    assert set(stored) == {"0.bias", "2.weight", "2.bias"}  # 0.weight is frozen
    fresh = _objects(seed=5)
    frozen_before = fresh[0][0].weight.clone()
    load_checkpoint(path, models={"net": fresh[0]}, optimizers={}, schedulers={})
    assert torch.equal(fresh[0][2].weight, objs[0][2].weight)
    assert torch.equal(fresh[0][0].weight, frozen_before)  # untouched


def test_meters():
    assert latent_tokens((2, 4, 3, 8, 12), 2) == 2 * 3 * 4 * 6
    meter = Throughput(window=5)
    assert meter.samples_per_s == 0.0
    for _ in range(3):
        meter.update(4, 100)
    assert meter.samples_per_s > 0 and meter.tokens_per_s == pytest.approx(25 * meter.samples_per_s)
    assert meter.total_samples == 12
    lin = torch.nn.Linear(3, 1)
    lin.weight.grad = torch.tensor([[3.0, 0.0, 0.0]])
    lin.bias.grad = torch.tensor([4.0])
    assert grad_norm(lin.parameters()) == pytest.approx(5.0)
    assert grad_norm([torch.nn.Parameter(torch.ones(1))]) == 0.0


def test_jsonl_tracker(tmp_path):
    tracker = JsonlTracker(tmp_path / "run")
    assert isinstance(tracker, Tracker) and isinstance(NullTracker(), Tracker)
    tracker.log_params({"train.lr": 1e-3, "model": {"layers": 4}})
    tracker.log_params({"seed": 1})
    tracker.log_metrics({"loss": torch.tensor(0.5), "bad": float("nan")}, step=3)
    tracker.log_metrics({"loss": 0.25}, step=4)
    tracker.log_artifact(tmp_path / "x.mp4", "samples")
    tracker.close()
    assert json.loads((tmp_path / "run" / "params.json").read_text()) == {
        "train.lr": 1e-3, "model": {"layers": 4}, "seed": 1}
    rows = tracker.read_metrics()
    assert [(r["step"], r["loss"]) for r in rows] == [(3, 0.5), (4, 0.25)] and rows[0]["bad"] is None
    art = json.loads((tmp_path / "run" / "artifacts.jsonl").read_text())
    assert art["artifact_path"] == "samples" and art["path"].endswith("x.mp4")

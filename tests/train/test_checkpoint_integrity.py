"""Checkpoints carry a sha256 manifest written last; resume verifies it and falls back to the newest intact one,
saying which it skipped and why; a resumed run does not log the same steps twice."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from easyanimate.train.common import (
    MANIFEST,
    drop_metrics_after,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)

from .conftest import tiny_cfg


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))


def _save(out, step: int, model) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(out, step, models={"net": model}, optimizers={"net": opt}, schedulers={},
                    extra={"step": step}, keep_last=0)


def _weights(out, step: int):
    return out / "checkpoints" / f"checkpoint-{step}" / "net" / "model.safetensors"


def _flip_bit(path, offset_from_end: int = 7) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0x10  # one bit of one weight: the file still parses as safetensors
    path.write_bytes(bytes(raw))


def _truncate(path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def test_manifest_lists_every_file_and_is_verified(tmp_path):
    _save(tmp_path, 1, _net(0))
    ckpt = tmp_path / "checkpoints" / "checkpoint-1"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert manifest["algorithm"] == "sha256" and set(manifest["files"]) == files
    assert "checkpoint.json" in files and "net/model.safetensors" in files
    assert verify_checkpoint(ckpt) is None

    (ckpt / "stray.bin").write_bytes(b"x")
    assert "stray.bin is not in the manifest" in verify_checkpoint(ckpt)
    (ckpt / "stray.bin").unlink()
    (ckpt / MANIFEST).write_text("{not json")
    assert "unreadable sha256.json" in verify_checkpoint(ckpt)
    (ckpt / MANIFEST).unlink()
    assert "no sha256.json manifest" in verify_checkpoint(ckpt)


@pytest.mark.parametrize("damage", [_flip_bit, _truncate], ids=["bit-flip", "truncated"])
def test_latest_skips_a_damaged_newest_checkpoint(tmp_path, caplog, damage):
    older, newer = _net(1), _net(2)
    _save(tmp_path, 2, older)
    _save(tmp_path, 4, newer)
    damage(_weights(tmp_path, 4))

    with caplog.at_level(logging.WARNING, logger="easyanimate.train.common"):
        chosen = resolve_resume(tmp_path, "latest")
    assert chosen.name == "checkpoint-2"
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint-4" in r.getMessage()]
    expected = "truncated" if damage is _truncate else "does not match its sha256"
    assert skipped and "net/model.safetensors" in skipped[0] and expected in skipped[0], caplog.text

    fresh = _net(3)
    assert load_checkpoint(chosen, models={"net": fresh}, optimizers={}, schedulers={})["step"] == 2
    for a, b in zip(older.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the intact previous checkpoint's weights, exactly

    with pytest.raises(ValueError, match="checkpoint-4 is damaged: file net/model.safetensors"):
        resolve_resume(tmp_path, "checkpoint-4")  # named explicitly: refused, not silently replaced


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _save(tmp_path, 1, _net(0))
    _truncate(_weights(tmp_path, 1))
    with pytest.raises(ValueError, match=r"no intact checkpoint .*checkpoint-1: file net/model.safetensors has"):
        resolve_resume(tmp_path, "latest")


def test_drop_metrics_after(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    assert drop_metrics_after(tmp_path, 2) == 3  # steps 3 and 4, and the torn line of the killed run
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert drop_metrics_after(tmp_path / "nothing-here", 2) == 0


def test_train_dit_resumes_past_a_truncated_checkpoint_without_duplicate_metrics(dit_meta, tmp_path, caplog):
    from easyanimate.train.dit import train_dit

    base = ["train.checkpointing_steps=1", "train.log_every=1", "train.validation_steps=0",
            "train.checkpoints_total_limit=3", "train.sample_steps=1"]
    out = tmp_path / "run"
    train_dit(tiny_cfg(*base, "train.max_steps=2"), dit_meta, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    _truncate(out / "checkpoints" / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors")

    with caplog.at_level(logging.WARNING, logger="easyanimate.train.common"):
        summary = train_dit(tiny_cfg(*base, "train.max_steps=3"), dit_meta, out, resume="latest")
    assert summary["resumed_from"].endswith("checkpoint-1") and summary["steps"] == 3
    assert "skipping checkpoint-2: file transformer/diffusion_pytorch_model.safetensors has" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3], steps  # step 2 of the first run was dropped, then logged again


def test_cli_refusals_are_one_line_naming_the_file(tmp_path, capsys):
    """What train-dit/train-vae print for a bad input: one ``error:`` line naming the file, exit code 2."""
    import typer

    from easyanimate.cli import _refuse

    bad = tmp_path / "meta.json"
    bad.write_text("[{not json")
    cases = []
    try:
        json.loads(bad.read_text())
    except ValueError as exc:
        cases.append((exc, f"error: {bad}: not valid JSON (Expecting property name"))
    cases.append((FileNotFoundError(2, "No such file or directory", str(tmp_path / "x.json")),
                  f"error: [Errno 2] No such file or directory: '{tmp_path / 'x.json'}'"))
    cases.append((ValueError("the dataset is empty\n(no readable entries)"),
                  f"error: --data {bad}: the dataset is empty (no readable entries)"))
    cases.append((ValueError("--resume latest: no intact checkpoint under /r/checkpoints (checkpoint-2: file x)"),
                  "error: --resume latest: no intact checkpoint under /r/checkpoints"))
    for exc, expected in cases:
        with pytest.raises(typer.Exit) as info:
            _refuse(exc, bad)
        assert info.value.exit_code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(expected), err

"""The DiT trainer: V2's learned-range loss, overfitting real clips, 2-process DDP (exact resume after SIGKILL is in
test_dit_resume.py, to keep each file short)."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easyanimate.train.dit import GaussianDiffusion, TextEmbeddingCache, make_noise_scheduler, train_dit

from .conftest import FAST, PYTHON, REPO, cli_env, tiny_cfg


@pytest.fixture
def one_thread():
    """The tiny model is faster on one thread on this shared 2-core machine (and numerics stay fixed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- (a) the loss -----------------------------------------------------------------------------------------------------


def _phi(x: float) -> float:  # guided-diffusion's tanh approximation of the normal CDF
    return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def test_learned_range_vlb_matches_hand_computation():
    betas = [0.1, 0.2]
    diffusion = GaussianDiffusion(torch.tensor(betas))
    a = [1 - b for b in betas]
    ac = [a[0], a[0] * a[1]]  # 0.9, 0.72
    pv1 = betas[1] * (1 - ac[0]) / (1 - ac[1])  # posterior variance at t=1; t=0 is clipped to it
    coef1 = [1.0, betas[1] * math.sqrt(ac[0]) / (1 - ac[1])]
    coef2 = [0.0, (1 - ac[0]) * math.sqrt(a[1]) / (1 - ac[1])]

    # sample 0 at t=1 (KL term), sample 1 at t=0 (decoder NLL term); one latent channel, one pixel
    x0, xt = [0.5, 0.5], [0.3, 0.45]
    eps_hat, v = [0.2, -0.1], [0.4, -0.5]
    t = torch.tensor([1, 0])
    out = torch.tensor([[eps_hat[0], v[0]], [eps_hat[1], v[1]]]).view(2, 2, 1, 1, 1)
    x0_t, xt_t = torch.tensor(x0).view(2, 1, 1, 1, 1), torch.tensor(xt).view(2, 1, 1, 1, 1)
    got = diffusion.vlb_terms(out, x0_t, xt_t, t)

    # t = 1: KL(q(x0|x1,x0) || p(x0|x1)) in bits
    pred_x0 = math.sqrt(1 / ac[1]) * xt[0] - math.sqrt(1 / ac[1] - 1) * eps_hat[0]
    model_mean = coef1[1] * pred_x0 + coef2[1] * xt[0]
    true_mean = coef1[1] * x0[0] + coef2[1] * xt[0]
    frac = (v[0] + 1) / 2
    log_var = frac * math.log(betas[1]) + (1 - frac) * math.log(pv1)
    kl = 0.5 * (-1 + log_var - math.log(pv1) + math.exp(math.log(pv1) - log_var)
                + (true_mean - model_mean) ** 2 * math.exp(-log_var))
    assert got[0].item() == pytest.approx(kl / math.log(2), rel=1e-5)

    # t = 0: -log P(x0 in its 2/255 bin) under N(model mean, learned variance), in bits
    pred_x0 = math.sqrt(1 / ac[0]) * xt[1] - math.sqrt(1 / ac[0] - 1) * eps_hat[1]
    mean0 = coef1[0] * pred_x0 + coef2[0] * xt[1]
    frac = (v[1] + 1) / 2
    sigma = math.exp(0.5 * (frac * math.log(betas[0]) + (1 - frac) * math.log(pv1)))
    p_bin = _phi((x0[1] - mean0 + 1 / 255) / sigma) - _phi((x0[1] - mean0 - 1 / 255) / sigma)
    assert got[1].item() == pytest.approx(-math.log(p_bin) / math.log(2), rel=1e-4)
    exact = 0.5 * (math.erf((x0[1] - mean0 + 1 / 255) / sigma / math.sqrt(2))
                   - math.erf((x0[1] - mean0 - 1 / 255) / sigma / math.sqrt(2)))
    assert got[1].item() == pytest.approx(-math.log(exact) / math.log(2), rel=1e-2)  # the approximation is close


def test_vlb_is_zero_for_the_true_posterior_and_mean_is_frozen():
    diffusion = GaussianDiffusion.from_scheduler(make_noise_scheduler(1000))
    assert diffusion.betas[0].item() == pytest.approx(1e-4) and diffusion.betas[-1].item() == pytest.approx(0.02)
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    t = torch.tensor([10, 500])
    xt = make_noise_scheduler(1000).add_noise(x0, noise, t)
    v_true = -torch.ones_like(x0)  # frac = 0: the model variance is the clipped posterior variance
    zero = diffusion.vlb_terms(torch.cat([noise, v_true], 1), x0, xt, t)
    assert zero.abs().max().item() < 1e-3

    eps = (noise + 0.3 * torch.randn_like(noise)).requires_grad_(True)
    v = torch.zeros_like(x0, requires_grad=True)
    terms = diffusion.training_losses(torch.cat([eps, v], 1), x0, xt, t, noise)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    assert torch.allclose(terms["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3, 4)))
    grad_eps_vb, grad_v = torch.autograd.grad(terms["vb"].sum(), [eps, v], allow_unused=True)
    assert grad_eps_vb is None or grad_eps_vb.abs().max().item() == 0.0  # the VLB sees a frozen mean
    assert grad_v.abs().sum().item() > 0  # and trains the variance


# --- (b) overfitting real clips ---------------------------------------------------------------------------------------

# Measured on this machine (tiny preset + FAST, 60 steps; train, data and init seeds 0-7 varied together):
# last-20% / first-20% mean loss = 0.54, 0.60, 0.54, 0.60, 0.54, 0.50, 0.39, 0.54 (worst: 40% lower); asked: >= 25%.
MARGIN = 0.25


def test_dit_overfits_and_final_folder_generates(dit_meta, tmp_path, one_thread):
    out = tmp_path / "run"
    cfg = tiny_cfg("train.max_steps=60", "train.validation_steps=30", "train.checkpointing_steps=0")
    summary = train_dit(cfg, dit_meta, out)
    assert summary["steps"] == 60
    assert summary["loss_last_20pct"] <= (1 - MARGIN) * summary["loss_first_20pct"], summary
    assert math.isfinite(summary["val_loss"]) and summary["samples_per_s"] > 0

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "lr" in r]
    assert [r["step"] for r in train_rows] == list(range(5, 61, 5))
    assert {"loss", "mse", "vb", "grad_norm", "lr", "samples_per_s", "tokens_per_s"} <= set(train_rows[-1])
    val_rows = [r for r in rows if "val_loss_t400" in r]
    assert [r["step"] for r in val_rows] == [30, 60]
    assert val_rows[-1]["val_loss"] < val_rows[0]["val_loss"] * 1.5  # finite and not exploding
    params = json.loads((out / "params.json").read_text())
    assert params["train.max_steps"] == 60 and params["model.transformer.num_layers"] == 4
    assert (out / "samples" / "step-30.mp4").stat().st_size > 0 and (out / "samples" / "step-60.mp4").is_file()
    artifacts = (out / "artifacts.jsonl").read_text()
    assert "step-60.mp4" in artifacts and '"final"' in artifacts
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    cache = load_file(str(out / "cache" / "text_embeddings.safetensors"))  # once per caption, "" for dropout too
    assert f"{TextEmbeddingCache.key('')}.embeds" in cache and len(cache) == 2 * (7 + 1)

    # the final folder is a pipeline folder: what `easyanimate generate --model out/final` builds
    from easyanimate.pipeline import EasyAnimatePipeline, build_pipeline

    pipe = EasyAnimatePipeline.from_pretrained(out / "final")
    trained = load_file(str(out / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(pipe.transformer.state_dict()["proj_out.weight"], trained["proj_out.weight"])
    pipe = build_pipeline(dataclasses.replace(cfg.model, pretrained=str(out / "final")))
    video = pipe("a cyclist rides along a street", num_frames=9, height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), show_progress=False).videos
    assert video.shape == (1, 3, 9, 32, 32) and torch.isfinite(video).all()


def test_training_knobs_run_together(dit_meta, tmp_path, one_thread):
    """bf16 autocast, gradient checkpointing, accumulation, EMA, latent caching, on-the-fly captions, batches of 2."""
    out = tmp_path / "knobs"
    cfg = tiny_cfg("train.max_steps=4", "train.gradient_checkpointing=true", "train.mixed_precision=bf16",
                   "train.use_ema=true", "train.cache_latents=true", "train.cache_text_embeddings=false",
                   "train.gradient_accumulation_steps=2", "train.validation_steps=4", "train.checkpointing_steps=2",
                   "data.random_frame_crop=true", "data.caption_dropout=0.5", "data.batch_size=2")
    summary = train_dit(cfg, dit_meta, out)
    assert summary["steps"] == 4 and math.isfinite(summary["final_loss"]) and math.isfinite(summary["val_loss"])
    rows = [json.loads(line) for line in (out / "rank-0-samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "step" in r] == [1, 1, 2, 2, 3, 3, 4, 4]  # 2 micro-batches per step
    assert (out / "checkpoints" / "checkpoint-4" / "transformer_ema" / "ema.safetensors").is_file()
    assert (out / "final" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (out / "cache" / "text_embeddings.safetensors").exists()


# --- (d) two-process DDP on CPU ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_shards_data_and_keeps_replicas_identical(dit_meta, tmp_path):
    out = tmp_path / "ddp"
    env = {**cli_env(), "ACCELERATE_USE_CPU": "1"}
    accelerate = Path(PYTHON).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "easyanimate", "train-dit", "--data", str(dit_meta), "--output", str(out), "--preset", "tiny"]
    for s in [*FAST, "train.max_steps=6", "train.checkpointing_steps=3", "train.validation_steps=6"]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"steps"')]
    assert summaries and all(s["world_size"] == 2 and s["steps"] == 6 for s in summaries)  # every rank reports

    logs = {}
    for r in (0, 1):
        rows = [json.loads(line) for line in (out / f"rank-{r}-samples.jsonl").read_text().splitlines()]
        logs[r] = rows
    by_epoch: dict[int, dict[int, set]] = {}
    for r, rows in logs.items():
        for row in rows:
            if "index" in row:
                by_epoch.setdefault(row["epoch"], {0: set(), 1: set()})[r].update(row["index"])
    assert set(by_epoch) == {0, 1}  # 6 clips, 2 ranks, batch 1: 3 steps per epoch
    for shards in by_epoch.values():
        assert shards[0] and shards[1] and not shards[0] & shards[1]  # disjoint shards
        assert len(shards[0] | shards[1]) == 6  # together: the whole training set
    digests = {r: rows[-1]["weights_sha256"] for r, rows in logs.items()}
    assert digests[0] == digests[1]  # identical replicas after 6 DDP steps
    ckpt = out / "checkpoints" / "checkpoint-6"
    assert (ckpt / "rng" / "rank-0.safetensors").is_file() and (ckpt / "rng" / "rank-1.safetensors").is_file()
    assert (out / "final" / "model_index.json").is_file()

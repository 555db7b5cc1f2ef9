"""``train.prediction_type`` (epsilon | v_prediction | sample) and ``train.zero_terminal_snr``: the loss targets, the
rescaled noise schedule, config checks, and a trained pipeline whose saved scheduler samples what it was trained for."""

from __future__ import annotations

import json
import math

import pytest
import torch

from easyanimate.config import ConfigError, load_config
from easyanimate.schedulers import make_scheduler, model_scheduler_kwargs, training_scheduler_kwargs
from easyanimate.train.dit import GaussianDiffusion, make_noise_scheduler, train_dit

from .conftest import tiny_cfg


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, 2, 4, 4, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 500, 999])
    return x0, noise, t


@pytest.mark.parametrize("zero_snr", [False, True])
def test_v_and_x0_targets_are_zero_loss_for_the_true_value_and_variance_channels_get_no_loss(zero_snr):
    scheduler = make_noise_scheduler(1000, zero_snr)
    x0, noise, t = _batch()
    x_t = scheduler.add_noise(x0, noise, t)
    truths = {"sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}
    for kind, truth in truths.items():
        diffusion = GaussianDiffusion.from_scheduler(scheduler, kind)
        variance = torch.randn(x0.shape, requires_grad=True)
        terms = diffusion.training_losses(torch.cat([truth, variance], 1), x0, x_t, t, noise)
        assert torch.allclose(terms["loss"], torch.zeros(3), atol=1e-9), kind
        terms["loss"].sum().backward()
        assert variance.grad is None or not variance.grad.any()  # nothing trains the V2 variance half
        wrong = diffusion.training_losses(truth + 0.5, x0, x_t, t, noise)
        assert torch.allclose(wrong["mse"], torch.full((3,), 0.25)) and not wrong["vb"].any()
    # the ε model keeps V2's loss: the ε target, plus the VLB of the variance half
    eps = GaussianDiffusion.from_scheduler(make_noise_scheduler(1000), "epsilon")
    x_t = make_noise_scheduler(1000).add_noise(x0, noise, t)
    terms = eps.training_losses(torch.cat([noise, torch.zeros_like(noise)], 1), x0, x_t, t, noise)
    assert torch.allclose(terms["mse"], torch.zeros(3)) and terms["vb"].gt(0).any()


def test_zero_terminal_snr_makes_the_last_step_pure_noise():
    v2 = make_noise_scheduler(1000).alphas_cumprod
    rescaled = make_noise_scheduler(1000, zero_terminal_snr=True).alphas_cumprod
    assert float(v2[-1]) > 1e-5 and float(rescaled[-1]) < 1e-9
    assert torch.allclose(rescaled[0], v2[0], atol=1e-6)  # the clean end is unchanged


def test_config_checks_the_prediction_type_and_its_pairing_with_zero_snr():
    with pytest.raises(ConfigError, match=r"train.prediction_type: expected one of epsilon, v_prediction, sample, "
                                          r"got 'x0'"):
        load_config("tiny", ["train.prediction_type=x0"])
    with pytest.raises(ConfigError, match="train.zero_terminal_snr: expected .* got epsilon"):
        load_config("tiny", ["train.zero_terminal_snr=true"])
    cfg = load_config("tiny", ["train.prediction_type=v_prediction", "train.zero_terminal_snr=true"])
    assert training_scheduler_kwargs(cfg.train.prediction_type, cfg.train.zero_terminal_snr) == {
        "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    assert training_scheduler_kwargs("epsilon", False) == {}


def test_swapping_the_sampler_keeps_what_the_model_predicts():
    trained = make_scheduler("DDIM", **training_scheduler_kwargs("sample", True))
    for name in ("Euler", "Euler A", "DPM++", "DDIM"):
        swapped = make_scheduler(name, **model_scheduler_kwargs(trained))
        assert swapped.config.prediction_type == "sample" and swapped.config.rescale_betas_zero_snr, name
        assert swapped.config.timestep_spacing == "trailing"
    with pytest.raises(ValueError, match="sampler 'PNDM' cannot sample a model trained with a zero terminal SNR"):
        make_scheduler("PNDM", **model_scheduler_kwargs(trained))
    assert model_scheduler_kwargs(make_scheduler("PNDM")) == {}  # V2's ε models swap as before


def test_a_sample_prediction_run_saves_a_pipeline_that_samples_x0(dit_meta, tmp_path):
    out = tmp_path / "x0"
    cfg = tiny_cfg("train.max_steps=3", "train.validation_steps=3", "train.checkpointing_steps=0",
                   "train.prediction_type=sample", "train.zero_terminal_snr=true")
    summary = train_dit(cfg, dit_meta, out)
    assert summary["steps"] == 3 and math.isfinite(summary["val_loss"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["vb"] == 0 for r in rows if "vb" in r)
    saved = json.loads((out / "final" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "sample" and saved["rescale_betas_zero_snr"] is True
    assert saved["timestep_spacing"] == "trailing"

    from easyanimate.pipeline import EasyAnimatePipeline

    pipe = EasyAnimatePipeline.from_pretrained(out / "final", sampler="Euler")
    assert pipe.scheduler.config.prediction_type == "sample" and pipe.scheduler.config.rescale_betas_zero_snr
    pipe.set_sampler("DDIM")
    assert pipe.scheduler.config.prediction_type == "sample"
    video = pipe("a cyclist rides along a street", num_frames=9, height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), show_progress=False).videos
    assert video.shape == (1, 3, 9, 32, 32) and torch.isfinite(video).all()


def test_validation_loss_is_in_epsilon_terms_for_every_prediction_type():
    """x0 or v turned into the noise they imply: the true value gives ε exactly, so val_loss compares across types."""
    for zero_snr, kind in ((False, "sample"), (True, "sample"), (True, "v_prediction")):
        scheduler = make_noise_scheduler(1000, zero_snr)
        x0, noise, t = _batch(1)
        t = torch.tensor([100, 400, 700])
        x_t = scheduler.add_noise(x0, noise, t)
        truth = x0 if kind == "sample" else scheduler.get_velocity(x0, noise, t)
        eps = GaussianDiffusion.from_scheduler(scheduler, kind).to_epsilon(truth, x_t, t)
        assert torch.allclose(eps, noise, atol=1e-4), (kind, zero_snr)


def test_triton_refuses_pndm_for_a_zero_snr_model_as_the_requests_error():
    """The server's per-request sampler swap: PNDM on a zero-SNR model is a clear SAMPLER error, the model untouched."""
    from easyanimate.config import load_config as load
    from easyanimate.pipeline import build_pipeline
    from serving.request import GenerationRequest, Limits, RequestError, v2_defaults
    from serving.triton_model import LoadedModel, generate

    pipe = build_pipeline(load("tiny").model)
    pipe.scheduler = make_scheduler("DDIM", **training_scheduler_kwargs("sample", True))
    model = LoadedModel(pipe=pipe, limits=Limits(), defaults=v2_defaults(), info={"device": "cpu"}, load_seconds=0.0)
    req = GenerationRequest(**{**v2_defaults(), "prompt": "a", "num_frames": 9, "height": 32, "width": 32,
                               "steps": 1, "sampler": "PNDM"})
    with pytest.raises(RequestError, match=r"^SAMPLER: sampler 'PNDM' cannot sample a model trained with a zero "
                                           r"terminal SNR"):
        generate(model, req)
    assert pipe.scheduler.config.prediction_type == "sample" and not model.lock.locked()

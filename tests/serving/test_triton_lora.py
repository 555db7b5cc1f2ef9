"""LoRA per request on a real ``tritonserver`` (tiny model): ``LORA`` names a file in the server's ``--lora-dir``,
``LORA_ALPHA`` scales it; it is merged for that request only and the exact base weights come back after."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from easyanimate.models.lora import lora_key
from serving import client
from serving.launch import TritonServer
from serving.request import RequestError, parse_request, to_inputs

SMALL = {"num_frames": 9, "height": 32, "width": 48, "steps": 2, "seed": 11}
PROMPT = "a lighthouse at dusk"
SMALL_CLI = {"--frames": 9, "--height": 32, "--width": 48, "--steps": 2, "--seed": 11}  # SMALL as CLI options


def _tiny_linears() -> dict[str, torch.nn.Linear]:
    from easyanimate.config import load_config
    from easyanimate.models.transformer3d import Transformer3DModel

    with torch.device("meta"):  # names and shapes only
        model = Transformer3DModel(**load_config("tiny").model.transformer.to_model_kwargs())
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _write_official_lora(path, rank=4, alpha=2.0, seed=1, scale=0.5, break_last=False):
    """An official-format (``lora_unet__…``) LoRA for every Linear of the tiny transformer; ``break_last`` gives the
    last module a shape that does not fit (all the others do)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    linears = list(_tiny_linears().items())
    for i, (name, m) in enumerate(linears):
        key = lora_key(name)
        in_features = m.in_features + (3 if break_last and i == len(linears) - 1 else 0)
        tensors[f"{key}.lora_down.weight"] = (scale * torch.randn(rank, in_features, generator=g)).to(torch.bfloat16)
        tensors[f"{key}.lora_up.weight"] = (scale * torch.randn(m.out_features, rank, generator=g)).to(torch.bfloat16)
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    _write_official_lora(folder / "style.safetensors")
    _write_official_lora(folder / "half_fits.safetensors", seed=2, break_last=True)
    save_file({"lora_unet__nope_layer.lora_down.weight": torch.zeros(2, 4),
               "lora_unet__nope_layer.lora_up.weight": torch.zeros(4, 2)}, str(folder / "other_arch.safetensors"))
    (folder / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path_factory.getbasetemp() / "outside.safetensors").write_bytes(b"x")
    return folder


@pytest.mark.slow
def test_lora_applied_per_request_and_unmerged_after(lora_dir, tmp_path_factory):
    server = TritonServer("tiny", models=["easyanimate"], exit_timeout=5, lora_dir=lora_dir,
                          parameters={"torch_threads": "1"},
                          env={"EASYANIMATE_MODEL_CACHE": str(tmp_path_factory.mktemp("model_cache"))})
    with server:
        http = server.http_url.removeprefix("http://")
        assert server.model_config("easyanimate")["parameters"]["lora_dir"]["string_value"] == str(lora_dir.resolve())

        def run(**params):
            return client.infer_http(http, to_inputs(PROMPT, **{**SMALL, **params}))

        def ready():
            assert server.is_live() and server.is_ready("easyanimate")

        base = run()
        assert base.metadata["parameters"]["lora"] == "" and base.metadata["parameters"]["lora_alpha"] == 0.55
        styled = client.infer_grpc(server.grpc_url, to_inputs(PROMPT, **SMALL, lora="style.safetensors"))
        assert styled.data != base.data
        assert styled.metadata["parameters"]["lora"] == "style.safetensors"
        assert math.isclose(styled.metadata["parameters"]["lora_alpha"], 0.55, rel_tol=1e-6)
        assert run().data == base.data  # unmerged: the base weights, bit for bit
        stronger = run(lora="style.safetensors", lora_alpha=1.5)
        assert stronger.data not in (base.data, styled.data)
        assert run(lora="style.safetensors").data == styled.data  # the same LoRA + alpha: the same video

        bad = {
            "../x.safetensors": "LORA must be the name of a .safetensors file in the server's LoRA folder, not a path",
            "/etc/passwd": "not a path",
            "../outside.safetensors": "not a path",
            "missing.safetensors": "LORA 'missing.safetensors' is not in the server's LoRA folder",
            "other_arch.safetensors": "cannot be applied to this model: other_arch.safetensors: 1 LoRA module(s) "
                                      "match no Linear",
            "half_fits.safetensors": "does not fit weight",
            "corrupt.safetensors": "LORA 'corrupt.safetensors' cannot be applied to this model",
        }
        for name, expected in bad.items():
            with pytest.raises(client.ServerError) as info:
                run(lora=name)
            assert expected in str(info.value), f"{name}: {info.value}"
            ready()
        for alpha in (float("nan"), 3.0):
            with pytest.raises(client.ServerError, match=r"^LORA_ALPHA must be a finite number between 0 and 2"):
                run(lora="style.safetensors", lora_alpha=alpha)
            ready()
        # nothing was left merged by the refused files (half_fits matches all but one module)
        assert run().data == base.data

        # the CLI passes --lora to the server by name (the server resolves it in its own folder)
        from typer.testing import CliRunner

        from easyanimate.cli import app

        out = tmp_path_factory.mktemp("cli") / "styled.mp4"
        args = ["generate", "--server", server.http_url, "--prompt", PROMPT, "--out", str(out),
                *[x for k, v in SMALL_CLI.items() for x in (k, str(v))]]
        res = CliRunner().invoke(app, [*args, "--lora", str(lora_dir / "style.safetensors"), "--lora-scale", "0.55"])
        assert res.exit_code == 0, res.output
        assert out.read_bytes() == styled.data


def test_in_process_lora_without_a_folder_and_exact_restore(lora_dir):
    from serving.triton_model import _digest_modules, generate, load_model

    torch.set_num_threads(2)
    plain = load_model("tiny", device="cpu")
    req = parse_request(to_inputs(PROMPT, **{**SMALL, "steps": 1}, lora="style.safetensors"), plain.defaults,
                        plain.limits)
    with pytest.raises(RequestError, match=r"this server has no LoRA folder \(start it with --lora-dir\)"):
        generate(plain, req)

    model = load_model("tiny", device="cpu", dtype="bfloat16", lora_dir=str(lora_dir))  # bf16: rounding shows
    before = _digest_modules(model.pipe.transformer)
    data, _, meta = generate(model, req)
    assert meta["parameters"]["lora"] == "style.safetensors"
    assert _digest_modules(model.pipe.transformer) == before  # the exact weights, not merge-then-subtract
    failing = parse_request(to_inputs(PROMPT, **{**SMALL, "steps": 1}, lora="half_fits.safetensors"), model.defaults,
                            model.limits)
    with pytest.raises(RequestError, match="does not fit weight"):
        generate(model, failing)
    assert _digest_modules(model.pipe.transformer) == before
    assert not model.lock.locked()
    assert isinstance(data, bytes) and np.frombuffer(data[:8], np.uint8).size == 8


def test_launcher_and_cli_refuse_a_missing_lora_dir(tmp_path):
    from typer.testing import CliRunner

    from easyanimate.cli import app

    with pytest.raises(FileNotFoundError, match="is not a folder"):
        TritonServer("tiny", lora_dir=tmp_path / "nope")
    result = CliRunner().invoke(app, ["serve", "--lora-dir", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "Invalid value: --lora-dir" in result.output

"""Worker functions for the two-process (gloo) parallel tests; run by ``torch.multiprocessing.spawn``.

Each worker joins a gloo group on a loopback TCP store, does its part and writes ``rank-<r>.json`` (rank 0 also
the comparison numbers) into the result folder; the test reads them.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path


def _join(rank: int, world: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _model(preset: str, overrides: list[str]):
    import torch

    from easyanimate.config import load_config
    from easyanimate.models.transformer3d import Transformer3DModel

    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = Transformer3DModel(**cfg.model.transformer.to_model_kwargs()).eval()
    # non-zero U-ViT skips and motion-module outputs: otherwise both start as exact zeros and hide layout errors
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "long_connect_fc" in name or "attn_temporal" in name and "proj_out" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return cfg, model


def _inputs(cfg, batch: int, frames: int, size: int):
    import torch

    t = cfg.model.transformer
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 12, dtype=torch.long)
    mask[0, 7:] = 0  # padding in one caption: the cross-attention mask must stay right
    return {"hidden_states": torch.randn(batch, t.in_channels, frames, size, size, generator=g),
            "timestep": torch.tensor([999, 500][:batch] * (batch // 2 or 1))[:batch],
            "encoder_hidden_states": torch.randn(batch, 12, t.caption_channels, generator=g),
            "encoder_attention_mask": mask}


def equality(rank: int, world: int, port: int, out_dir: str, cases: list[dict]) -> None:
    """For each case: single-process output of a fresh model, then the same model under ``apply_parallel``."""
    try:
        import torch

        from easyanimate.parallel import apply_parallel

        _join(rank, world, port)
        results = []
        for case in cases:
            cfg, ref_model = _model(case["preset"], case.get("overrides", []))
            inputs = _inputs(cfg, case["batch"], case["frames"], case["size"])
            with torch.no_grad():
                ref = ref_model(**inputs, return_dict=False)[0]
            _, model = _model(case["preset"], case.get("overrides", []))
            setting = apply_parallel(model, case["parallel"])
            if case.get("local_group_norm"):  # negative control: per-rank GroupNorm statistics (what V2 must avoid)
                from easyanimate.parallel import ContextParallelGroupNorm

                for module in model.modules():
                    norm = getattr(module, "norm", None)
                    if isinstance(norm, ContextParallelGroupNorm):
                        plain = torch.nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps)
                        plain.weight, plain.bias = norm.weight, norm.bias
                        module.norm = plain
            with torch.no_grad():
                out = model(**inputs, return_dict=True).sample
                out2 = model(**inputs, return_dict=False)[0]  # a second call: hooks keep no stale state
            results.append({"name": case["name"], "parallel": str(setting), "shape": list(out.shape),
                            "ref_shape": list(ref.shape),
                            "max_abs": float((out - ref).abs().max()), "ref_scale": float(ref.abs().max()),
                            "repeat_max_abs": float((out2 - out).abs().max())})
        Path(out_dir, f"rank-{rank}.json").write_text(json.dumps({"ok": True, "results": results}))
    except Exception:  # noqa: BLE001 - reported to the test through the result file
        Path(out_dir, f"rank-{rank}.json").write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

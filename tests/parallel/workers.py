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


def _batch(cfg, step: int, rows: slice):
    import torch

    t = cfg.model.transformer
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(2, t.in_channels, 3, 8, 8, generator=g)
    target = torch.randn(2, t.out_channels, 3, 8, 8, generator=g)
    emb = torch.randn(2, 12, t.caption_channels, generator=g)
    ts = torch.tensor([100 + 7 * step, 900 - 5 * step])
    return x[rows], target[rows], emb[rows], ts[rows]


def _train_steps(model, opt, cfg, steps: range, rows: slice, reduce: bool) -> list[float]:
    import torch
    import torch.distributed as dist

    losses = []
    for step in steps:
        x, target, emb, ts = _batch(cfg, step, rows)
        out = model(x, ts, emb, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if reduce:
            dist.all_reduce(value)
            value /= dist.get_world_size()
        losses.append(float(value))
    return losses


def fsdp2_train(rank: int, world: int, port: int, out_dir: str, preset: str, steps: int) -> None:
    """1-process reference (full batch, plain module) vs FSDP2 on 2 ranks (half batch each); then FSDP2 resume from
    a safetensors full-state checkpoint written after ``steps // 2`` steps."""
    try:
        import torch

        from easyanimate.runtime import adamw
        from easyanimate.train.common import load_checkpoint, save_checkpoint
        from easyanimate.train.fsdp import full_model_state, is_fsdp2, shard_transformer

        _join(rank, world, port)
        cfg, ref = _model(preset, [])
        ref.train()
        ref_opt = adamw(ref.parameters(), lr=1e-3)
        ref_losses = _train_steps(ref, ref_opt, cfg, range(steps), slice(0, 2), reduce=False)
        ref_state = {k: v.detach().clone() for k, v in ref.state_dict().items()}

        mine = slice(rank, rank + 1)
        _, model = _model(preset, [])
        model.train()
        shard_transformer(model)
        opt = adamw(model.parameters(), lr=1e-3)
        losses = _train_steps(model, opt, cfg, range(steps), mine, reduce=True)
        final = full_model_state(model)

        # resume: half the steps, a safetensors checkpoint, a fresh sharded model + optimizer, the other half
        half = steps // 2
        run = Path(out_dir, "run")
        _, model_a = _model(preset, [])
        model_a.train()
        shard_transformer(model_a)
        opt_a = adamw(model_a.parameters(), lr=1e-3)
        first = _train_steps(model_a, opt_a, cfg, range(half), mine, reduce=True)
        # the trainers' checkpoint writer: it gathers the FSDP2 shards into full safetensors (every rank calls it)
        ckpt = save_checkpoint(run, half, models={"transformer": model_a}, optimizers={"transformer": opt_a},
                               schedulers={}, keep_last=0)
        import torch.distributed as dist

        dist.barrier()
        _, model_b = _model(preset, [])
        model_b.train()
        torch.manual_seed(1234)  # a different init must not matter: everything comes from the checkpoint
        for p in model_b.parameters():
            torch.nn.init.normal_(p.data, 0, 0.5)
        shard_transformer(model_b)
        opt_b = adamw(model_b.parameters(), lr=1e-3)
        load_checkpoint(ckpt, models={"transformer": model_b}, optimizers={"transformer": opt_b}, schedulers={})
        second = _train_steps(model_b, opt_b, cfg, range(half, steps), mine, reduce=True)
        resumed = full_model_state(model_b)
        record = {"ok": True, "sharded": is_fsdp2(model), "ref_losses": ref_losses, "losses": losses,
                  "resumed_losses": first + second}
        if rank == 0:
            record["param_max_abs_vs_ref"] = max(float((final[k] - ref_state[k]).abs().max()) for k in ref_state)
            record["resume_param_max_abs"] = max(float((final[k] - resumed[k]).abs().max()) for k in final)
            record["resume_bit_identical"] = all(torch.equal(final[k], resumed[k]) for k in final)
            record["checkpoint_files"] = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*.safetensors"))
        Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(record))
    except Exception:  # noqa: BLE001 - reported to the test through the result file
        Path(out_dir, f"rank-{rank}.json").write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

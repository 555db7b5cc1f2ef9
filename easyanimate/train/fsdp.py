"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the V2 DiT: sharding units and full-state checkpoints.

Through accelerate (``accelerate launch --config_file infra/accelerate/fsdp2.yaml -m easyanimate train-dit ...``)
the yaml names ``TemporalTransformerBlock`` as the wrap unit (one FSDP2 group per block: its parameters are
all-gathered just before the block runs and freed after; gradients are reduce-scattered), the root module holds the
rest (patch embedding, caption projection, adaLN, U-ViT skip Linears, head). accelerate 1.15 enables FSDP only for
accelerator devices (its ``DistributedType.FSDP`` is set for multi-GPU/XPU/NPU/... runs, never for ``MULTI_CPU``),
so that launch path needs GPUs. :func:`shard_transformer` applies the same sharding with torch directly (any device,
gloo on CPU): what the two-process CPU tests run.

Checkpoints stay safetensors and resume exactly: :func:`full_model_state` / :func:`full_optimizer_state` gather the
sharded DTensors into ordinary full tensors (collectives: every rank calls them; rank 0 receives the result, other
ranks an empty dict), which the checkpoint writer stores as before, and :func:`load_full_state` scatters a full
state back into the shards (rank 0 reads, broadcast to the others). ``easyanimate.train.common.save_checkpoint`` /
``load_checkpoint`` do this for any FSDP2-sharded model they are given. The weights file is the same as a
one-process run's (``transformer/diffusion_pytorch_model.safetensors``, usable by the pipeline as is); the
optimizer state is keyed by parameter name (torch's full-state format), so it resumes under FSDP2 on any number
of ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["full_model_state", "full_optimizer_state", "is_fsdp2", "load_full_state", "shard_transformer"]


def is_fsdp2(model: nn.Module) -> bool:
    """True when ``model``'s parameters are FSDP2-sharded DTensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_transformer(model: nn.Module, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every ``TemporalTransformerBlock`` then the root (the fsdp2.yaml policy); in place."""
    from torch.distributed.fsdp import fully_shard

    from easyanimate.models.transformer3d import TemporalTransformerBlock

    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    for module in model.modules():
        if isinstance(module, TemporalTransformerBlock):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0, ``{}`` elsewhere. Collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state dict (keyed by parameter names) on rank 0, ``{}`` elsewhere. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any] | None = None) -> None:
    """Scatter full states (read on rank 0; other ranks may pass ``{}``) into the sharded model/optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=_options(broadcast_from_rank0=True))
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options(broadcast_from_rank0=True))

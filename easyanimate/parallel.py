"""Generation on several devices: context parallelism (diffusers) and CFG parallelism for the V2 DiT.

A setting is a spec string (CLI ``--parallel``, the pipeline's ``parallel=``)::

    none            one process (default)
    ulysses=N       N ranks split every frame's spatial tokens; spatial self-attention exchanges heads
                    (diffusers Ulysses all-to-all)
    ring=N          N ranks split the tokens the same way; K/V travel round the ring (diffusers ring attention)
    cfg             2 ranks: the unconditional half of the CFG batch on one, the conditional half on the other
    cfg,ulysses=N   2*N ranks: both (a (cfg, ring, ulysses) device mesh)

The world size must equal the product of the degrees (cfg counts 2). Launch with ``torchrun --nproc_per_node N``;
the process group is gloo on CPU, NCCL on GPUs (chosen automatically), each rank on ``cuda:<LOCAL_RANK>``.

Context parallelism is diffusers' own: ``Transformer3DModel._cp_plan`` splits the patch embedding's
``(B*F, h*w, D)`` output on ``h*w`` (each rank: a slice of every frame's tokens, all frames of a location on one
rank) and gathers the head's ``(B, F, h*w, C)`` output on ``h*w``. So

* spatial self-attention (``attn1``, within a frame) is the one sequence-parallel attention: its processor passes
  the ``ContextParallelConfig`` to ``dispatch_attention_fn`` (Ulysses / ring);
* the motion module's temporal attention is local (each location's frames are on its rank);
* cross-attention is local (captions are whole on every rank);
* U-ViT long skips, adaLN modulation and MLPs are per token: local;
* the motion module's GroupNorm takes per-frame statistics over ALL spatial tokens: :class:`ContextParallelGroupNorm`
  all-reduces its sums (two tiny all-reduces per motion module), installed by ``Transformer3DModel.enable_parallelism``.

Library limits (diffusers 0.42, torch 2.13): context parallelism needs the attention backend to support it; on CPU
only ``native`` does, and only for Ulysses: ring attention merges partial results with the log-sum-exp, which the
``native`` backend does not return, and the backends that do (``flash``, ``_native_flash``, ``_native_cudnn``,
``sage``) are CUDA-only with bf16/fp16 inputs. So ``ring=N`` runs on GPUs only (we refuse it on CPU with that
reason). Ulysses needs the head count divisible by N (V2: 16 heads → N ∈ {2, 4, 8, 16}) and tokens per frame
divisible by N. CFG parallelism is ours (diffusers has none): a diffusers ``ModelHook`` on the transformer splits the
CFG batch by rank and all-gathers the prediction, so it composes with the step caches' hooks.

All ranks compute the same latents (same seed, same gathered predictions); rank 0 writes the outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["CFGParallelHook", "ContextParallelGroupNorm", "ParallelError", "ParallelSetting", "apply_parallel",
           "init_distributed", "install_context_parallel_group_norms", "parse_parallel",
           "resolve_parallel_config_cpu"]

LSE_BACKENDS = ("flash", "_native_flash", "_native_cudnn", "sage")


class ParallelError(ValueError):
    """A parallel setting that is malformed or cannot run here; the message says what would work."""


@dataclasses.dataclass(frozen=True)
class ParallelSetting:
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg * self.ring * self.ulysses

    @property
    def context_parallel(self) -> bool:
        return self.ring * self.ulysses > 1

    def __str__(self) -> str:
        parts = (["cfg"] if self.cfg > 1 else []) + [f"{k}={v}" for k, v in (("ulysses", self.ulysses),
                                                                         ("ring", self.ring)) if v > 1]
        return ",".join(parts) or "none"


def parse_parallel(spec: str | ParallelSetting | None) -> ParallelSetting:
    """``"ulysses=2"``, ``"ring=4"``, ``"cfg"``, ``"cfg,ulysses=2"``, ``"none"``/None → a :class:`ParallelSetting`."""
    if isinstance(spec, ParallelSetting):
        return spec
    if spec is None or str(spec).strip().lower() in ("", "none", "off", "1"):
        return ParallelSetting()
    values: dict[str, int] = {}
    for part in str(spec).lower().replace(" ", "").split(","):
        key, _, value = part.partition("=")
        if key == "cfg":
            if value not in ("", "2", "true", "1"):
                raise ParallelError(f"parallel: cfg takes no degree (the CFG batch has 2 halves), got {part!r}")
            values["cfg"] = 1 if value == "1" else 2
        elif key in ("ulysses", "ring"):
            if not value.isdigit() or int(value) < 1:
                raise ParallelError(f"parallel: {key} needs a degree >= 1, e.g. {key}=2; got {part!r}")
            values[key] = int(value)
        else:
            raise ParallelError(f"parallel: unknown part {part!r}; expected ulysses=N, ring=N, cfg or none "
                                "(comma-separated, e.g. 'cfg,ulysses=2')")
    setting = ParallelSetting(**values)
    if setting.ring > 1 and setting.ulysses > 1:
        raise ParallelError("parallel: choose ulysses=N or ring=N, not both (a 2-D ring x ulysses mesh is not "
                            "offered: on one node Ulysses alone is the faster choice)")
    return setting


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one (gloo on CPU, NCCL on CUDA); ``(rank, world, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes"):
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return dist.get_rank(), dist.get_world_size(), device


def _check(setting: ParallelSetting, transformer, device: torch.device) -> None:
    world = dist.get_world_size() if dist.is_initialized() else 1
    if setting.world_size != world:
        raise ParallelError(f"parallel={setting} needs {setting.world_size} processes, this run has {world} "
                            f"(launch with torchrun --nproc_per_node {setting.world_size})")
    if setting.ring > 1:
        backend = _backend_of(transformer)
        if device.type != "cuda" or backend not in LSE_BACKENDS:
            raise ParallelError(
                f"parallel=ring needs an attention backend that returns the log-sum-exp ({', '.join(LSE_BACKENDS)}; "
                f"CUDA, bf16/fp16); this run has backend {backend!r} on {device.type}. diffusers' native backend "
                "(the CPU one) supports only ulysses=N")
    heads = transformer.config.num_attention_heads
    if setting.ulysses > 1 and heads % setting.ulysses:
        raise ParallelError(f"parallel=ulysses={setting.ulysses} needs the head count ({heads}) divisible by it")


def _backend_of(transformer) -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for module in transformer.modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
        if backend is not None:
            return str(getattr(backend, "value", backend))
    return _AttentionBackendRegistry.get_active_backend()[0].value


def apply_parallel(transformer, spec: str | ParallelSetting | None) -> ParallelSetting:
    """Make ``transformer`` (a :class:`Transformer3DModel`) run split across the process group, per ``spec``.

    The process group must be up (:func:`init_distributed`). Context parallelism goes through diffusers'
    ``enable_parallelism(config=ContextParallelConfig(...))`` with the model's ``_cp_plan``; CFG parallelism is a
    :class:`CFGParallelHook`. Returns the setting; ``none`` changes nothing.
    """
    setting = parse_parallel(spec)
    if setting.world_size == 1:
        return setting
    device = next(transformer.parameters()).device
    _check(setting, transformer, device)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (setting.cfg, setting.ring, setting.ulysses),
                            mesh_dim_names=("cfg", "ring", "ulysses"))
    if setting.context_parallel:
        from diffusers import ContextParallelConfig

        transformer.enable_parallelism(config=ContextParallelConfig(
            ring_degree=setting.ring, ulysses_degree=setting.ulysses, mesh=mesh["ring", "ulysses"]))
    if setting.cfg > 1:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(
            CFGParallelHook(mesh["cfg"].get_group()), CFGParallelHook.NAME)
    return setting


# ---------------------------------------------------------------------------------------------------------------------
# CPU resolution of diffusers' parallel config (diffusers divides by torch.accelerator.device_count(), 0 on CPU)

def resolve_parallel_config_cpu(model, config):
    """``ModelMixin._resolve_parallel_config`` for a CPU-only host: the same steps with device ``cpu``."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig, TensorParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed must be available and initialized before applying a parallel config")
    if isinstance(config, ContextParallelConfig):
        config = ParallelConfig(context_parallel_config=config)
    elif isinstance(config, TensorParallelConfig):
        raise ParallelError("tensor parallelism: diffusers supports cuda/neuron/tpu devices only, not cpu")
    cp = config.context_parallel_config
    mesh = None
    if cp is not None:
        mesh = cp.mesh or init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    return config


# ---------------------------------------------------------------------------------------------------------------------
# GroupNorm with statistics over the whole (split) spatial axis

class ContextParallelGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` on ``(N, C, S_local)`` whose mean/variance cover the ``S`` of all ranks of ``group``.

    Same parameters (``weight``, ``bias``) and state-dict names as the GroupNorm it replaces. Two all-reduces of
    ``N * groups`` values per call: the sum (→ mean), then the sum of squared deviations (→ biased variance, as
    GroupNorm). Inference path (the all-reduces are not differentiated).
    """

    def __init__(self, norm: nn.GroupNorm, group):
        super().__init__(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine,
                         device=norm.weight.device if norm.affine else None,
                         dtype=norm.weight.dtype if norm.affine else None)
        if norm.affine:
            self.weight, self.bias = norm.weight, norm.bias
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        g = x.float().reshape(n, self.num_groups, -1)
        stats = torch.stack([g.sum(-1), torch.full_like(g[..., 0], g.shape[-1])])
        dist.all_reduce(stats, group=self.group)
        mean = (stats[0] / stats[1]).unsqueeze(-1)
        sq = ((g - mean) ** 2).sum(-1)
        dist.all_reduce(sq, group=self.group)
        var = (sq / stats[1]).unsqueeze(-1)
        out = ((g - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape).to(x.dtype)
        if self.affine:
            shape = (1, c) + (1,) * (x.ndim - 2)
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out


def install_context_parallel_group_norms(model: nn.Module, cp_config) -> int:
    """Swap every motion module's GroupNorm for a :class:`ContextParallelGroupNorm` over the CP ranks; returns how
    many. Called by ``Transformer3DModel.enable_parallelism``."""
    from easyanimate.models.motion_module import TemporalTransformer3DModel

    group = cp_config._flattened_mesh.get_group()
    count = 0
    for module in model.modules():
        if isinstance(module, TemporalTransformer3DModel) and not isinstance(module.norm, ContextParallelGroupNorm):
            module.norm = ContextParallelGroupNorm(module.norm, group)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------------------
# CFG parallelism

def _hook_base():
    from diffusers.hooks import ModelHook

    return ModelHook


class CFGParallelHook(_hook_base()):
    """Each rank of ``group`` runs its slice of the batch (CFG: [uncond; cond] → one half each); the prediction is
    all-gathered, so every rank returns the full batch's output. A batch not divisible by the group size (no CFG)
    runs whole on every rank."""

    NAME = "easyanimate_cfg_parallel"
    _BATCHED = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask")

    def __init__(self, group):
        super().__init__()
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._split = False

    def pre_forward(self, module, *args, **kwargs):
        names = self._BATCHED
        args = list(args)
        hidden = args[0] if args else kwargs.get("hidden_states")
        batch = hidden.shape[0]
        self._split = batch % self.size == 0 and batch >= self.size
        if not self._split:
            return tuple(args), kwargs

        def shard(x: Any) -> Any:
            if torch.is_tensor(x) and x.ndim >= 1 and x.shape[0] == batch:
                return x.chunk(self.size, dim=0)[self.rank]
            return x

        for i, name in enumerate(names):
            if i < len(args):
                args[i] = shard(args[i])
            elif name in kwargs:
                kwargs[name] = shard(kwargs[name])
        return tuple(args), kwargs

    def post_forward(self, module, output):
        if not self._split:
            return output

        def gather(x: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x.contiguous(), group=self.group)
            return torch.cat(parts, dim=0)

        if isinstance(output, tuple):
            return tuple(gather(o) if torch.is_tensor(o) else o for o in output)
        if torch.is_tensor(output):
            return gather(output)
        output.sample = gather(output.sample)  # Transformer2DModelOutput
        return output

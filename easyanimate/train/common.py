"""What every trainer shares: the accelerator, safetensors checkpoints with exact resume, progress and meters.

Public API (stable; ``train/vae.py`` and ``train/dit.py`` use it)::

    setup_accelerator(train_cfg, output, *, log_with=None) -> Accelerator
        mixed precision and gradient accumulation from ``TrainConfig``; gloo process group on CPU; per-rank seed
        ``train_cfg.seed + process_index`` (python, numpy, torch); ``output`` created by the main process. CPU runs:
        ``Accelerator(cpu=True)`` (not under DeepSpeed) and, when launched multi-process, a gloo process group.

    save_checkpoint(output, step, *, models, optimizers, schedulers, ema=None, extra=None, accelerator=None,
                    keep_last, trainable_only=False) -> Path
        writes ``output/checkpoints/checkpoint-<step>/`` atomically (temp folder + rename); every rank must call it
        (RNG states are gathered from all ranks); only rank 0 writes; all ranks leave together. Prunes to the last
        ``keep_last`` checkpoints (``keep_last <= 0`` keeps all) and removes stale temp folders of killed runs.
        ``trainable_only``: store only the parameters with ``requires_grad`` (e.g. a LoRA; the frozen rest comes back
        from where the model was built).

    load_checkpoint(path, *, models, optimizers, schedulers, ema=None, accelerator=None) -> dict
        restores everything ``save_checkpoint`` wrote (weights, optimizer, LR scheduler, EMA, this rank's RNG states)
        and returns ``extra``.

    fill_deepspeed_config(accelerator, train_cfg, micro_batch_size)   before ``prepare`` under DeepSpeed (no-op else)

    latest_checkpoint(output) -> Path | None          newest complete ``checkpoint-<step>`` folder (not verified)
    resolve_resume(output, resume) -> Path | None       None/"" → None; "latest" → the newest INTACT checkpoint (the
                                                        ones that fail ``verify_checkpoint`` are skipped with a logged
                                                        reason) or None; else that folder, verified
    verify_checkpoint(path) -> str | None               why a checkpoint is not intact (its sha256 manifest), or None
    drop_metrics_after(output, step) -> int             remove ``metrics.jsonl`` rows past a resumed step
    checkpoint_step(path) -> int                        the <step> of a ``checkpoint-<step>`` folder

    progress_bar(total, *, initial=0, accelerator=None, desc="train") -> tqdm   (disabled off the main process)
    Throughput(window=20): .update(samples, tokens) per step → .samples_per_s, .tokens_per_s (sliding window)
    latent_tokens(latent_shape, patch_size) -> int      B · F · (H/p) · (W/p): DiT tokens of a latent batch
    grad_norm(parameters, norm_type=2.0) -> float       total norm of the existing gradients

    save_tree(tree, folder, stem) / load_tree(folder, stem)   any nested state ↔ ``stem.json`` + ``stem.safetensors``
    rng_state() -> dict / set_rng_state(state)                 this process's python/numpy/torch(/CUDA) RNG states

Checkpoint layout (safetensors + JSON only: no pickles, no ``torch.save``)::

    checkpoint-<step>/
      sha256.json                        written last: {"algorithm": "sha256", "files": {path: {"sha256", "size"}}}
                                         over every other file; resume verifies it (bit flips, truncation)
      checkpoint.json                    step, world size, what is stored where
      extra.json                         the trainer's ``extra`` (step, epoch, data position, resolved config, …)
      <model>/config.json                (diffusers/ConfigMixin models) so the folder loads with ``from_pretrained``
      <model>/diffusion_pytorch_model.safetensors | <model>/model.safetensors
      optimizer-<name>.safetensors/.json optimizer tensors (flattened) + the non-tensor structure
      scheduler-<name>.safetensors/.json LR-scheduler state
      <name>_ema/ema.safetensors/.json   diffusers ``EMAModel`` state (shadow params + decay settings)
      rng/rank-<r>.safetensors/.json     per rank: torch CPU/CUDA states (uint8 tensors); numpy and python states (JSON)

Nested states (optimizer/scheduler/EMA/RNG) go through one tree codec: tensors → safetensors entries named by their
path, everything else → JSON, with tuples, non-string dict keys and numpy arrays tagged so they round-trip exactly.

Under DeepSpeed (ZeRO-1/2: full weights on every rank) weights, EMA, schedule and RNG use the same layout; the
partitioned optimizer state is stored per rank (``optimizer-<name>.rank-<r>``) and loads back on the same number of
ranks. ZeRO-3 (partitioned weights) is not supported.
"""

from __future__ import annotations

import enum
import hashlib
import importlib
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..fsutil import atomic_write_bytes, replace_dir

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
FORMAT_VERSION = 2  # 2: a sha256 manifest (sha256.json) written last
MANIFEST = "sha256.json"


# ---------------------------------------------------------------------------------------------------------------------
# accelerator


def setup_accelerator(train_cfg, output: str | Path, *, log_with=None):
    """An ``Accelerator`` for ``TrainConfig``: mixed precision, gradient accumulation, gloo on CPU, per-rank seeds.

    Launched without ``accelerate launch`` (one process) an earlier ``Accelerator`` of this process is forgotten first,
    so several runs with different precisions can share a process (tests, notebooks).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        try:
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        except Exception:  # noqa: BLE001 - private API; a fresh process does not need it
            pass
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    launched = int(os.environ.get("LOCAL_RANK", "-1")) != -1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
    # NCCL needs GPUs: a launched CPU run (DDP, DeepSpeed) talks over gloo; a plain single process has no group
    handlers = [InitProcessGroupKwargs(backend="gloo")] if use_cpu and launched else []
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    accelerator = Accelerator(
        # cpu=True: CPU workers of a launcher that did not export ACCELERATE_USE_CPU still become DDP replicas
        # (not with DeepSpeed, which cpu=True would switch off; DeepSpeed finds the CPU itself)
        cpu=use_cpu and not deepspeed,
        mixed_precision=train_cfg.mixed_precision,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(output)),
        kwargs_handlers=handlers,
        log_with=log_with,
    )
    # different noise/timesteps per rank; the model itself is seeded separately (model.init_seed) so ranks agree
    set_seed(int(train_cfg.seed), device_specific=True)
    if accelerator.is_main_process:
        Path(output).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return accelerator


def fill_deepspeed_config(accelerator, train_cfg, micro_batch_size: int) -> None:
    """Under DeepSpeed, put the run's micro-batch, accumulation and clipping into its config before ``prepare``
    (our loaders are not passed to ``prepare``, so accelerate cannot infer them). No-op otherwise."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
    ds["gradient_accumulation_steps"] = int(train_cfg.gradient_accumulation_steps)
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = float(train_cfg.max_grad_norm)
    ds["train_batch_size"] = int(micro_batch_size) * int(train_cfg.gradient_accumulation_steps) * \
        int(accelerator.num_processes)


def _rank_world(accelerator=None) -> tuple[int, int]:
    if accelerator is not None:
        return int(accelerator.process_index), int(accelerator.num_processes)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier(accelerator=None) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _gather_objects(obj: Any, accelerator=None) -> list[Any]:
    """Every rank's ``obj`` on every rank (in memory only; nothing of this reaches the disk as a pickle)."""
    _, world = _rank_world(accelerator)
    if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _unwrap(model, accelerator=None):
    if accelerator is not None:
        try:
            return accelerator.unwrap_model(model)
        except Exception:  # noqa: BLE001 - not a prepared model
            pass
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _is_deepspeed(accelerator) -> bool:
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


# ---------------------------------------------------------------------------------------------------------------------
# tree codec: nested python state <-> (JSON, {name: tensor})


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, _join(path, i)) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, _join(path, i)) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, _join(path, k)) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, _join(path, f"key{i}")), _encode(v, tensors, _join(path, k))]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, enum.Enum):
        return {"__enum__": _qualname(obj), "value": _encode(obj.value, tensors, path)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if _qualname(obj).startswith(_PLAIN_OBJECT_PREFIXES) and hasattr(obj, "__dict__"):
        # e.g. DeepSpeed's LossScaler inside its ZeRO optimizer state: rebuilt from its attributes, no pickle
        return {"__object__": _qualname(obj), "attrs": _encode(vars(obj), tensors, _join(path, "attrs"))}
    raise TypeError(f"checkpoint state at {path!r}: expected tensors, numbers, strings, lists, tuples or dicts, "
                    f"got {type(obj).__name__}")


# plain-attribute objects the codec may rebuild (module prefixes); nothing else is ever instantiated from a file
_PLAIN_OBJECT_PREFIXES = ("deepspeed.",)


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve_class(name: str, allowed: tuple[str, ...]) -> type:
    if not name.startswith(allowed):
        raise ValueError(f"checkpoint names class {name!r}; only classes under {allowed} are rebuilt")
    module, _, qual = name.rpartition(".")
    while module:
        try:
            obj: Any = importlib.import_module(module)
            break
        except ImportError:
            module, _, head = module.rpartition(".")
            qual = f"{head}.{qual}"
    else:
        raise ValueError(f"cannot import the class {name!r} named in the checkpoint")
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ValueError(f"{name!r} is not a class")
    return obj


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__dtype__" in obj:
            return getattr(torch, obj["__dtype__"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if "__enum__" in obj:
            return _resolve_class(obj["__enum__"], ("deepspeed.", "torch.", "accelerate."))(
                _decode(obj["value"], tensors))
        if "__object__" in obj:
            cls = _resolve_class(obj["__object__"], _PLAIN_OBJECT_PREFIXES)
            rebuilt = cls.__new__(cls)
            rebuilt.__dict__.update(_decode(obj["attrs"], tensors))
            return rebuilt
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _safe_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses non-contiguous tensors and tensors sharing memory: copy exactly those."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else (0, id(t))
        if not t.is_contiguous() or key in seen:
            t = t.contiguous().clone()
        seen.add(key)
        out[name] = t
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, allow_nan=True))


def save_tree(tree: Any, folder: Path, stem: str) -> None:
    """Write a nested state as ``stem.json`` (structure) + ``stem.safetensors`` (its tensors, if any)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors, "")
    if tensors:
        save_file(_safe_tensors(tensors), str(folder / f"{stem}.safetensors"))
    _write_json(folder / f"{stem}.json", encoded)


def load_tree(folder: Path, stem: str) -> Any:
    """Inverse of ``save_tree``."""
    folder = Path(folder)
    tfile = folder / f"{stem}.safetensors"
    tensors = load_file(str(tfile)) if tfile.is_file() else {}
    return _decode(json.loads((folder / f"{stem}.json").read_text()), tensors)


# ---------------------------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU (and CUDA) generator states."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda])


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints


def checkpoints_dir(output: str | Path) -> Path:
    return Path(output) / CHECKPOINTS


def checkpoint_step(path: str | Path) -> int:
    m = _CKPT_RE.match(Path(path).name)
    if not m:
        raise ValueError(f"{path}: expected a folder named checkpoint-<step>")
    return int(m.group(1))


def list_checkpoints(output: str | Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    folder = checkpoints_dir(output)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _CKPT_RE.match(p.name) and (p / "checkpoint.json").is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output: str | Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    """sha256 and size of every file under ``folder`` → ``folder/sha256.json`` (the last file a checkpoint gets)."""
    files = {p.relative_to(folder).as_posix(): {"sha256": _file_sha256(p), "size": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    with (folder / MANIFEST).open("w") as fh:
        json.dump({"algorithm": "sha256", "files": files}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def verify_checkpoint(path: str | Path) -> str | None:
    """Why the checkpoint folder ``path`` is not intact, or None when every file matches its sha256 manifest.

    Reasons: no ``checkpoint.json`` or ``sha256.json`` (an older format or a half-copied folder), an unreadable
    manifest, a missing or extra file, a size (truncation) or sha256 (bit flip) that differs from the manifest."""
    path = Path(path)
    if not (path / "checkpoint.json").is_file():
        return "no checkpoint.json (not a complete checkpoint)"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("expected algorithm sha256 and a files table")
    except FileNotFoundError:
        return f"no {MANIFEST} manifest (written by an older version, or an incomplete copy)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST} manifest ({type(exc).__name__}: {exc})"
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        return f"file {extra[0]} is not in the manifest ({len(extra)} unlisted)"
    for rel, entry in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            return f"file {rel} is missing"
        size = f.stat().st_size
        if size != int(entry["size"]):
            return f"file {rel} has {size} bytes, the manifest says {entry['size']} (truncated or rewritten)"
        if _file_sha256(f) != entry["sha256"]:
            return f"file {rel} does not match its sha256 in the manifest (corrupted)"
    return None


def drop_metrics_after(output: str | Path, step: int, name: str = "metrics.jsonl") -> int:
    """Remove the rows of ``output/metrics.jsonl`` (``JsonlTracker``) logged after ``step`` by a run that died after
    its last checkpoint: the resumed run logs those steps again. Rewritten atomically; returns the rows dropped."""
    path = Path(output) / name
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row_step = int(json.loads(line).get("step", -1))
        except (ValueError, TypeError, AttributeError):
            continue  # a torn last line of a killed run
        if row_step <= step:
            kept.append(line)
    dropped = len([ln for ln in lines if ln.strip()]) - len(kept)
    if dropped:
        atomic_write_bytes(path, "".join(f"{ln}\n" for ln in kept).encode())
        logger.info("%s: dropped %d rows logged after step %d (the resumed run logs them again)", path, dropped, step)
    return dropped


def resolve_resume(output: str | Path, resume: str | os.PathLike | None) -> Path | None:
    """``None``/``""`` → None; ``"latest"`` → the newest intact checkpoint under ``output`` (None when there is none);
    anything else → that checkpoint folder (a bare ``checkpoint-<step>`` name is looked up under ``output``).

    Every candidate is checked against its sha256 manifest (``verify_checkpoint``): ``latest`` skips a damaged one,
    logging which and why, and falls back to the next newest; when checkpoints exist but none is intact, or an
    explicitly named one is damaged, it raises ``ValueError`` (starting over silently would throw away the run)."""
    if resume is None or str(resume) == "":
        return None
    if str(resume) == "latest":
        found = list_checkpoints(output)
        if not found:
            logger.info("--resume latest: no checkpoint under %s yet; starting from scratch", checkpoints_dir(output))
            return None
        skipped = []
        for candidate in reversed(found):
            reason = verify_checkpoint(candidate)
            if reason is None:
                if skipped:
                    logger.warning("--resume latest: resuming from %s instead", candidate.name)
                return candidate
            logger.warning("--resume latest: skipping %s: %s", candidate.name, reason)
            skipped.append(f"{candidate.name}: {reason}")
        raise ValueError(f"--resume latest: no intact checkpoint under {checkpoints_dir(output)} ("
                         f"{'; '.join(skipped)}); delete the damaged ones to start over")
    path = Path(resume)
    if not path.exists() and (checkpoints_dir(output) / path).is_dir():
        path = checkpoints_dir(output) / path
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder; expected 'latest' or a "
                                f"checkpoint-<step> folder (e.g. under {checkpoints_dir(output)})")
    if not (path / "checkpoint.json").is_file():
        raise ValueError(f"--resume {resume}: {path} is not a checkpoint (no checkpoint.json inside)")
    reason = verify_checkpoint(path)
    if reason is not None:
        raise ValueError(f"--resume {resume}: {path.name} is damaged: {reason}")
    return path


def _model_state(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    if not trainable_only:
        return dict(model.state_dict())
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_model(model: torch.nn.Module, folder: Path, trainable_only: bool,
                full_state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    folder.mkdir(parents=True)
    state = _model_state(model, trainable_only)
    if full_state is not None:  # FSDP2: the gathered full tensors replace the local shards (same names)
        state = {k: full_state[k] for k in state}
    is_diffusers = hasattr(model, "save_config") and hasattr(model, "config")
    fname = "diffusion_pytorch_model.safetensors" if is_diffusers and not trainable_only else "model.safetensors"
    save_file(_safe_tensors(state), str(folder / fname), metadata={"format": "pt"})
    if is_diffusers:
        model.save_config(str(folder))
    return {"file": f"{folder.name}/{fname}", "partial": bool(trainable_only), "tensors": len(state)}


def _prune(output: Path, keep_last: int) -> None:
    folder = checkpoints_dir(output)
    for stale in folder.glob(f"{_TMP_PREFIX}*"):  # left by a killed run; we are the only writer now
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last > 0:
        for old in list_checkpoints(output)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    output: str | Path,
    step: int,
    *,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    ema: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    accelerator=None,
    keep_last: int,
    trainable_only: bool = False,
) -> Path:
    """Write ``output/checkpoints/checkpoint-<step>/`` (see the module docstring); call on every rank.

    ``models`` may be prepared (DDP/DeepSpeed) modules: they are unwrapped. A failure while writing leaves no
    ``checkpoint-<step>`` folder (and no temp folder). Returns the checkpoint folder.
    """
    output = Path(output)
    rank, world = _rank_world(accelerator)
    rng_all = _gather_objects(rng_state(), accelerator)
    deepspeed = _is_deepspeed(accelerator)
    # ZeRO partitions the optimizer state: every rank's part is kept (DeepSpeed reloads them as a list by rank)
    opt_all = {n: _gather_objects(o.state_dict(), accelerator) for n, o in optimizers.items()} if deepspeed else None
    # FSDP2 (easyanimate.train.fsdp): gather full weights/optimizer state on every rank (collective), rank 0 writes
    fsdp_models, fsdp_opts = _fsdp2_full_states(models, optimizers, accelerator)
    final = checkpoints_dir(output) / f"checkpoint-{int(step)}"
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{_TMP_PREFIX}{int(step)}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta: dict[str, Any] = {"format": FORMAT_VERSION, "step": int(step), "world_size": world,
                                    "time": time.time(), "models": {}, "optimizers": [], "schedulers": [], "ema": [],
                                    "deepspeed": deepspeed}
            for name, model in models.items():
                meta["models"][name] = _save_model(_unwrap(model, accelerator), tmp / name, trainable_only,
                                                   fsdp_models.get(name))
            for name, opt in optimizers.items():
                if opt_all is not None:  # ZeRO: each rank holds its own partition
                    for r, state in enumerate(opt_all[name]):
                        save_tree(state, tmp, f"optimizer-{name}.rank-{r}")
                else:
                    save_tree(fsdp_opts[name] if name in fsdp_opts else opt.state_dict(), tmp, f"optimizer-{name}")
                meta["optimizers"].append(name)
            for name, sched in schedulers.items():
                save_tree(sched.state_dict(), tmp, f"scheduler-{name}")
                meta["schedulers"].append(name)
            for name, e in (ema or {}).items():
                (tmp / f"{name}_ema").mkdir()
                save_tree(e.state_dict(), tmp / f"{name}_ema", "ema")
                meta["ema"].append(name)
            (tmp / "rng").mkdir()
            for r, state in enumerate(rng_all):
                save_tree(state, tmp / "rng", f"rank-{r}")
            save_tree(extra or {}, tmp, "extra")
            _write_json(tmp / "checkpoint.json", meta)  # its presence marks a complete folder
            _write_manifest(tmp)  # last: the sha256 of every file above, verified on resume
            # re-saving the same step (e.g. after a resume) swaps; the old one takes a temp name _prune cleans
            replace_dir(tmp, final, old_name=f"{_TMP_PREFIX}old-{int(step)}-{uuid.uuid4().hex[:8]}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _prune(output, keep_last)
    _barrier(accelerator)
    return final


def _fsdp2_names(models: dict[str, torch.nn.Module], accelerator) -> set[str]:
    from easyanimate.train.fsdp import is_fsdp2

    return {n for n, m in models.items() if is_fsdp2(_unwrap(m, accelerator))}


def _fsdp2_full_states(models, optimizers, accelerator) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({name: full model state}, {name: full optimizer state})`` for the FSDP2-sharded models (rank 0 holds the
    tensors, other ranks empty dicts); every rank must call it."""
    names = _fsdp2_names(models, accelerator)
    if not names:
        return {}, {}
    from easyanimate.train.fsdp import full_model_state, full_optimizer_state

    full_models = {n: full_model_state(_unwrap(models[n], accelerator)) for n in names}
    full_opts = {n: full_optimizer_state(_unwrap(models[n], accelerator), optimizers[n]) for n in names
                 if n in optimizers}
    return full_models, full_opts


def _read_model_state(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights in this checkpoint part")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _load_model(model: torch.nn.Module, folder: Path, info: dict[str, Any]) -> None:
    state = _read_model_state(folder)
    partial = bool(info.get("partial"))
    result = model.load_state_dict(state, strict=not partial)
    if partial and result.unexpected_keys:
        raise ValueError(f"{folder}: {len(result.unexpected_keys)} stored tensors match nothing in the model, e.g. "
                         f"{result.unexpected_keys[:3]}")


def _load_ema(e, folder: Path) -> None:
    devices = [(s.device, s.dtype) for s in e.shadow_params]
    state = load_tree(folder, "ema")
    if len(state.get("shadow_params", [])) != len(devices):
        raise ValueError(f"{folder}: EMA holds {len(state.get('shadow_params', []))} tensors, the model's EMA "
                         f"{len(devices)}")
    e.load_state_dict(state)
    e.shadow_params = [s.to(device=d, dtype=t) for s, (d, t) in zip(e.shadow_params, devices, strict=True)]


def load_checkpoint(
    path: str | Path,
    *,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    ema: dict[str, Any] | None = None,
    accelerator=None,
) -> dict[str, Any]:
    """Restore a ``save_checkpoint`` folder into the given objects (every rank calls it); returns ``extra``."""
    path = Path(path)
    meta_path = path / "checkpoint.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (expected {meta_path})")
    meta = json.loads(meta_path.read_text())
    rank, world = _rank_world(accelerator)

    def need(kind: str, names: Iterable[str], stored: Iterable[str]) -> None:
        missing = sorted(set(names) - set(stored))
        if missing:
            raise KeyError(f"{path}: the checkpoint has no {kind} {missing}; it holds {sorted(stored)}")

    need("model", models, meta["models"])
    need("optimizer", optimizers, meta["optimizers"])
    need("scheduler", schedulers, meta["schedulers"])
    need("EMA", ema or {}, meta["ema"])
    fsdp2 = _fsdp2_names(models, accelerator)
    for name, model in models.items():
        if name in fsdp2:  # rank 0 reads the full tensors, they are scattered into every rank's shards
            from easyanimate.train.fsdp import load_full_state

            unwrapped = _unwrap(model, accelerator)
            state = _read_model_state(path / name) if rank == 0 else {}
            opt = optimizers.get(name)
            opt_state = load_tree(path, f"optimizer-{name}") if rank == 0 and opt is not None else {}
            load_full_state(unwrapped, opt, state, opt_state if opt is not None else None)
            continue
        _load_model(_unwrap(model, accelerator), path / name, meta["models"][name])
    for name, opt in optimizers.items():
        if name in fsdp2:
            continue
        if (path / f"optimizer-{name}.rank-0.json").is_file():  # ZeRO: one partition per rank
            if int(meta["world_size"]) != world:
                raise ValueError(f"{path}: ZeRO optimizer state was saved by {meta['world_size']} ranks, this run "
                                 f"has {world}")
            opt.load_state_dict([load_tree(path, f"optimizer-{name}.rank-{r}") for r in range(world)])
        else:
            opt.load_state_dict(load_tree(path, f"optimizer-{name}"))
    for name, sched in schedulers.items():
        sched.load_state_dict(load_tree(path, f"scheduler-{name}"))
    for name, e in (ema or {}).items():
        _load_ema(e, path / f"{name}_ema")
    rng_file = path / "rng" / f"rank-{rank}.json"
    if rng_file.is_file():
        set_rng_state(load_tree(path / "rng", f"rank-{rank}"))
    else:
        logger.warning("%s: no RNG state for rank %d (saved by %s ranks); this rank's RNG is not restored",
                       path, rank, meta.get("world_size"))
    return load_tree(path, "extra")


# ---------------------------------------------------------------------------------------------------------------------
# progress and meters


def progress_bar(total: int, *, initial: int = 0, accelerator=None, desc: str = "train"):
    """A tqdm bar (steps, rate, ETA; set the loss with ``bar.set_postfix(loss=…)``), shown on the main process only."""
    from tqdm.auto import tqdm

    main = accelerator.is_main_process if accelerator is not None else _rank_world()[0] == 0
    return tqdm(total=total, initial=initial, desc=desc, disable=not main, dynamic_ncols=True, smoothing=0.1)


def latent_tokens(latent_shape: tuple[int, ...] | torch.Size, patch_size: int) -> int:
    """DiT tokens of a latent batch ``(B, C, F, H, W)``: ``B · F · (H/p) · (W/p)``."""
    b, _, f, h, w = (int(v) for v in latent_shape)
    return b * f * (h // patch_size) * (w // patch_size)


class Throughput:
    """Samples/s and tokens/s over the last ``window`` steps (wall clock between ``update`` calls)."""

    def __init__(self, window: int = 20) -> None:
        self._events: deque[tuple[float, int, int]] = deque(maxlen=window + 1)
        self._events.append((time.perf_counter(), 0, 0))
        self.total_samples = 0
        self.total_tokens = 0

    def reset_clock(self) -> None:
        """Forget the time spent outside training steps (validation, checkpoints)."""
        self._events.clear()
        self._events.append((time.perf_counter(), 0, 0))

    def update(self, samples: int, tokens: int = 0) -> None:
        self.total_samples += int(samples)
        self.total_tokens += int(tokens)
        self._events.append((time.perf_counter(), int(samples), int(tokens)))

    def _rate(self, index: int) -> float:
        if len(self._events) < 2:
            return 0.0
        seconds = self._events[-1][0] - self._events[0][0]
        amount = sum(e[index] for e in list(self._events)[1:])
        return amount / seconds if seconds > 0 else 0.0

    @property
    def samples_per_s(self) -> float:
        return self._rate(1)

    @property
    def tokens_per_s(self) -> float:
        return self._rate(2)


def grad_norm(parameters: Iterable[torch.nn.Parameter], norm_type: float = 2.0) -> float:
    """Total ``norm_type`` norm of the gradients that exist (0.0 when none)."""
    grads = [p.grad.detach().float() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    if norm_type == float("inf"):
        return float(max(g.abs().max() for g in grads))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads]),
                                          norm_type))


__all__ = [
    "MANIFEST", "Throughput", "checkpoint_step", "checkpoints_dir", "drop_metrics_after", "fill_deepspeed_config",
    "grad_norm", "latent_tokens", "verify_checkpoint",
    "latest_checkpoint", "list_checkpoints", "load_checkpoint", "load_tree", "progress_bar", "resolve_resume",
    "rng_state", "save_checkpoint", "save_tree", "set_rng_state", "setup_accelerator",
]

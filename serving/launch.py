"""Start a local ``tritonserver`` on our model repository, keep it serving the right model, stop it leaving nothing.

``TritonServer`` runs the ``tritonserver`` that ships in the ``nvidia-pytriton`` wheel (or any given one, e.g. the NGC
container's ``/opt/tritonserver/bin/tritonserver``) on a temporary copy of ``serving/model_repository`` whose
``config.pbtxt`` parameters name the model source. What the launch needs and why:

- a temporary backend directory holding ``python/{libtriton_python.so, triton_python_backend_utils.py,
  triton_python_backend_stub}`` (the wheel keeps them in different folders; the stub is per Python version);
- the stub runs Python in isolated mode: our interpreter's ``bin`` goes first on ``PATH`` (so it finds this venv's
  site-packages) and ``LD_LIBRARY_PATH`` gets the Python ``LIBDIR``; ``EASYANIMATE_PYTHONPATH`` names this checkout
  for ``model.py`` in case ``serving`` is not installed;
- free ports (Triton rejects port 0), loopback addresses by default, a unique shared-memory prefix per server (the
  stubs' ``/dev/shm`` regions; a crashed stub leaves its region behind, so ``stop`` removes ``/dev/shm/<prefix>*``);
- ``--model-control-mode=explicit`` with the models loaded explicitly: a reload (new alias version, crashed stub)
  is an explicit load with the config override; ``--pinned-memory-pool-byte-size=0`` (no CUDA on CPU machines);
- stop: SIGINT (Triton drains in-flight requests for ``exit_timeout`` s), then SIGKILL of the whole process group
  (server + stubs), then the shared-memory segments and the temp folder.

Several models (``allow_models``, ``serve --allow-models``): every allowed source gets its own Triton models in the
staged repository (``easyanimate__1``, ``easyanimate_stream__1``, …; the default keeps the plain names), and only the
default is loaded at start. A request names one in its ``MODEL`` input; the front (``serving/front.py``) calls
``route``, which loads that source through the repository API when it is not loaded — after unloading the least
recently used ones beyond ``max_loaded`` (each waits for the requests routed to it) — and forwards the request to its
Triton model. Chosen over one model whose instances hold an LRU of pipelines because Triton then does the loading,
the unloading (its memory goes back to the OS with the stub process), readiness, metrics and the repository index per
version, and a version that fails to load fails alone. Every allowed registry version must pass its gates.

The watcher (``watch_alias=True``) polls the MLflow alias every ``poll_interval`` s and loads the new version when it
moves (the old version serves until the new one is ready); it also reloads a model whose stub process died (Triton
keeps reporting such a model READY and answers "Stub process is not healthy") or that is not ready while the server is
live.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPOSITORY = Path(__file__).resolve().parent / "model_repository"
MODELS = ("easyanimate", "easyanimate_stream")
TRITONSERVER_ENV = "EASYANIMATE_TRITONSERVER"  # path of a tritonserver binary (default: the pytriton wheel's)
BACKENDS_ENV = "EASYANIMATE_TRITON_BACKENDS"  # its backend directory (default: built from the wheel's files)
_MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)/?$")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
# Triton endpoints that change or reveal what is served (load/unload/config override, the config's paths, shared
# memory, trace/log settings, statistics): closed to clients; the launcher and its watcher send ADMIN_HEADER with a
# per-server random key. Health, metadata and inference stay open.
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
ADMIN_HEADER = "x-easyanimate-admin"


class TritonLaunchError(RuntimeError):
    """tritonserver did not start (or a model did not load): the message carries the end of its log."""


class ModelChoiceError(ValueError):
    """A request's MODEL names nothing this server allows (the front answers 400 / INVALID_ARGUMENT)."""


@dataclass
class ServedModel:
    """One allowed model source and its Triton models (``<model><suffix>`` for each of ``TritonServer.models``).

    ``given`` is the source as the operator named it; ``source`` what its stubs load (an alias resolved to the
    version it pointed at when the server started); ``loaded`` whether its Triton models are loaded now."""

    index: int
    given: str
    suffix: str
    source: str = ""
    version: str | None = None
    loaded: bool = False
    last_used: float = 0.0
    inflight: int = 0  # requests routed to it and not finished (an eviction waits for them)
    defaults: dict[str, Any] | None = None  # its generate defaults as registered (before it ever loaded)

    @property
    def public(self) -> str:
        """How clients see it (a pipeline folder by its name only: no server paths)."""
        return Path(self.given).name if self.given.startswith("/") else self.given

    def names(self) -> set[str]:
        from .request import model_names

        return model_names(self.given) | model_names(self.source) | {self.public}


class Lease:
    """A request routed to a served model: ``name`` is the Triton model to send it to; ``release()`` when it ended
    (until then an eviction of that model waits)."""

    def __init__(self, server: TritonServer | None, slot: ServedModel | None, name: str):
        self.name, self._server, self._slot = name, server, slot

    def release(self) -> None:
        server, slot, self._server = self._server, self._slot, None
        if server is not None and slot is not None:
            with server._slots_cond:
                slot.inflight = max(0, slot.inflight - 1)
                server._slots_cond.notify_all()


# ---------------------------------------------------------------------------------------------------------------------
# pure helpers


def local_host(host: str) -> str:
    """The address a local client uses to reach a server bound to ``host`` (loopback for "all addresses"), bracketed
    for IPv6 so it can go into a URL."""
    host = _LOOPBACK.get(host, host)
    return f"[{host}]" if ":" in host else host


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free now (Triton rejects port 0, so we pick; a race with another process is retried)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pbtxt_string(value: str) -> str:
    return json.dumps(str(value))  # a JSON string literal is a valid protobuf text string literal


def set_config_parameters(text: str, params: Mapping[str, Any]) -> str:
    """Set ``parameters: { key: "K" value: { string_value: "V" } }`` entries of a config.pbtxt text: an existing
    key's value is replaced in place, a new key is appended."""
    for key, value in params.items():
        entry = f'parameters: {{ key: {_pbtxt_string(key)} value: {{ string_value: {_pbtxt_string(value)} }} }}'
        pattern = re.compile(
            r'parameters:\s*\{\s*key:\s*"' + re.escape(key) + r'"\s*value:\s*\{\s*string_value:\s*"(?:[^"\\]|\\.)*"'
            r'\s*\}\s*\}')
        text, count = pattern.subn(lambda _m, e=entry: e, text)
        if count == 0:
            text = text.rstrip("\n") + "\n" + entry + "\n"
    return text


def set_instance_count(text: str, count: int) -> str:
    """Replace the ``count`` of the (single) instance_group of a config.pbtxt text."""
    new, n = re.subn(r"(instance_group\s*\[\s*\{[^}]*?count:\s*)\d+", lambda m: f"{m.group(1)}{int(count)}", text)
    if n != 1:
        raise ValueError("expected exactly one instance_group with a count in config.pbtxt")
    return new


def set_instance_kind(text: str, kind: str) -> str:
    """Replace the ``kind`` of the (single) instance_group (``KIND_CPU`` | ``KIND_GPU``: one group of ``count``
    instances on every visible GPU)."""
    if kind not in ("KIND_CPU", "KIND_GPU"):
        raise ValueError(f"instance kind must be KIND_CPU or KIND_GPU, got {kind!r}")
    new, n = re.subn(r"(instance_group\s*\[\s*\{[^}]*?kind:\s*)KIND_\w+", lambda m: f"{m.group(1)}{kind}", text)
    if n != 1:
        raise ValueError("expected exactly one instance_group with a kind in config.pbtxt")
    return new


def set_queue_policy(text: str, max_queue_size: int | None = None, queue_timeout: float | None = None) -> str:
    """Set ``max_queue_size`` (requests waiting for an instance; more are refused at once with UNAVAILABLE) and
    ``default_timeout_microseconds`` (seconds → µs a request may wait; then refused) of the default queue policy."""
    for key, value in (("max_queue_size", max_queue_size),
                       ("default_timeout_microseconds", None if queue_timeout is None else round(queue_timeout * 1e6))):
        if value is None:
            continue
        if int(value) < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
        text, n = re.subn(r"(default_queue_policy\s*\{[^}]*?" + key + r":\s*)\d+", lambda m, v=int(value):
                          f"{m.group(1)}{v}", text)
        if n != 1:
            raise ValueError(f"expected one default_queue_policy with {key} in config.pbtxt")
    return text


def set_model_name(text: str, name: str) -> str:
    """Replace the top-level ``name:`` of a config.pbtxt text (Triton wants it equal to the model's folder)."""
    new, n = re.subn(r'^name:\s*"(?:[^"\\]|\\.)*"', lambda _m: f"name: {_pbtxt_string(name)}", text, flags=re.M)
    if n != 1:
        raise ValueError("expected exactly one top-level name in config.pbtxt")
    return new


def stage_repository(target: Path, models: Sequence[str], params: Mapping[str, Any], instance_count: int | None = None,
                     source: Path = REPOSITORY, *, instance_kind: str | None = None, max_queue_size: int | None = None,
                     queue_timeout: float | None = None, suffix: str = "") -> Path:
    """Copy ``models`` of ``source`` into ``target`` (as ``<model><suffix>``: one Triton model per allowed source)
    with their config.pbtxt parameters, instance group and queue policy set → ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in models:
        if not (source / name / "config.pbtxt").is_file():
            raise FileNotFoundError(f"no model {name!r} in {source} (expected {source / name / 'config.pbtxt'})")
        shutil.copytree(source / name, target / f"{name}{suffix}", ignore=shutil.ignore_patterns("__pycache__"))
        config = target / f"{name}{suffix}" / "config.pbtxt"
        text = set_config_parameters(config.read_text(), params)
        if suffix:
            text = set_model_name(text, f"{name}{suffix}")
        if instance_count is not None:
            text = set_instance_count(text, instance_count)
        if instance_kind is not None:
            text = set_instance_kind(text, instance_kind)
        text = set_queue_policy(text, max_queue_size, queue_timeout)
        config.write_text(text)
    return target


def _model_source(model: str) -> str:
    """A model source as the server keeps it: ``tiny``, a ``models:/`` URI, or a pipeline folder's absolute path."""
    model = str(model).strip()
    if model == "tiny" or model.startswith("models:/"):
        if model.startswith("models:/") and not _MODELS_URI.match(model):
            raise ValueError(f"expected models:/NAME@ALIAS or models:/NAME/VERSION, got {model!r}")
        return model
    folder = Path(model).resolve()
    if not Path(folder, "model_index.json").is_file():
        raise FileNotFoundError(f"{model} is not a pipeline folder (no model_index.json)")
    return str(folder)


def bundled_tritonserver() -> tuple[Path, Path, Path]:
    """(tritonserver binary, python backend folder, the stub for this Python) from the nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError as exc:
        raise TritonLaunchError(f"nvidia-pytriton is not installed and {TRITONSERVER_ENV} is not set") from exc
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    binary = root / "bin" / "tritonserver"
    for path in (binary, root / "backends" / "python" / "libtriton_python.so", stub):
        if not path.exists():
            raise TritonLaunchError(f"{path} is missing from the nvidia-pytriton wheel (Python {py})")
    return binary, root / "backends" / "python", stub


def _proc_children(ppid: int) -> list[tuple[int, list[str]]]:
    """Live (not zombie) children of ``ppid`` with their argv (Linux /proc)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) != ppid or fields[0] == "Z":
                continue
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        out.append((int(entry.name), [a.decode(errors="replace") for a in argv if a]))
    return out


_PR_SET_PDEATHSIG = 1
try:  # resolved before any fork: the child only calls it
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with(parent: int):
    """A ``preexec_fn``: the child gets SIGKILL when the thread that started it dies (``PR_SET_PDEATHSIG``); if the
    parent is already gone between fork and prctl, the child exits at once."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → ``{(name, sorted label pairs): value}`` (comments and malformed lines skipped)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or "")))
        try:
            out[(m[1], labels)] = float(m[3])
        except ValueError:
            continue
    return out


def _reachable(kill, target: int) -> bool:
    """Signal 0 through ``kill`` (``os.kill`` or ``os.killpg``): the process or group exists (another user's counts)."""
    try:
        kill(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_alive(pid: int) -> bool:
    return _reachable(os.kill, pid)


def _group_alive(pgid: int) -> bool:
    return _reachable(os.killpg, pgid)


def sweep_orphan_shm(root: Path = Path("/dev/shm")) -> list[Path]:
    """Remove the Python-backend regions of launchers that are gone (``ea<pid>_<id>_*`` whose pid no longer exists).

    A SIGKILLed ``serve`` takes tritonserver and its stubs with it (parent-death signal), but a stub killed before its
    watchdog ran leaves its region behind; every start sweeps such orphans, so none accumulate."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for path in root.glob("ea*_*_*"):
        head = path.name.split("_", 1)[0][2:]
        if not head.isdigit():
            continue
        if _pid_alive(int(head)):
            continue  # its launcher lives: not an orphan
        try:
            path.unlink()
            removed.append(path)
        except OSError as exc:
            logger.warning("could not remove %s: %s", path, exc)
    return removed


# ---------------------------------------------------------------------------------------------------------------------
# the server


class TritonServer:
    """A local ``tritonserver`` serving EasyAnimate (a context manager).

    Args:
        model: ``tiny``, a pipeline folder, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``. An alias is resolved
            here to a version, and both models load that version (so they serve the same weights).
        models: which repository models to load (``easyanimate``, ``easyanimate_stream``).
        tracking_uri: MLflow URI (default: ``$MLFLOW_TRACKING_URI``) for ``models:/`` sources.
        host: address both endpoints bind to (default loopback; ``0.0.0.0`` in a container).
        http_port, grpc_port, metrics_port: None picks free ports.
        watch_alias: poll the alias (``models:/NAME@ALIAS`` only) and reload when it moves; reload crashed models.
        poll_interval: seconds between watcher polls.
        parameters: more config.pbtxt parameters (``device``, ``dtype``, ``torch_threads``, ``max_size``, …).
        instance_count: instances per model (each a process with its own pipeline copy); None = config.pbtxt's.
        lora_dir: folder of official-format LoRA ``.safetensors`` that requests may name in ``LORA`` (by file name);
            None = LoRA disabled (a request naming one gets an error).
        env: extra environment for the server and its stubs (e.g. ``EASYANIMATE_MODEL_CACHE``).
        startup_timeout: seconds to wait for the server and its models to be ready (big models download first).
        exit_timeout: seconds ``stop`` gives the server to exit (in-flight generations stop at their next denoising
            step as soon as ``stop`` begins) before it SIGKILLs the process group.
        max_cost, deadline_s: admission per request (the ``max_cost`` / ``deadline_s`` model parameters): the work
            budget in ``frames*height*width*steps`` (x2 with CFG) units and the compute deadline in seconds; None =
            the served version's defaults, else sized for the device (``serving.request.default_admission``).
        max_queue, queue_timeout: Triton's queue policy: requests that may wait for an instance (more are refused at
            once with UNAVAILABLE / 503) and seconds one may wait; None = config.pbtxt's (8, 120 s).
        stall_timeout: seconds without progress (no denoising step ended) after which a busy instance is wedged:
            the watcher unloads the model (readiness fails), kills the stuck stub and loads it again. 0 = off;
            None = the deadline + 60 s when a watcher runs.
        metrics_host: address of the metrics port (loopback by default, whatever ``host`` is).
        allow_models: more model sources a request may name in ``MODEL`` (same forms as ``model``); each gets its own
            Triton models (``easyanimate__1``, ``easyanimate_stream__1``, …) staged in the repository and loaded on
            demand (``route``) through the repository API. Every registry version must pass its gates (see
            ``allow_ungated``). ``model`` stays the default (no MODEL).
        max_loaded: how many allowed sources stay loaded at once (each is a full pipeline per instance and model);
            loading another unloads the least recently used first.
        log: None = a log file in the temp folder (its tail is shown on errors), a path, or ``"-"`` = inherit
            this process's stdout/stderr.
        tritonserver, backend_dir: another Triton install (default: ``$EASYANIMATE_TRITONSERVER`` /
            ``$EASYANIMATE_TRITON_BACKENDS``, else the pytriton wheel's).
    """

    def __init__(self, model: str = "tiny", *, models: Sequence[str] = MODELS, tracking_uri: str | None = None,
                 host: str = "127.0.0.1", http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, watch_alias: bool = False, poll_interval: float = 10.0,
                 parameters: Mapping[str, Any] | None = None, instance_count: int | None = None,
                 env: Mapping[str, str] | None = None, startup_timeout: float = 600.0, exit_timeout: int = 30,
                 log: str | os.PathLike | None = None, tritonserver: str | os.PathLike | None = None,
                 backend_dir: str | os.PathLike | None = None, lora_dir: str | os.PathLike | None = None,
                 max_cost: int | None = None, deadline_s: float | None = None, max_queue: int | None = None,
                 queue_timeout: float | None = None, stall_timeout: float | None = None,
                 metrics_host: str = "127.0.0.1", allow_models: Sequence[str] = (), max_loaded: int = 1):
        if not models:
            raise ValueError("models must name at least one of " + ", ".join(MODELS))
        self.model = _model_source(model)
        self.models = tuple(models)
        if int(max_loaded) < 1:
            raise ValueError(f"max_loaded must be >= 1 model, got {max_loaded}")
        self.max_loaded = int(max_loaded)
        sources = [self.model]
        for extra in allow_models:
            extra = _model_source(extra)
            if extra not in sources:
                sources.append(extra)
        self.slots = [ServedModel(i, given, f"__{i}" if i else "") for i, given in enumerate(sources)]
        self._slots_cond = threading.Condition()  # guards the slots' loaded / last_used / inflight
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.host = host
        self._ports = (http_port, grpc_port, metrics_port)
        self.watch_alias = watch_alias
        self.poll_interval = poll_interval
        self.parameters = dict(parameters or {})
        if lora_dir is not None:
            if not Path(lora_dir).is_dir():
                raise FileNotFoundError(f"--lora-dir {lora_dir} is not a folder")
            self.parameters["lora_dir"] = str(Path(lora_dir).resolve())
        self.lora_dir = self.parameters.get("lora_dir") or None
        if max_cost is not None and int(max_cost) < 1:
            raise ValueError(f"max_cost must be >= 1 work unit, got {max_cost}")
        if deadline_s is not None and not float(deadline_s) > 0:
            raise ValueError(f"deadline_s must be > 0 seconds, got {deadline_s}")
        if max_cost:
            self.parameters["max_cost"] = str(int(max_cost))
        if deadline_s:
            self.parameters["deadline_s"] = str(float(deadline_s))
        self.max_queue, self.queue_timeout = max_queue, queue_timeout
        self.deadline_s = deadline_s
        self.stall_timeout = stall_timeout
        self.metrics_host = metrics_host
        self.stop_file: Path | None = None
        self.admission_dir: Path | None = None
        self._admission_cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self.wedged: list[dict[str, Any]] = []  # instances the watcher found wedged: {"model", "instance", "stalled_s"}
        self.instance_count = instance_count
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.exit_timeout = int(exit_timeout)
        self.log = log
        self.tritonserver = tritonserver or os.environ.get(TRITONSERVER_ENV)
        self.backend_dir = backend_dir or os.environ.get(BACKENDS_ENV)
        alias = _MODELS_ALIAS.match(self.model)
        self.alias = (alias["name"], alias["alias"]) if alias else None
        if watch_alias and self.alias is None:
            logger.warning("--watch-alias only follows models:/NAME@ALIAS sources; %s is watched for crashes only",
                           self.model)
        self.served_version: str | None = None  # the registry version both models serve (alias sources)
        self._failed_version: str | None = None  # an alias target that failed to load: not retried every poll
        # the key of the restricted APIs (RESTRICTED_APIS): only this object (launcher + watcher) holds it
        self._admin_key = secrets.token_urlsafe(32)
        # serve alias targets without a passed evaluation gate (``promotion`` tag); off: such a version is refused
        self.allow_ungated = False
        self.shm_prefix = f"ea{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self.proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = None
        self.tmp: Path | None = None
        self.log_path: Path | None = None
        self.reloads: list[dict[str, Any]] = []  # what the watcher did: {"model", "reason", "version", "ok"}
        self.evictions: list[dict[str, Any]] = []  # sources unloaded to make room: {"model", "version", "for"}
        self._base_params: dict[str, Any] = {}
        self._log_file = None
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.RLock()  # one repository change at a time (watcher, loads on demand, callers)

    # -- addresses ------------------------------------------------------------------------------------------------

    @property
    def _local_host(self) -> str:
        return local_host(self.host)

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the KServe v2 HTTP endpoint (loopback when bound to all addresses)."""
        return f"http://{self._local_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint (what ``tritonclient.grpc`` takes)."""
        return f"{self._local_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        host = _LOOPBACK.get(self.metrics_host, self.metrics_host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.metrics_port}/metrics"

    def metrics(self, timeout: float = 5.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The server's Prometheus metrics (Triton's and ours) → ``{(name, sorted label pairs): value}``."""
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as resp:
            return _parse_metrics(resp.read().decode(errors="replace"))

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the series of ``name`` whose labels include ``labels`` (0 when none)."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.metrics().items() if n == name and want <= set(lab))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> TritonServer:
        """Start tritonserver, load the models, wait until ready (raises ``TritonLaunchError`` with the log tail)."""
        if self.proc is not None:
            raise RuntimeError("this TritonServer is already started")
        sweep_orphan_shm()
        self._stop_watch.clear()  # a stopped server may be started again (serving/supervisor.py restarts it)
        self.tmp = Path(tempfile.mkdtemp(prefix="easyanimate-triton-"))
        try:
            backends = self._backend_directory()
            source = self._resolve_source()
            self.stop_file = self.tmp / "stop"  # its existence tells every instance to stop at the next step
            self.admission_dir = self.tmp / "admission"
            self.admission_dir.mkdir()
            self.cancel_dir = self.tmp / "cancel"  # the front marks HTTP requests whose client hung up
            self.cancel_dir.mkdir()
            with self._slots_cond:
                for slot in self.slots:
                    slot.loaded, slot.inflight = False, 0
            self.slots[0].source, self.slots[0].version = source, self.served_version
            for slot in self.slots[1:]:
                slot.source, slot.version = self._resolve_allowed(slot.given)
            if len(self.slots) > 1:  # clients (the web UI) learn each one's defaults before it ever loads
                for slot in self.slots:
                    slot.defaults = self._registered_defaults(slot)
            self._base_params = {"tracking_uri": self.tracking_uri or "", "stop_file": str(self.stop_file),
                                 "shm_prefix": self.shm_prefix, "admission_dir": str(self.admission_dir),
                                 "cancel_dir": str(self.cancel_dir), **self.parameters}
            repo = self.tmp / "models"
            for slot in self.slots:
                self._stage(slot)
            auto_ports = all(p is None for p in self._ports)
            for attempt in range(3 if auto_ports else 1):
                self._launch(repo, backends)
                try:
                    self._wait_ready()
                    with self._slots_cond:
                        self.slots[0].loaded, self.slots[0].last_used = True, time.monotonic()
                    break
                except TritonLaunchError as exc:
                    busy = "already in use" in str(exc) or "Address in use" in str(exc)
                    self._kill()
                    if not (busy and auto_ports and attempt < 2):
                        raise
                    logger.warning("port taken while starting tritonserver; retrying with other ports")
        except BaseException:
            self.stop()
            raise
        if self.watch_alias or self.stall_timeout:
            self._watcher = threading.Thread(target=self._watch, name="triton-watch", daemon=True)
            self._watcher.start()
        logger.info("tritonserver %s ready: http %s grpc %s (%s)", self.pid, self.http_url, self.grpc_url, source)
        return self

    def _backend_directory(self) -> Path:
        if self.backend_dir:
            return Path(self.backend_dir)
        _binary, python_dir, stub = bundled_tritonserver()
        target = self.tmp / "backends" / "python"
        target.mkdir(parents=True)
        for path in (python_dir / "libtriton_python.so", python_dir / "triton_python_backend_utils.py", stub):
            (target / path.name).symlink_to(path)
        return target.parent

    def _binary(self) -> str:
        return str(self.tritonserver) if self.tritonserver else str(bundled_tritonserver()[0])

    def _resolve_source(self) -> str:
        """The model_source both models load: an alias resolved to its current version (so a reload is explicit)."""
        if self.alias is None:
            return self.model
        version = self._alias_version()
        refusal = self._gate_refusal(version)
        if refusal:
            raise TritonLaunchError(f"models:/{self.alias[0]}@{self.alias[1]} points at version {version}, which is "
                                    f"not served: {refusal}")
        self.served_version = version
        return f"models:/{self.alias[0]}/{self.served_version}"

    def _gate_refusal(self, version: str, name: str | None = None) -> str | None:
        """Why registry version ``version`` (of ``name``, default: the alias's model) must not be served (None: its
        evaluation passed the gates, or ``allow_ungated``); see ``serving.registry.gate_refusal``."""
        if self.allow_ungated:
            return None
        from mlflow.tracking import MlflowClient

        from .registry import gate_refusal

        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return gate_refusal(client.get_model_version(name or self.alias[0], version))

    def _resolve_allowed(self, given: str) -> tuple[str, str | None]:
        """An allowed (not default) source → (what its stubs load, registry version): an alias resolved to its
        version now; every registry version, pinned or aliased, must pass its gates (or ``allow_ungated``)."""
        m = _MODELS_URI.match(given)
        if m is None:
            return given, None
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        try:
            version = str(client.get_model_version_by_alias(m["name"], m["alias"]).version if m["alias"]
                          else client.get_model_version(m["name"], m["version"]).version)
            refusal = self._gate_refusal(version, m["name"])
        except Exception as exc:  # not registered, registry unreachable: one line, not a traceback
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise TritonLaunchError(f"allowed model {given}: not found in the registry ({first})") from None
        if refusal:
            raise TritonLaunchError(f"allowed model {given} (version {version}) is not served: {refusal}")
        return f"models:/{m['name']}/{version}", version

    def _registered_defaults(self, slot: ServedModel) -> dict[str, Any] | None:
        """A source's generate defaults as the model will resolve them (best effort: None when unknown)."""
        from .request import merge_defaults

        try:
            if slot.source == "tiny":
                from easyanimate.config import load_config

                raw = dict(vars(load_config("tiny").generate))
            elif _MODELS_URI.match(slot.source):
                from mlflow.tracking import MlflowClient

                from .triton_model import registered_defaults

                m = _MODELS_URI.match(slot.source)
                client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
                raw = registered_defaults(client, m["name"], m["version"])
            else:
                raw = {}
            return {k: v for k, v in merge_defaults(raw).items() if k != "lora"}
        except Exception as exc:  # the registry briefly unreachable: the model publishes them when it loads
            logger.warning("generate defaults of %s unknown until it loads: %s", slot.public, exc)
            return None

    def _stage(self, slot: ServedModel) -> None:
        """(Re)write the slot's Triton models in the staged repository (a later explicit load reads them)."""
        repo = self.tmp / "models"
        for model in self.models:
            if (repo / f"{model}{slot.suffix}").exists():
                shutil.rmtree(repo / f"{model}{slot.suffix}")
        alias = slot.given if _MODELS_ALIAS.match(slot.given) else ""
        params = {"model_source": slot.source, "model_alias": alias, "served_as": slot.public,
                  "model_names": json.dumps(sorted(slot.names())), **self._base_params}
        kind = "KIND_GPU" if str(self.parameters.get("device", "")) == "cuda" else None
        stage_repository(repo, self.models, params, self.instance_count, instance_kind=kind,
                         max_queue_size=self.max_queue, queue_timeout=self.queue_timeout, suffix=slot.suffix)

    def _alias_version(self) -> str:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return str(client.get_model_version_by_alias(*self.alias).version)

    def _environment(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])  # the isolated stub finds its prefix via PATH
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        env["EASYANIMATE_PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        env["EASYANIMATE_LAUNCHER_PID"] = str(os.getpid())  # the stubs kill the server if this process dies
        if self.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        env.pop("PYTHONPATH", None)  # ignored by the isolated stub anyway; keep the server's view honest
        return env

    def _launch(self, repo: Path, backends: Path) -> None:
        http, grpc, metrics = (p or free_port(_LOOPBACK.get(self.host, self.host)) for p in self._ports)
        self.http_port, self.grpc_port, self.metrics_port = http, grpc, metrics
        cmd = [
            self._binary(), "--model-repository", str(repo), "--backend-directory", str(backends),
            "--disable-auto-complete-config", "--pinned-memory-pool-byte-size=0",
            f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}",
            f"--http-address={self.host}", f"--grpc-address={self.host}", f"--metrics-address={self.metrics_host}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--model-control-mode=explicit", *[f"--load-model={m}" for m in self.models],
            "--strict-readiness=true", f"--exit-timeout-secs={self.exit_timeout}", "--log-verbose=0",
            f"--http-restricted-api={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self._admin_key}",
            f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self._admin_key}",
        ]
        if self.log == "-":
            out = None
        else:
            self.log_path = Path(self.log) if self.log else self.tmp / "tritonserver.log"
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self.log_path.open("ab")
            out = self._log_file
        # own session: SIGINT from a terminal reaches us, not the server; the stubs share its process group.
        # PR_SET_PDEATHSIG: the server dies with us, even after our SIGKILL (its stubs follow it: they watch their
        # parent). The signal fires when the *thread* that forked exits, so only a start from the main thread sets
        # it; a start from another thread relies on that thread living as long as the server.
        preexec = _die_with(os.getpid()) if threading.current_thread() is threading.main_thread() else None
        self.proc = subprocess.Popen(cmd, env=self._environment(), stdout=out,
                                     stderr=subprocess.STDOUT if out else None, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=preexec)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(log not captured)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> tuple[int, str]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.http_url}{path}", data=data, method=method,
                                     headers={ADMIN_HEADER: self._admin_key,
                                              **({"Content-Type": "application/json"} if data else {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def _ok(self, path: str) -> bool:
        try:
            return self._request("GET", path, timeout=5)[0] == 200
        except OSError:
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise TritonLaunchError(f"tritonserver exited with {self.proc.returncode} while starting:\n"
                                        f"{self.log_tail()}")
            if self._ok("/v2/health/ready") and all(self._ok(f"/v2/models/{m}/ready") for m in self.models):
                return
            if time.monotonic() > deadline:
                raise TritonLaunchError(f"tritonserver not ready after {self.startup_timeout:.0f} s:\n"
                                        f"{self.log_tail()}")
            time.sleep(0.2)

    def is_live(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self._ok("/v2/health/live")

    def is_ready(self, model: str | None = None) -> bool:
        return self._ok(f"/v2/models/{model}/ready" if model else "/v2/health/ready")

    def stub_pids(self, model: str) -> list[int]:
        """Live stub processes of ``model`` (one per instance; two briefly while a reload swaps them)."""
        if self.proc is None:
            return []
        marker = f"/{model}/1/model.py"
        return [pid for pid, argv in _proc_children(self.proc.pid)
                if len(argv) > 1 and argv[0].endswith("triton_python_backend_stub") and argv[1].endswith(marker)]

    def wait(self) -> int:
        """Block until tritonserver exits → its return code."""
        return self.proc.wait() if self.proc else 0

    def stop(self, timeout: float | None = None) -> None:
        """Tell in-flight generations to stop at their next step (the stop file), SIGINT, wait (``exit_timeout`` by
        default), SIGKILL the process group; remove the SHM segments and the temp folder. Safe to call twice."""
        if self.proc is not None and self.stop_file is not None:
            try:
                self.stop_file.touch()
            except OSError as exc:
                logger.warning("could not write the stop file %s: %s", self.stop_file, exc)
        self._stop_watch.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)  # a load in progress fails when the server stops: no need to wait it out
            self._watcher = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.send_signal(signal.SIGINT)
                    # Triton gives up on in-flight requests after exit_timeout and exits within about a second
                    self.proc.wait(timeout=self.exit_timeout + 3 if timeout is None else timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("tritonserver %s did not stop in time: SIGKILL", self.proc.pid)
            self._kill()
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._remove_shm()
        if self.tmp is not None:
            if self.log_path is not None and self.log_path.is_relative_to(self.tmp):
                self.log_path = None
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def _kill(self) -> None:
        """SIGKILL whatever is left of the server's process group (server, stubs) and reap the server."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the server's pid
        deadline = time.monotonic() + 15
        while _group_alive(pgid) and time.monotonic() < deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                break
            if self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)
        if _group_alive(pgid):
            logger.error("processes of tritonserver group %s survived SIGKILL", pgid)

    def shm_segments(self) -> list[Path]:
        return sorted(Path("/dev/shm").glob(f"{self.shm_prefix}*")) if Path("/dev/shm").is_dir() else []

    def _remove_shm(self) -> None:
        for path in self.shm_segments():
            try:
                path.unlink()
            except OSError as exc:
                logger.warning("could not remove %s: %s", path, exc)

    # -- explicit loads and the watcher ------------------------------------------------------------------------------

    def model_config(self, model: str) -> dict[str, Any]:
        status, body = self._request("GET", f"/v2/models/{model}/config")
        if status != 200:
            raise TritonLaunchError(f"config of {model}: HTTP {status}: {body}")
        return json.loads(body)

    def load(self, model: str, source: str | None = None, unload_first: bool = False) -> None:
        """Explicitly (re)load ``model``; ``source`` replaces its ``model_source`` parameter (a config override:
        Triton loads the new one while the old keeps serving, then swaps). ``unload_first`` for a crashed stub."""
        with self._lock:
            config = self.model_config(model)
            if source is not None:
                config.setdefault("parameters", {})["model_source"] = {"string_value": source}
            if unload_first:
                self._request("POST", f"/v2/repository/models/{model}/unload", {}, timeout=60)
            status, body = self._request("POST", f"/v2/repository/models/{model}/load",
                                         {"parameters": {"config": json.dumps(config)}}, timeout=self.startup_timeout)
        if status != 200:
            raise TritonLaunchError(f"loading {model} ({source or 'same source'}) failed: HTTP {status}: {body}")

    # -- several allowed models: routing, loading on demand, least-recently-used unloading ---------------------------

    def slot_for(self, value: str | None) -> ServedModel:
        """The allowed model a MODEL value names (empty/None: the default); ``ModelChoiceError`` names the allowed
        values otherwise (and when a short form such as a version number fits two of them)."""
        value = (value or "").strip()
        if not value:
            return self.slots[0]
        exact = [s for s in self.slots if value in (s.given, s.public)]
        found = exact or [s for s in self.slots if value in s.names()]
        if len(found) == 1:
            return found[0]
        allowed = ", ".join(s.public + (" (default)" if s.index == 0 else "") for s in self.slots)
        if found:
            raise ModelChoiceError(f"MODEL {value[:80]!r} names several allowed models ("
                                   f"{', '.join(s.public for s in found)}): send one of them in full")
        raise ModelChoiceError(f"MODEL {value[:80]!r} is not served here: allowed {allowed}")

    def route(self, model: str, value: str | None) -> Lease:
        """A request for public model ``model`` (``easyanimate`` | ``easyanimate_stream``) naming ``value`` in MODEL →
        a ``Lease`` on the Triton model that answers it, loading that source first when it is not loaded (after
        unloading the least recently used ones beyond ``max_loaded``). Blocks while a load runs."""
        slot = self.slot_for(value)
        if model not in self.models:
            raise ModelChoiceError(f"model {model!r} is not served here")
        with self._slots_cond:
            if slot.loaded:
                slot.last_used, slot.inflight = time.monotonic(), slot.inflight + 1
                return Lease(self, slot, f"{model}{slot.suffix}")
        with self._lock:  # one repository change at a time (the watcher's reloads take it too)
            with self._slots_cond:
                loaded = slot.loaded
            if not loaded:
                self._make_room(slot)
                self._load_slot(slot)
            with self._slots_cond:
                slot.last_used, slot.inflight = time.monotonic(), slot.inflight + 1
        return Lease(self, slot, f"{model}{slot.suffix}")

    def _make_room(self, keep: ServedModel) -> None:
        """Unload least-recently-used sources until one more fits ``max_loaded`` (called under ``_lock``); each
        waits for the requests routed to it to end (at most the deadline), Triton then drains the rest."""
        while True:
            with self._slots_cond:
                loaded = [s for s in self.slots if s.loaded and s is not keep]
                if len(loaded) < self.max_loaded:
                    return
                victim = min(loaded, key=lambda s: s.last_used)
                victim.loaded = False  # new requests for it wait on _lock, then load it again
                waited = self._slots_cond.wait_for(lambda v=victim: v.inflight == 0,
                                                   timeout=float(self.deadline_s or 600) + 60)
            logger.info("unloading %s (least recently used; --max-loaded %d)%s", victim.public, self.max_loaded,
                        "" if waited else ": requests still running after the deadline")
            for model in self.models:
                self._request("POST", f"/v2/repository/models/{model}{victim.suffix}/unload", {}, timeout=60)
            names = {f"{m}{victim.suffix}" for m in self.models}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # Triton's unload returns before the stubs are gone
                states = {row.get("name"): row.get("state") for row in self.repository_index()}
                if not any(states.get(n) in ("READY", "UNLOADING") for n in names):
                    break
                time.sleep(0.1)
            self.evictions.append({"model": victim.public, "version": victim.version, "time": time.time(),
                                   "for": keep.public})

    def _load_slot(self, slot: ServedModel) -> None:
        """Explicitly load a source's Triton models from the staged repository (called under ``_lock``)."""
        started = time.monotonic()
        answers: dict[str, tuple[int, str]] = {}

        def load(model: str) -> None:
            try:
                answers[model] = self._request("POST", f"/v2/repository/models/{model}{slot.suffix}/load", {},
                                               timeout=self.startup_timeout)
            except OSError as exc:
                answers[model] = (0, str(exc))

        loaders = [threading.Thread(target=load, args=(m,), daemon=True) for m in self.models]
        for t in loaders:  # the unary and the streaming model load side by side, as at start
            t.start()
        for t in loaders:
            t.join()
        for model in self.models:
            status, body = answers.get(model, (0, "no answer"))
            if status != 200:
                for other in self.models:
                    self._request("POST", f"/v2/repository/models/{other}{slot.suffix}/unload", {}, timeout=60)
                self._record(f"{model}{slot.suffix}", "requested by MODEL", slot.version, False, body[:500])
                raise TritonLaunchError(f"loading {slot.public} failed: HTTP {status}: {body[:500]}")
        with self._slots_cond:
            slot.loaded = True
        self._record(f"{'+'.join(self.models)}{slot.suffix}", "requested by MODEL", slot.version, True)
        logger.info("loaded %s on demand in %.1f s", slot.public, time.monotonic() - started)

    def repository_index(self) -> list[dict[str, Any]]:
        """Triton's repository index (every staged model with its state: READY, UNAVAILABLE after an unload, …)."""
        status, body = self._request("POST", "/v2/repository/index", {})
        if status != 200:
            raise TritonLaunchError(f"repository index: HTTP {status}: {body[:300]}")
        return json.loads(body)

    def upstream_name(self, model: str) -> str:
        """The Triton model that stands for public ``model`` in health and metadata calls: the default source's
        when loaded, else the most recently used loaded one (all share one schema)."""
        with self._slots_cond:
            loaded = [s for s in self.slots if s.loaded]
        if not loaded or self.slots[0].loaded:
            return model
        return f"{model}{max(loaded, key=lambda s: s.last_used).suffix}"

    def catalog(self) -> dict[str, str]:
        """What clients may learn about the served models (the front's public model config ``parameters``; no
        server paths): ``default_model``, ``allowed_models`` / ``loaded_models`` (JSON lists), ``max_loaded``,
        ``model_versions`` and ``generate_defaults`` (JSON objects by allowed model; defaults of the sources loaded
        since start), ``lora_enabled``."""
        with self._slots_cond:
            slots = [(s.public, s.version, s.loaded, s.suffix, s.defaults) for s in self.slots]
        defaults = {}
        for public, _version, _loaded, suffix, registered in slots:
            path = (self.admission_dir / f"{self.models[0]}{suffix}.json") if self.admission_dir else None
            try:  # what the model resolved when it loaded, else what its registration says
                defaults[public] = json.loads(path.read_text()).get("generate") if path else registered
            except (OSError, ValueError):
                defaults[public] = registered
        return {"default_model": slots[0][0], "allowed_models": json.dumps([p for p, *_ in slots]),
                "loaded_models": json.dumps([p for p, _v, loaded, *_ in slots if loaded]),
                "max_loaded": str(self.max_loaded),
                "model_versions": json.dumps({p: v for p, v, *_ in slots}),
                "generate_defaults": json.dumps({k: v for k, v in defaults.items() if v}),
                "lora_enabled": "true" if self.lora_dir else "false"}

    def _loaded_models(self) -> list[str]:
        with self._slots_cond:
            return [f"{m}{s.suffix}" for s in self.slots if s.loaded for m in self.models]

    def _record(self, model: str, reason: str, version: str | None, ok: bool, error: str = "") -> None:
        self.reloads.append({"model": model, "reason": reason, "version": version, "ok": ok, "error": error,
                             "time": time.time()})
        (logger.info if ok else logger.error)("reload %s (%s, version %s): %s", model, reason, version,
                                              "ok" if ok else error)

    def check_once(self) -> None:
        """One watcher pass: follow the alias; reload crashed or unready models."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.alias is not None:
            try:
                version = self._alias_version()
            except Exception as exc:  # registry briefly unreachable: keep serving what we have
                logger.warning("could not resolve models:/%s@%s: %s", *self.alias, exc)
                version = self.served_version
            if version not in (self.served_version, self._failed_version):
                try:
                    refusal = self._gate_refusal(version)
                except Exception as exc:  # cannot read the gate record now: keep serving, look again next poll
                    logger.warning("could not read the gate record of %s version %s: %s", self.alias[0], version, exc)
                    refusal, version = None, self.served_version
                if refusal:
                    logger.error("alias %s of %s moved to version %s: NOT served, %s; still serving version %s",
                                 self.alias[1], self.alias[0], version, refusal, self.served_version)
                    for model in self.models:
                        self.reloads.append({"model": model, "reason": f"alias {self.alias[1]} moved",
                                             "version": version, "ok": False, "error": f"refused: {refusal}",
                                             "time": time.time()})
                    self._failed_version = version  # checked again only when the alias moves on
                    version = self.served_version
            if version not in (self.served_version, self._failed_version):
                source = f"models:/{self.alias[0]}/{version}"
                default = self.slots[0]
                ok = True
                with self._lock:
                    with self._slots_cond:
                        live = default.loaded
                    for model in self.models if live else ():  # unloaded (--max-loaded): loads on demand
                        try:
                            self.load(model, source)
                            self._record(model, f"alias {self.alias[1]} moved", version, True)
                        except Exception as exc:
                            ok = False
                            self._record(model, f"alias {self.alias[1]} moved", version, False, str(exc))
                    if ok:
                        self.served_version, self._failed_version = version, None
                        default.source, default.version = source, version
                        self._stage(default)  # what a later load (on demand, after an unload) reads
                        if not live:
                            self._record(f"{'+'.join(self.models)}", f"alias {self.alias[1]} moved (not loaded: "
                                         "staged, loaded on demand)", version, True)
                    else:  # keep serving what loads; try again only when the alias moves on
                        self._failed_version = version
        if not self.is_live():
            return
        self.check_wedged()
        expected = self.instance_count or 1
        if not self._lock.acquire(blocking=False):  # a load/unload on demand is under way: look next poll
            return
        try:
            for model in self._loaded_models():
                ready = self.is_ready(model)
                stubs = len(self.stub_pids(model))
                if ready and stubs >= expected:
                    continue
                reason = "not ready" if not ready else f"stub process died ({stubs}/{expected} alive)"
                try:
                    self.load(model, unload_first=True)
                    self._record(model, reason, self.served_version, True)
                except Exception as exc:
                    self._record(model, reason, self.served_version, False, str(exc))
        finally:
            self._lock.release()

    def admit(self, model: str, values: Mapping[str, float]) -> None:
        """The work-budget check before a request is queued (the front calls it): ``values`` are the request's
        cost inputs (``serving.request.COST_INPUTS``); raises ``OverBudget`` as the model would. Without what the
        model published (not loaded yet) the request goes on and the model checks it."""
        from .request import check_budget_early

        folder = self.admission_dir
        if folder is None:
            return
        path = folder / f"{model}.json"
        try:
            mtime = path.stat().st_mtime
            cached = self._admission_cache.get(model)
            if cached is None or cached[0] != mtime:
                cached = (mtime, json.loads(path.read_text()))
                self._admission_cache[model] = cached
        except (OSError, ValueError):
            return
        check_budget_early(values, cached[1]["defaults"], cached[1]["max_cost"])

    def check_wedged(self) -> list[dict[str, Any]]:
        """Find instances that are generating but made no progress for ``stall_timeout`` s (our metrics
        ``easyanimate_inflight`` and ``easyanimate_last_progress_timestamp_seconds``) and recover each model: unload
        it (readiness fails from that moment), SIGKILL the stuck stub so the unload can finish, load it again.
        Returns what it found."""
        if not self.stall_timeout or self.proc is None:
            return []
        try:
            metrics = self.metrics()
        except OSError:
            return []
        now, found = time.time(), []
        for (name, labels), value in metrics.items():
            if name != "easyanimate_inflight" or value < 1:
                continue
            last = metrics.get(("easyanimate_last_progress_timestamp_seconds", labels))
            if last is None or now - last < self.stall_timeout:
                continue
            lab = dict(labels)
            found.append({"model": lab.get("model", ""), "instance": lab.get("instance", ""),
                          "stalled_s": round(now - last, 1), "time": now})
        for item in found:
            logger.error("instance %s of %s made no progress for %.0f s (stall timeout %g s): wedged, reloading",
                         item["instance"], item["model"], item["stalled_s"], self.stall_timeout)
            self.wedged.append(item)
            self._recover_wedged(item["model"], item["instance"])
        return found

    def _recover_wedged(self, model: str, instance: str) -> None:
        try:
            config = self.model_config(model)  # while it is loaded: the reload uses the same config
        except (OSError, TritonLaunchError) as exc:
            self._record(model, f"instance {instance} wedged", self.served_version, False, str(exc))
            return
        unloading = threading.Thread(target=self._request, args=("POST", f"/v2/repository/models/{model}/unload", {}),
                                     kwargs={"timeout": 60}, daemon=True)
        def kill(pids):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        old = set(self.stub_pids(model))
        with self._lock:
            unloading.start()  # the model is not ready from here on
            time.sleep(0.5)
            kill(pid for pid, argv in _proc_children(self.proc.pid)
                 if argv and argv[0].endswith("triton_python_backend_stub") and instance in argv)
            unloading.join(timeout=10)
            # the Python backend may never answer the wedged instance's request; the unload then waits for it and
            # the model's other old instances stay: stop them too (their requests fail; the model is reloading)
            kill(old & set(self.stub_pids(model)))
            unloading.join(timeout=50)
            status, body = self._request("POST", f"/v2/repository/models/{model}/load",
                                         {"parameters": {"config": json.dumps(config)}}, timeout=self.startup_timeout)
            kill(old & set(self.stub_pids(model)))
        try:
            if status != 200:
                raise TritonLaunchError(f"loading {model} failed: HTTP {status}: {body}")
            self._record(model, f"instance {instance} wedged", self.served_version, True)
        except Exception as exc:
            self._record(model, f"instance {instance} wedged", self.served_version, False, str(exc))

    def _watch(self) -> None:
        while not self._stop_watch.wait(self.poll_interval):
            try:
                self.check_once()
            except Exception:  # the watcher must outlive a bad poll
                logger.exception("triton watcher pass failed")


__all__ = ["MODELS", "REPOSITORY", "Lease", "ModelChoiceError", "ServedModel", "TritonLaunchError", "TritonServer",
           "bundled_tritonserver", "free_port", "set_model_name",
           "set_config_parameters", "set_instance_count", "set_instance_kind", "set_queue_policy", "stage_repository"]

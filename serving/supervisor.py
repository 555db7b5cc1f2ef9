"""What ``easyanimate serve`` runs: the validating front on the public address, a supervised tritonserver behind it.

``Endpoint(server, host=…, http_port=…, grpc_port=…, metrics_port=…)`` takes a configured (not started)
``TritonServer`` bound to loopback on free ports and

- starts it, then the ``Front`` (``serving/front.py``) on the public host and ports, forwarding to it;
- watches it: when tritonserver exits without being asked to (a crash, the OOM killer, ``kill -9``), the front answers
  503 "restarting" / UNAVAILABLE, the dead server's process group, shared memory and temp folder are cleaned
  (``TritonServer.stop``), and it is started again after a back-off (1, 2, 4, 8, 16 s by default). Each restart is
  logged with its cause, e.g. ``tritonserver exited with -9 (SIGKILL); restart 1/5 in 1 s``, and recorded in
  ``Endpoint.restarts``;
- gives up after ``max_restarts`` restarts within ``stable_after`` seconds of each other (a server that stays up that
  long earns a fresh budget): ``wait()`` then returns 1, ``/v2/health/live`` answers 503, and ``serve`` exits 1 —
  in Kubernetes the liveness probe and the container restart policy take over from there.

The public ports never change across restarts (clients keep their address); tritonserver gets fresh loopback ports
each time.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from .front import Front, Limits, Upstream, load_specs
from .launch import REPOSITORY, TritonLaunchError, TritonServer

logger = logging.getLogger(__name__)
_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
_CRASH_HINT = re.compile(r"terminate called|what\(\):|std::bad_alloc|Segmentation fault|Aborted|signal \d+|"
                         r"Killed|out of memory", re.IGNORECASE)


def describe_exit(code: int | None, log_tail: str = "") -> str:
    """``tritonserver exited with -9 (SIGKILL)`` plus the log line that says why, when the log has one."""
    if code is None:
        text = "tritonserver stopped answering"
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        text = f"tritonserver exited with {code} ({name})"
    else:
        text = f"tritonserver exited with {code}"
    hints = [line.strip() for line in log_tail.splitlines() if _CRASH_HINT.search(line)]
    if hints:
        text += f": {hints[-1][:200]}"
    return text


class Endpoint:
    """The validating front on ``host`` + a supervised ``TritonServer`` on loopback (a context manager).

    Args:
        server: a configured, not yet started ``TritonServer`` on a loopback host with free ports.
        host, http_port, grpc_port, metrics_port: the public address (None = a free port).
        max_restarts: restarts allowed within ``stable_after`` s of each other before giving up.
        backoff: seconds before restart 1, 2, … (the last value repeats).
        limits: the front's fixed limits.
    """

    def __init__(self, server: TritonServer, *, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, max_restarts: int = 5,
                 backoff: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 16.0), stable_after: float = 300.0,
                 limits: Limits = Limits()):
        if server.host not in _LOOPBACK_HOSTS:
            raise ValueError(f"the tritonserver behind the front must bind loopback, got host {server.host!r} "
                             "(the public host is the Endpoint's)")
        if any(p is not None for p in getattr(server, "_ports", ())):
            raise ValueError("the tritonserver behind the front takes free loopback ports: give the public ports to "
                             "the Endpoint")
        if max_restarts < 0 or not backoff:
            raise ValueError("max_restarts must be >= 0 and backoff must name at least one delay")
        self.server = server
        self.max_restarts = int(max_restarts)
        self.backoff = tuple(float(b) for b in backoff)
        self.stable_after = float(stable_after)
        self.front = Front(load_specs(REPOSITORY, server.models), host=host, http_port=http_port or 0,
                           grpc_port=grpc_port or 0, metrics_port=metrics_port or 0, limits=limits,
                           live=self._live, status=self._status)
        # MODEL → the allowed source's Triton model, loaded on demand (serving/launch.py); the public model config
        # (allowed / loaded models, their defaults) is answered by the front itself
        self.front.route = server.route
        self.front.upstream_name = server.upstream_name
        self.front.catalog = server.catalog
        self.front.configs = {m: (REPOSITORY / m / "config.pbtxt").read_text() for m in server.models}
        self.restarts: list[dict[str, Any]] = []  # {"time", "cause", "code", "attempt", "delay", "ok"}
        self.gave_up: str | None = None  # the cause, once restarts are exhausted
        self._state = "starting"
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._monitor: threading.Thread | None = None
        self._started_at = 0.0

    # -- what serve prints and clients use ---------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return self.front.http_url

    @property
    def grpc_url(self) -> str:
        return self.front.grpc_url

    @property
    def metrics_url(self) -> str | None:
        return self.front.metrics_url

    @property
    def pid(self) -> int | None:
        """The current tritonserver's pid (changes on restart)."""
        return self.server.pid

    @property
    def models(self) -> tuple[str, ...]:
        return self.server.models

    @property
    def model(self) -> str:
        return self.server.model

    @property
    def served_version(self) -> str | None:
        return self.server.served_version

    @property
    def state(self) -> str:
        return self._state

    def _live(self) -> bool:
        return self.gave_up is None and not self._done.is_set()

    def _status(self) -> str:
        return self._state

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def __enter__(self) -> Endpoint:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Endpoint:
        """Start tritonserver (raises ``TritonLaunchError``), then the front, then the supervision thread."""
        self.server.start()
        self._started_at = time.monotonic()
        try:
            self.front.start()
        except BaseException:
            self.server.stop()
            raise
        self._connect()
        self._monitor = threading.Thread(target=self._supervise, name="triton-supervisor", daemon=True)
        self._monitor.start()
        return self

    def _connect(self) -> None:
        s = self.server
        self.front.admit = s.admit  # over-budget requests refused before Triton's queue (serving/launch.py)
        cancel_dir = getattr(s, "cancel_dir", None)
        self.front.set_upstream(Upstream(s.http_url, s.grpc_url, s.metrics_url,
                                         str(cancel_dir) if cancel_dir else None))
        self._state = "serving"

    def wait(self, timeout: float | None = None) -> int:
        """Block until stopped (→ 0) or restarts are exhausted (→ 1); None on timeout."""
        if not self._done.wait(timeout):
            return None  # type: ignore[return-value]
        return 1 if self.gave_up else 0

    def stop(self) -> None:
        """Stop supervising, the front, then tritonserver (its own clean stop). Safe to call twice."""
        self._stopping.set()
        self._state = "stopping"
        self.front.stop()
        self.server.stop()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=60)
            self._monitor = None
            self.server.stop()  # one the monitor may have been starting meanwhile
        self._done.set()

    # -- supervision ----------------------------------------------------------------------------------------------

    def _supervise(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            code = self.server.wait()
            if self._stopping.is_set():
                break
            self.front.set_upstream(None)
            self._state = "restarting"
            tail = self.server.log_tail(60) if self.server.log_path is not None else ""
            cause = describe_exit(code, tail)
            if time.monotonic() - self._started_at > self.stable_after:
                attempt = 0  # it served long enough: a fresh budget
            while True:
                attempt += 1
                if attempt > self.max_restarts:
                    self.gave_up = cause
                    self._state = "down"
                    logger.error("%s; not restarting: %d restarts within %.0f s of each other", cause,
                                 self.max_restarts, self.stable_after)
                    self.server.stop()
                    self._done.set()
                    return
                delay = self.backoff[min(attempt, len(self.backoff)) - 1]
                logger.warning("%s; restart %d/%d in %g s", cause, attempt, self.max_restarts, delay)
                record = {"time": time.time(), "cause": cause, "code": code, "attempt": attempt, "delay": delay,
                          "ok": False}
                self.restarts.append(record)
                self.server.stop()  # reap the process group, shared memory, temp folder of the dead one
                if self._stopping.wait(delay):
                    return
                try:
                    self.server.start()
                except (TritonLaunchError, OSError) as exc:
                    cause = f"restart {attempt} failed: {str(exc).splitlines()[0][:200]}"
                    code = None
                    continue
                if self._stopping.is_set():
                    self.server.stop()
                    return
                self._started_at = time.monotonic()
                record["ok"] = True
                self._connect()
                logger.warning("tritonserver restarted (restart %d/%d): pid %s, ready", attempt, self.max_restarts,
                               self.server.pid)
                break
        self._done.set()


__all__ = ["Endpoint", "describe_exit"]

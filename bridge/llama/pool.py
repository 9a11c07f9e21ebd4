"""The llama-server backends: health, slot counts, and which one serves the next request.

README, *Several llama-servers*, says what users see of it.

Each backend is probed on ``/health`` (and, when healthy, ``/props`` for its slot
count and ``/v1/models`` for the models it serves) every ``health_interval_s``. A
request goes to the healthy backend with the most free slots (ties: the one used
least recently, so sequential requests spread too), unless the request prefers one
(a session's next turn, to the backend whose prompt cache holds the conversation) and
that one is healthy and has a free slot; a request that names a ``model`` goes only to
backends that serve it. A backend that fails a request
before its first byte is marked unhealthy and skipped until a probe finds it
healthy again.

Model names match case-insensitively against what llama-server reports: the ids
of ``/v1/models`` (the ``--alias``, else the model path), the ``model_alias`` and
``model_path`` of ``/props``, and the file name of any of them with and without
``.gguf`` -- so ``gemma-3-270m-q4_k_m`` finds ``/models/gemma-3-270m-q4_k_m.gguf``.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bridge.config.settings import LlamaSettings
from bridge.llama.client import LlamaCppClient, client_options
from bridge.llama.types import PROPS_MODEL_KEYS
from bridge.protocol.errors import (
    BackendError,
    BackendHTTPError,
    BackendUnavailable,
    RequestRejected,
)
from bridge.protocol.messages import ErrorCode

log = logging.getLogger("bridge.llama.pool")


@dataclass
class Backend:
    """One llama-server and what the bridge knows of it."""

    url: str
    client: LlamaCppClient
    name: str = "backend-1"
    healthy: bool = False
    slots: int = 1
    active: int = 0
    model: str | None = None
    #: why it is unhealthy, as a device may read it (no URL); the log has the full error
    last_error: str | None = None
    models: list[str] = field(default_factory=list)
    #: every spelling of ``models`` a request may use, case-folded (see the module doc)
    names: frozenset[str] = frozenset()
    last_used: int = 0

    def serves(self, model: str) -> bool:
        """Whether a request naming ``model`` may run here."""
        return model.casefold() in self.names

    def snapshot(self) -> dict[str, Any]:
        """For the status topic, which every device may read: the backend's name, never
        its URL (devices need not learn where llama-server runs; the log and the metrics
        have it)."""
        return {"name": self.name, "healthy": self.healthy, "slots": self.slots,
                "active": self.active, "model": self.model, "models": self.models,
                "error": self.last_error}


def model_names(names: Iterable[str]) -> frozenset[str]:
    """Every spelling of these model names a request may use, case-folded."""
    out: set[str] = set()
    for name in names:
        if not name:
            continue
        out.add(name.casefold())
        base = name.replace("\\", "/").rsplit("/", 1)[-1]
        out.add(base.casefold())
        if base.lower().endswith(".gguf"):
            out.add(base[:-5].casefold())
    return frozenset(out)


class BackendPool:
    """All configured backends.

    Args:
        settings: the ``[llama]`` configuration (its ``urls`` must be set by now).
        on_change: called when something the status shows changes: a backend's health
            (from the probe thread) or its active requests (from the worker).
        pool_size: HTTP connections kept open per backend; at least the number of
            concurrent requests, or urllib3 discards (and logs) every extra one.
    """

    def __init__(self, settings: LlamaSettings, urls: list[str],
                 on_change: Callable[[], None] | None = None, *, pool_size: int = 16) -> None:
        options = client_options(settings)
        self.backends = [
            Backend(url, LlamaCppClient(url, **options, pool_size=pool_size), name=name)
            for url, name in zip(urls, settings.backend_names(len(urls)), strict=True)
        ]
        self._interval = settings.health_interval_s
        self._on_change = on_change
        self._uses = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe_loop, name="bridge-health",
                                        daemon=True)

    def start(self) -> None:
        """Probe every backend once, then keep probing in the background."""
        for backend in self.backends:
            self._probe(backend)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        for backend in self.backends:
            backend.client.close()

    @property
    def total_slots(self) -> int:
        """Slots of all backends (healthy or not: they are expected back)."""
        return sum(b.slots for b in self.backends)

    @property
    def model_name(self) -> str | None:
        return next((b.model for b in self.backends if b.healthy and b.model), None)

    def acquire(self, exclude: set[str] | None = None, model: str | None = None,
                prefer: str | None = None) -> Backend:
        """Reserve a slot on the healthy backend with the most free slots.

        Args:
            exclude: URLs not to use (those that already failed this request).
            model: only backends serving this model (see :meth:`Backend.serves`).
            prefer: the URL of the backend to take if it is a candidate with a free slot
                (cache affinity); otherwise the usual choice.
        Raises:
            BackendUnavailable: no backend is healthy (message lists their errors), or
                none of the healthy ones serves ``model`` while some backend's models
                are unknown or it is down (it may serve it once back).
            RequestRejected: ``bad_request``: every backend is healthy and none serves
                ``model`` (the message lists the models there are).
        """
        with self._lock:
            candidates = [b for b in self.backends
                          if b.healthy and (exclude is None or b.url not in exclude)]
            if model is not None:
                candidates = [b for b in candidates if b.serves(model)]
            if not candidates:
                raise self._no_backend(model)
            preferred = next((b for b in candidates
                              if b.url == prefer and b.active < b.slots), None)
            # Most free slots; among equals the least recently used, so that one request
            # at a time still spreads over the backends (and warms all of them).
            best = preferred or max(candidates,
                                    key=lambda b: (b.slots - b.active, -b.last_used))
            best.active += 1
            best.last_used = next(self._uses)
        self._notify()
        return best

    def _no_backend(self, model: str | None) -> BackendUnavailable | RequestRejected:
        """The error for "no backend can take this request"; caller holds the lock."""
        if model is not None and any(b.healthy for b in self.backends):
            if all(b.healthy for b in self.backends) and \
                    not any(b.serves(model) for b in self.backends):
                # Every backend answered its last probe: the model is really not here.
                available = sorted({m for b in self.backends for m in b.models})
                return RequestRejected(
                    ErrorCode.bad_request,
                    f"no llama-server of this bridge serves model {model!r}; available: "
                    f"{', '.join(repr(m) for m in available) or 'none'} (or leave 'model' out)")
            down = ", ".join(b.url for b in self.backends if not b.healthy)
            return BackendUnavailable(
                f"no healthy llama-server serves model {model!r} now"
                + (f" ({down} may, once back)" if down else ""),
                public=f"no llama-server that serves model {model!r} is up now; try again "
                       "later")
        detail = "; ".join(f"{b.url}: {b.last_error or 'unhealthy'}" for b in self.backends)
        return BackendUnavailable(
            f"no healthy llama-server ({detail})",
            public=f"no llama-server is up now ({len(self.backends)} configured, none "
                   "healthy); try again later")

    def release(self, backend: Backend) -> None:
        with self._lock:
            backend.active -= 1
        self._notify()

    def mark_failed(self, backend: Backend, exc: BackendError) -> None:
        """Take a backend out after a connection failure; the probe puts it back."""
        with self._lock:
            changed = backend.healthy
            backend.healthy = False
            backend.last_error = exc.public_message[:200]
        if changed:
            log.warning("backend %s (%s) marked unhealthy: %s", backend.name, backend.url, exc)
            self._notify()

    def _probe(self, backend: Backend) -> None:
        was = backend.healthy
        try:
            health = backend.client.health()
            ok = bool(health.ok)
            if ok:
                props = backend.client.props()
                try:
                    models = backend.client.models()
                except BackendHTTPError as exc:  # a server without /v1/models still serves
                    log.debug("backend %s: no model list (%s)", backend.url, exc)
                    models = [props.model] if props.model else []
                backend.slots = max(1, int(props.total_slots or 1))
                backend.model = props.model
                backend.models = models
                extra = [str(props.raw.get(k) or "") for k in PROPS_MODEL_KEYS]
                backend.names = model_names([*models, *extra])
                backend.last_error = None
            else:
                backend.last_error = f"status {health.status}"
        except BackendError as exc:
            ok = False
            detail = str(exc)
            backend.last_error = exc.public_message[:200]
        else:
            detail = backend.last_error or ""
        backend.healthy = ok
        if ok != was:
            log.log(logging.INFO if ok else logging.WARNING, "backend %s (%s) is %s%s",
                    backend.name, backend.url, "healthy" if ok else "unhealthy",
                    "" if ok else f" ({detail})")
            self._notify()

    def _probe_loop(self) -> None:
        while not self._stop.wait(self._interval):
            for backend in self.backends:
                if self._stop.is_set():
                    return
                self._probe(backend)

    def _notify(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("backend change callback failed")

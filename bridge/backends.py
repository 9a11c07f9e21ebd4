"""The llama-server backends: health, slot counts, and which one serves the next request (SPEC §7).

Each backend is probed on ``/health`` (and ``/props`` for its slot count) every
``health_interval_s``. A request goes to the healthy backend with the most free
slots; a backend that fails a request before its first byte is marked unhealthy
and skipped until a probe finds it healthy again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.config import LlamaSettings
from bridge.exceptions import BackendError, BackendUnavailable
from bridge.llama_client import LlamaCppClient, RetryPolicy, Timeouts

log = logging.getLogger("bridge.backends")


@dataclass
class Backend:
    """One llama-server and what the bridge knows of it."""

    url: str
    client: LlamaCppClient
    healthy: bool = False
    slots: int = 1
    active: int = 0
    model: str | None = None
    last_error: str | None = None
    models: list[str] = field(default_factory=list)

    def snapshot(self) -> dict[str, Any]:
        """For the status topic."""
        return {"url": self.url, "healthy": self.healthy, "slots": self.slots,
                "active": self.active, "model": self.model, "error": self.last_error}


class BackendPool:
    """All configured backends.

    Args:
        settings: the ``[llama]`` configuration (its ``urls`` must be set by now).
        on_change: called (from the probe thread) when a backend's health changes.
    """

    def __init__(self, settings: LlamaSettings, urls: list[str],
                 on_change: Callable[[], None] | None = None) -> None:
        timeouts = Timeouts(connect=settings.connect_timeout_s,
                            first_byte=settings.first_byte_timeout_s,
                            idle=settings.idle_timeout_s)
        retry = RetryPolicy(attempts=settings.retries)
        key = settings.api_key.get_secret_value() if settings.api_key else None
        self.backends = [
            Backend(url, LlamaCppClient(url, timeouts=timeouts, retry=retry, api_key=key))
            for url in urls
        ]
        self._interval = settings.health_interval_s
        self._on_change = on_change
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

    def acquire(self, exclude: set[str] | None = None) -> Backend:
        """Reserve a slot on the healthy backend with the most free slots.

        Raises:
            BackendUnavailable: no backend is healthy (message lists their errors).
        """
        with self._lock:
            candidates = [b for b in self.backends
                          if b.healthy and (exclude is None or b.url not in exclude)]
            if not candidates:
                detail = "; ".join(f"{b.url}: {b.last_error or 'unhealthy'}"
                                   for b in self.backends)
                raise BackendUnavailable(f"no healthy llama-server ({detail})")
            best = max(candidates, key=lambda b: b.slots - b.active)
            best.active += 1
            return best

    def release(self, backend: Backend) -> None:
        with self._lock:
            backend.active -= 1

    def mark_failed(self, backend: Backend, exc: BackendError) -> None:
        """Take a backend out after a connection failure; the probe puts it back."""
        with self._lock:
            changed = backend.healthy
            backend.healthy = False
            backend.last_error = str(exc)[:200]
        if changed:
            log.warning("backend %s marked unhealthy: %s", backend.url, exc)
            self._notify()

    def _probe(self, backend: Backend) -> None:
        was = backend.healthy
        try:
            health = backend.client.health()
            ok = bool(health.ok)
            if ok:
                props = backend.client.props()
                backend.slots = max(1, int(props.total_slots or 1))
                backend.model = props.model
                backend.last_error = None
            else:
                backend.last_error = f"status {health.status}"
        except BackendError as exc:
            ok = False
            backend.last_error = str(exc)[:200]
        backend.healthy = ok
        if ok != was:
            log.log(logging.INFO if ok else logging.WARNING, "backend %s is %s%s", backend.url,
                    "healthy" if ok else "unhealthy",
                    "" if ok else f" ({backend.last_error})")
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

"""The bridge's retained status message on ``P/status/{bridge_id}`` (README, *Status*).

Online it shows the backends, the queue and the counters of :class:`BridgeMetrics`;
offline (the Last Will, or a clean shutdown) only who the bridge is and why it left.
Every device may read it, so it never names where llama-server runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from bridge.config.settings import DeploymentConfig
from bridge.llama.pool import BackendPool
from bridge.mqtt.link import MqttLink
from bridge.service.metrics import BridgeMetrics
from bridge.version import __version__


def offline_status(config: DeploymentConfig, reason: str) -> bytes:
    """The offline status: ``reason`` is ``connection lost`` (the Will) or ``shutdown``."""
    return _encode(_head(config, "offline", reason=reason))


class OnlineStatus:
    """Builds the online status from the live parts of one bridge.

    Args:
        config: the deployment configuration.
        link: the MQTT link (protocol version, messages published).
        pool: the backends.
        queued: requests waiting for a worker.
        active: requests running.
        metrics: the counters shown as ``stats``.
    """

    def __init__(self, config: DeploymentConfig, link: MqttLink, pool: BackendPool,
                 queued: Callable[[], int], active: Callable[[], int],
                 metrics: BridgeMetrics) -> None:
        self.started_at = time.time()
        self._cfg = config
        self._link = link
        self._pool = pool
        self._queued = queued
        self._active = active
        self._metrics = metrics

    def payload(self) -> bytes:
        """The online status as published now."""
        body = _head(self._cfg, "online")
        body.update(
            started_at=round(self.started_at, 3), mqtt="5" if self._link.is_v5 else "3.1.1",
            backends=[b.snapshot() for b in self._pool.backends],
            queued=self._queued(), active=self._active(), shared_group=self._cfg.shared_group,
            stats=self._metrics.snapshot(), published=self._link.published,
        )
        return _encode(body)


def _head(config: DeploymentConfig, state: str, **extra: Any) -> dict[str, Any]:
    return {"state": state, "bridge_id": config.bridge_id, "version": __version__,
            "prefix": config.prefix, **extra}


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()

"""Bounded, fair request queue and the worker threads that drain it (SPEC §7 "Concurrency").

At most ``workers`` jobs run at once; the rest wait in one bounded queue that is
FIFO per client and round-robin across clients, so one chatty device cannot
starve the others. A full queue is reported to the caller (who answers ``busy``),
never silently dropped.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

log = logging.getLogger("bridge.scheduler")

K = TypeVar("K")


class QueueFull(Exception):
    """The queue holds ``capacity`` jobs already."""


class FairQueue(Generic[K]):
    """Jobs keyed by client: FIFO within a client, round-robin between clients.

    Args:
        capacity: most jobs waiting at once (across all clients).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_client: OrderedDict[str, deque[tuple[K, Callable[[], None]]]] = OrderedDict()
        self._size = 0
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        """True after :meth:`drain`: no job will ever come again."""
        return self._closed

    def put(self, client: str, key: K, job: Callable[[], None]) -> int:
        """Queue ``job`` for ``client``.

        Returns:
            how many waiting jobs will be taken before this one (round-robin order).
        Raises:
            QueueFull: the queue is at capacity.
        """
        with self._cond:
            if self._closed or self._size >= self.capacity:
                raise QueueFull
            mine = self._by_client.get(client)
            k = len(mine) if mine else 0  # this job's index in its client's line
            # Clients earlier in the rotation get k+1 turns before ours, later ones k turns.
            ahead, before = k, True
            for other, jobs in self._by_client.items():
                if other == client:
                    before = False
                    continue
                ahead += min(len(jobs), k + 1 if before else k)
            self._by_client.setdefault(client, deque()).append((key, job))
            self._size += 1
            self._cond.notify()
            return ahead

    def get(self, timeout: float | None = None) -> Callable[[], None] | None:
        """Take the next job (the next client in turn), waiting up to ``timeout``.

        Returns:
            the job, or None on timeout or after :meth:`close`.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._size > 0 or self._closed, timeout):
                return None
            if self._closed and self._size == 0:
                return None
            client, jobs = next(iter(self._by_client.items()))
            _, job = jobs.popleft()
            self._size -= 1
            # Round robin: this client goes to the back of the line.
            del self._by_client[client]
            if jobs:
                self._by_client[client] = jobs
            return job

    def remove(self, client: str, key: K) -> bool:
        """Remove a waiting job; True if it was still queued."""
        with self._cond:
            jobs = self._by_client.get(client)
            if not jobs:
                return False
            for item in jobs:
                if item[0] == key:
                    jobs.remove(item)
                    self._size -= 1
                    if not jobs:
                        del self._by_client[client]
                    return True
            return False

    def drain(self) -> list[K]:
        """Close the queue and return the keys of the jobs that never ran."""
        with self._cond:
            self._closed = True
            keys = [key for jobs in self._by_client.values() for key, _ in jobs]
            self._by_client.clear()
            self._size = 0
            self._cond.notify_all()
            return keys


class WorkerPool:
    """``size`` threads that run jobs from a :class:`FairQueue` until stopped."""

    def __init__(self, queue: FairQueue[Any], size: int) -> None:
        self._queue = queue
        self._threads = [
            threading.Thread(target=self._run, name=f"bridge-worker-{i}", daemon=True)
            for i in range(size)
        ]
        self._busy = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def size(self) -> int:
        return len(self._threads)

    @property
    def busy(self) -> int:
        return self._busy

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._queue.get(timeout=0.5)
            if job is None:
                if self._queue.closed:
                    return  # drained: nothing more will come, don't spin until stop()
                continue
            with self._lock:
                self._busy += 1
            try:
                job()
            except Exception:  # a job must answer its own errors; this is the last net
                log.exception("unhandled error in a request job")
            finally:
                with self._lock:
                    self._busy -= 1

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs and wait for the running ones to end (they were cancelled)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

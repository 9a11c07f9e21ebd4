"""Bounded, fair request queue and the worker threads that drain it.

At most ``workers`` jobs run at once; the rest wait in one bounded queue that is
FIFO per client and round-robin across clients, so one chatty device cannot
starve the others. A full queue is reported to the caller (who answers ``busy``),
never silently dropped.

Jobs may belong to a *group* (a conversation: ``(client, session)``). Jobs of one
group run one at a time, in the order they were queued: a job whose group has a
job running is skipped (others, of its client too, may go first) until that job
has returned.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

log = logging.getLogger("bridge.service.scheduler")

K = TypeVar("K")


_Item = tuple[K, Callable[[], None], Hashable | None]  # key, job, group


class QueueFull(Exception):
    """The queue holds ``capacity`` jobs already."""


class FairQueue(Generic[K]):
    """Jobs keyed by client: FIFO within a client, round-robin between clients.

    Args:
        capacity: most jobs waiting at once (across all clients).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_client: OrderedDict[str, deque[_Item[K]]] = OrderedDict()
        self._size = 0
        self._busy_groups: set[Hashable] = set()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        """True after :meth:`drain`: no job will ever come again."""
        return self._closed

    def put(self, client: str, key: K, job: Callable[[], None], *,
            group: Hashable | None = None) -> int:
        """Queue ``job`` for ``client``.

        Args:
            client: whose turn it uses (round robin).
            key: identifies the job for :meth:`remove` and :meth:`drain`.
            job: what a worker runs.
            group: jobs with the same (non-None) group never run at the same time and
                start in the order they were queued.
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
            self._by_client.setdefault(client, deque()).append((key, job, group))
            self._size += 1
            self._cond.notify()
            return ahead

    def get(self, timeout: float | None = None) -> Callable[[], None] | None:
        """Take the next job (the next client in turn), waiting up to ``timeout``.

        Returns:
            the job, or None on timeout or after :meth:`close`.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or self._runnable() is not None,
                                       timeout):
                return None
            found = self._runnable()
            if found is None:  # closed
                return None
            client, index = found
            jobs = self._by_client[client]
            _, job, group = jobs[index]
            del jobs[index]
            self._size -= 1
            # Round robin: this client goes to the back of the line.
            del self._by_client[client]
            if jobs:
                self._by_client[client] = jobs
            if group is None:
                return job
            self._busy_groups.add(group)
            return functools.partial(self._run_in_group, job, group)

    def _runnable(self) -> tuple[str, int] | None:
        """The next job to hand out: (client, index in its line), or None. Caller holds the lock.

        Clients in round-robin order; within a client the first job whose group is idle.
        """
        for client, jobs in self._by_client.items():
            for index, (_, _, group) in enumerate(jobs):
                if group is None or group not in self._busy_groups:
                    return client, index
        return None

    def _run_in_group(self, job: Callable[[], None], group: Hashable) -> None:
        try:
            job()
        finally:
            with self._cond:
                self._busy_groups.discard(group)
                self._cond.notify_all()  # a job of this group may be waiting

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

    def close(self) -> None:
        """Hand out no more jobs: every waiting and later :meth:`get` returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> list[K]:
        """Close the queue and return the keys of the jobs that never ran."""
        with self._cond:
            self._closed = True
            keys = [key for jobs in self._by_client.values() for key, _, _ in jobs]
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
            # No timeout: an idle bridge must not wake its workers (256 of them cost 2-3 %
            # of a core, polling twice a second); stop() and drain() close the queue.
            job = self._queue.get()
            if job is None:
                if self._queue.closed:
                    return  # closed: nothing more will come
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
        self._queue.close()
        for thread in self._threads:
            thread.join(timeout)

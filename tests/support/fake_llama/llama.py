"""A fake llama-server for a whole bridge: llama-server's endpoints, a script per generation.

A bridge's backend pool probes ``/health``, ``/props`` and ``/v1/models``, and the
sessions count tokens with ``/tokenize``; :class:`FakeLlama` answers those itself (the
tokenizer counts words, so budgets can be computed by hand) and plays a script only
for generation requests (``POST /v1/chat/completions`` and ``/v1/completions``),
chosen by ``script_for(path, body)``. The default answers "Hello from the fake." in
pieces (:func:`~tests.support.fake_llama.script.answer_with`); a fault scenario passes
its own (e.g. "stall before the first byte when the prompt says so").

Every request is recorded (:class:`~tests.support.fake_llama.server.Connection`): the
exact bodies the bridge sent (system prompt, history, sampling fields -- which a real
server does not report), how many generations arrived (nothing generated twice),
and whether timeouts closed the connection.
"""

from __future__ import annotations

import threading
from typing import Any

from tests.support.fake_llama.api import (
    CHAT_PATH,
    GENERATION_PATHS,
    HEALTH_OK,
    LOADING,
    NOT_FOUND,
    models_body,
    props_body,
    slots_body,
    tokens_body,
)
from tests.support.fake_llama.script import (
    Action,
    CloseOnReuse,
    Hold,
    Respond,
    Script,
    ScriptFor,
    Send,
    answer_with,
)
from tests.support.fake_llama.server import Connection, ScriptedHttpServer


class FakeLlama(ScriptedHttpServer):
    """A fake llama-server on a free 127.0.0.1 port.

    Args:
        script_for: ``(path, body) -> script`` for each generation request.
        slots: ``total_slots`` reported by ``/props`` (all idle on ``/slots``).
        n_ctx: per-slot context reported by ``/props``.
        model: the model's alias on ``/props`` and its id on ``/v1/models``.
        stale_keepalive: keep probe connections open, and close one unanswered when the
            client sends its next request on it: what a client sees when it reuses a
            keep-alive connection just as the server's keep-alive timeout closes it.
    """

    io_timeout_s = 10.0

    def __init__(self, script_for: ScriptFor | None = None, *, slots: int = 2,
                 n_ctx: int = 4096, model: str = "fake-model",
                 stale_keepalive: bool = False) -> None:
        super().__init__()
        self.script_for = script_for or answer_with()
        self.slots = slots
        self.n_ctx = n_ctx
        self.model = model
        self.stale_keepalive = stale_keepalive
        self.healthy = True  # False: /health answers 503 "Loading model"
        self._holds: list[threading.Event] = []

    # ------------------------------------------------------------------ test controls

    def hold_next(self) -> threading.Event:
        """The next generation sends its first event, then waits until the returned Event
        is set (at most 60 s, or until the server stops)."""
        gate = threading.Event()
        with self._cond:
            self._holds.append(gate)
        return gate

    # ------------------------------------------------------------------ inspection

    @property
    def generations(self) -> list[Connection]:
        """Snapshot of the generation requests received so far."""
        with self._cond:
            return self._requests(GENERATION_PATHS)

    def wait_generations(self, count: int, timeout: float) -> list[Connection]:
        """Wait until ``count`` generation requests arrived; returns them all.

        Raises:
            AssertionError: fewer arrived within ``timeout``.
        """
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self._requests(GENERATION_PATHS)) >= count,
                                     timeout)
            got = self._requests(GENERATION_PATHS)
        assert ok, f"{len(got)} generation requests arrived, not {count}"
        return got

    def wait_bodies(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until ``count`` generation requests arrived; returns all their bodies."""
        return [gen.json() for gen in self.wait_generations(count, timeout)]

    def chat_bodies(self) -> list[dict[str, Any]]:
        """The bodies of the chat generation requests so far."""
        with self._cond:
            return [conn.json() for conn in self._requests((CHAT_PATH,))]

    @property
    def tokenize_calls(self) -> int:
        with self._cond:
            return len(self._requests(("/tokenize",)))

    @property
    def stale_closes(self) -> int:
        """Connections closed unanswered because the client reused them (stale_keepalive)."""
        with self._cond:
            return sum(conn.reused.is_set() for conn in self._connections)

    # ------------------------------------------------------------------ answering

    def script(self, conn: Connection) -> Script:
        if conn.method == "GET":
            return self._probe(conn.path)
        try:
            body = conn.json() if conn.body else {}
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if conn.path == "/tokenize":
            return [Respond(200, tokens_body(str(body.get("content", ""))))]
        if conn.path not in GENERATION_PATHS:
            return [Respond(404, NOT_FOUND)]
        script = list(self.script_for(conn.path, body))
        with self._cond:
            gate = self._holds.pop(0) if self._holds else None
        if gate is not None:
            first = next((i for i, a in enumerate(script) if isinstance(a, Send)), None)
            if first is not None:
                script.insert(first + 1, Hold(gate))
        return script

    def _probe(self, path: str) -> list[Action]:
        answer: Any
        status = 200
        if path == "/health":
            status, answer = (200, HEALTH_OK) if self.healthy else (503, LOADING)
        elif path == "/props":
            answer = props_body(slots=self.slots, n_ctx=self.n_ctx, alias=self.model,
                                model_path=f"/models/{self.model}.gguf")
        elif path == "/v1/models":
            answer = models_body(self.model)
        elif path == "/slots":
            answer = slots_body(self.slots)
        else:
            status, answer = 404, NOT_FOUND
        if self.stale_keepalive:
            return [Respond(status, answer, keep_alive=True), CloseOnReuse()]
        return [Respond(status, answer)]

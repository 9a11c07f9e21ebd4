"""What llama-server answers on its endpoints, as JSON bodies: one definition for every engine.

The threaded servers (:mod:`.server`, :mod:`.llama`) and the benchmark's asyncio server
(:mod:`.fast`) answer ``/health``, ``/props``, ``/slots``, ``/v1/models``, ``/tokenize``
and errors with these shapes, which follow llama-server's.
"""

from __future__ import annotations

from typing import Any

CHAT_PATH = "/v1/chat/completions"
COMPLETION_PATH = "/v1/completions"
GENERATION_PATHS = (CHAT_PATH, COMPLETION_PATH)

HEALTH_OK: dict[str, Any] = {"status": "ok"}


def words(text: str) -> int:
    """The fake tokenizer: one token per whitespace-separated word (budgets computable by hand)."""
    return len(text.split())


def error_body(status: int, message: str, error_type: str) -> dict[str, Any]:
    """An error in llama-server's format."""
    return {"error": {"code": status, "message": message, "type": error_type}}


LOADING = error_body(503, "Loading model", "unavailable_error")
NOT_FOUND = error_body(404, "File Not Found", "not_found_error")


def props_body(*, slots: int, n_ctx: int, model_path: str,
               alias: str | None = None) -> dict[str, Any]:
    """``GET /props``: the slot count, the per-slot context and the model's names."""
    props: dict[str, Any] = {"total_slots": slots}
    if alias is not None:
        props["model_alias"] = alias
    props.update({"model_path": model_path, "default_generation_settings": {"n_ctx": n_ctx},
                  "chat_template_caps": {}})
    return props


def slots_body(slots: int, busy: int = 0) -> list[dict[str, Any]]:
    """``GET /slots``: the first ``busy`` slots are processing."""
    return [{"id": i, "is_processing": i < busy} for i in range(slots)]


def models_body(model: str) -> dict[str, Any]:
    """``GET /v1/models``: the one model served."""
    return {"object": "list", "data": [{"id": model, "object": "model"}]}


def tokens_body(content: str) -> dict[str, Any]:
    """``POST /tokenize`` with the fake tokenizer (:func:`words`)."""
    return {"tokens": list(range(words(content)))}


def prompt_tokens(path: str, body: dict[str, Any]) -> int:
    """What the fake tokenizer counts in a generation request's prompt or messages."""
    if path == CHAT_PATH:
        return sum(words(str(m.get("content") or "")) for m in body.get("messages") or []
                   if isinstance(m, dict))
    return words(str(body.get("prompt") or ""))


def usage(prompt: int, completion: int) -> dict[str, int]:
    """The ``usage`` object of an answer."""
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}

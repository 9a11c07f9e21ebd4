"""What llama-server's small endpoints answer, decoded: ``/health``, ``/props``,
``/slots``, ``/v1/models``, ``/tokenize``.

No I/O: each function takes the decoded JSON body (``None`` when it was not JSON),
so the blocking and the asyncio clients read the same answers the same way.
"""

from __future__ import annotations

from typing import Any

from bridge.llama.types import PROPS_MODEL_KEYS, Health, Props
from bridge.protocol.errors import BackendProtocolError


def health_of(http_status: int, data: Any) -> Health:
    """``GET /health``: ``ok`` on HTTP 200; the server's status text, else its error
    message, else the HTTP code."""
    status = str(http_status)
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(data.get("status"), str):
            status = data["status"]
        elif isinstance(err, dict) and isinstance(err.get("message"), str):
            status = err["message"]
    return Health(ok=http_status == 200, status=status, http_status=http_status)


def props_of(raw: Any, url: str) -> Props:
    """``GET /props`` (``url``, for the message).

    Raises:
        BackendProtocolError: the answer is not a JSON object.
    """
    if not isinstance(raw, dict):
        raise BackendProtocolError(f"{url} did not return a JSON object")
    settings = raw.get("default_generation_settings")
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    caps = raw.get("chat_template_caps")
    return Props(
        # Servers too old to report it run one slot unless --parallel was given.
        total_slots=int(raw.get("total_slots") or 1),
        model=next((raw[k] for k in PROPS_MODEL_KEYS if raw.get(k)), None),
        n_ctx=n_ctx if isinstance(n_ctx, int) else None,
        chat_template_caps=caps if isinstance(caps, dict) else {},
        raw=raw,
    )


def slots_of(data: Any, url: str) -> list[dict[str, Any]]:
    """``GET /slots``: one dict per slot.

    Raises:
        BackendProtocolError: the answer is not a JSON list.
    """
    if not isinstance(data, list):
        raise BackendProtocolError(f"{url} did not return a JSON list")
    return [s for s in data if isinstance(s, dict)]


def models_of(data: Any) -> list[str]:
    """``GET /v1/models``: the model ids."""
    entries = data.get("data") if isinstance(data, dict) else None
    return [str(m["id"]) for m in entries or () if isinstance(m, dict) and "id" in m]


def tokens_of(data: Any, url: str) -> list[int]:
    """``POST /tokenize``: the token ids.

    Raises:
        BackendProtocolError: the answer holds no token list, or malformed tokens.
    """
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, list):
        raise BackendProtocolError(f"{url} did not return {{\"tokens\": [...]}}")
    try:
        # With "with_pieces" the server sends {"id", "piece"} objects; plain ids otherwise.
        return [int(t["id"]) if isinstance(t, dict) else int(t) for t in tokens]
    except (KeyError, TypeError, ValueError) as exc:
        raise BackendProtocolError(f"{url} returned malformed tokens: {exc}") from exc

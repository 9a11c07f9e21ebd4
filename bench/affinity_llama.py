"""The llama.cpp side of :mod:`bench.affinity`: servers, conversation text, a direct client.

- :class:`TunedLlama` is :class:`~bridge.llama.embedded.EmbeddedLlama` with two of
  llama-server's prompt-cache settings that the embedded server leaves at their
  defaults: ``cache_ram_mib`` (``--cache-ram``, the host-memory prompt cache; 8192 MiB
  in xllamacpp 2026.10, 0 turns it off) and ``slot_prompt_similarity``
  (``--slot-prompt-similarity``, 0.1; 0 picks slots by least recent use only). Its
  child is this file run as a script: it sets them on xllamacpp's parameters and
  hands over to ``bridge/llama/embedded_server.py`` unchanged.
- :func:`user_message` writes a turn's user message: a paragraph of about
  ``words`` words, the same for the same (conversation, turn) in every phase, after a
  tag that makes each conversation's prompt differ from every other's by its 5th
  token, so no conversation can reuse another's cache.
- :func:`chat` sends one streamed chat request straight to a llama-server and returns
  the time to its first text and llama-server's ``timings``.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_EMBEDDED_SERVER = Path(__file__).resolve().parents[1] / "bridge" / "llama" / "embedded_server.py"


def _child(argv: list[str]) -> int:
    """``affinity_llama.py CACHE_RAM_MIB SIMILARITY -- <embedded_server args>``."""
    cache_ram, similarity = argv[0], argv[1]
    assert argv[2] == "--", argv
    import xllamacpp

    real_server = xllamacpp.Server

    def server(params: Any, *args: Any, **kwargs: Any) -> Any:
        if cache_ram != "-":
            params.cache_ram_mib = int(cache_ram)
        if similarity != "-":
            params.slot_prompt_similarity = float(similarity)
        print(f"affinity_llama: cache_ram_mib={params.cache_ram_mib} "
              f"slot_prompt_similarity={params.slot_prompt_similarity:.2f}",
              file=sys.stderr, flush=True)
        return real_server(params, *args, **kwargs)

    xllamacpp.Server = server
    # Loaded from its file, as EmbeddedLlama runs it: the child imports no bridge package.
    spec = importlib.util.spec_from_file_location("embedded_server", _EMBEDDED_SERVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(argv[3:]))


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))

from bridge.llama.embedded import EmbeddedLlama  # noqa: E402  (the child must not load it)


class TunedLlama(EmbeddedLlama):
    """EmbeddedLlama with llama-server's prompt-cache settings.

    Args:
        cache_ram_mib: host-memory prompt cache in MiB (0: off); None: the default.
        slot_similarity: ``slot_prompt_similarity`` (0: slots by least recent use
            only); None: the default.
        **kwargs: as for :class:`~bridge.llama.embedded.EmbeddedLlama`.
    """

    def __init__(self, *, cache_ram_mib: int | None = None,
                 slot_similarity: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cache_ram_mib = cache_ram_mib
        self.slot_similarity = slot_similarity

    def _command(self) -> list[str]:
        cmd = super()._command()
        if self.cache_ram_mib is None and self.slot_similarity is None:
            return cmd
        # cmd is [python, -P, embedded_server.py, args...]: run this file in its place.
        return [cmd[0], "-P", str(Path(__file__).resolve()),
                "-" if self.cache_ram_mib is None else str(self.cache_ram_mib),
                "-" if self.slot_similarity is None else str(self.slot_similarity),
                "--", *cmd[3:]]


# ---------------------------------------------------------------------- conversation text

def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_NOUNS = _words("river stone morning engine garden window paper market signal bridge lantern "
          "harbour kettle ladder meadow orchard pocket railway saddle tower valley wagon "
          "basket candle forest island letter mirror needle pillow shelter timber village "
          "chimney compass fountain glacier journey kitchen library machine mountain")
_ADJECTIVES = _words("bright quiet yellow distant simple careful narrow heavy gentle ancient "
               "crooked silver patient hollow busy frozen golden restless sturdy faded")
_VERBS = _words("carries follows measures repairs watches crosses gathers paints remembers "
          "opens protects finds lifts counts shares builds cleans visits")
_PLACES = ("by the old mill", "near the square", "under the arches", "past the station",
           "along the canal", "behind the school", "at the edge of town", "on the hill")


def user_message(conversation: int, turn: int, words: int, tag: str) -> str:
    """A user message of about ``words`` words, the same for the same (conversation, turn).

    Args:
        conversation: index of the conversation.
        turn: 1-based turn number.
        words: about how many words.
        tag: put first in turn 1 (e.g. the phase's name), so that conversations of
            different phases share no prompt prefix.

    Returns:
        The message.
    """
    rng = random.Random(conversation * 1000 + turn)
    sentences: list[str] = []
    count = 0
    while count < words:
        s = (f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
             f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_PLACES)}.")
        sentences.append(s)
        count += len(s.split())
    text = " ".join(sentences)
    if turn == 1:
        text = f"{tag} conversation {conversation}. {text}"
    return f"{text} What happens next?"


# ---------------------------------------------------------------------- direct client


@dataclass
class Answer:
    """One streamed answer from llama-server."""

    ttft_ms: float
    text: str
    timings: dict[str, Any]


def chat(url: str, messages: list[dict[str, str]], max_tokens: int, *,
         cache_prompt: bool = True, timeout: float = 300.0) -> Answer:
    """One streamed ``/v1/chat/completions`` request (temperature 0).

    Args:
        url: the server's base URL (``http://127.0.0.1:PORT``).
        messages: the whole conversation so far, ending with the new user message.
        max_tokens: answer length at most.
        cache_prompt: llama-server's ``cache_prompt``; False re-reads the whole prompt.
        timeout: socket timeout in seconds.

    Returns:
        Time to the first text, the text, and llama-server's ``timings``.

    Raises:
        RuntimeError: no text, or no timings, came back.
    """
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "cache_prompt": cache_prompt}).encode()
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {resp.read()[:300]!r}")
        first: float | None = None
        parts: list[str] = []
        timings: dict[str, Any] | None = None
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            timings = event.get("timings", timings)
            for choice in event.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if first is None:
                        first = time.perf_counter()
                    parts.append(text)
    finally:
        conn.close()
    if first is None or timings is None:
        raise RuntimeError(f"{url}: no text or no timings in the answer")
    return Answer((first - start) * 1000, "".join(parts), timings)

"""The scripted llama-server of the tests and benchmarks, with a preset for each use.

* :class:`ScriptedSSEServer` -- one client against scripted connections: connection
  *i* plays the *i*-th script (a 503, a stall, a reset mid-stream, a malformed event...),
  and every connection records its request and when the client closed it. For the
  llama client's own tests (``tests/llama``).
* :class:`FakeLlama` -- a backend for a whole bridge: llama-server's endpoints
  (``/health``, ``/props``, ``/slots``, ``/v1/models``, ``/tokenize``) answered from its
  settings, a script per generation request (``script_for``), the exact request bodies
  recorded, a generation held mid-stream on demand (:meth:`FakeLlama.hold_next`). By
  default it answers "Hello from the fake." (:func:`answer_with`); fault scenarios pass
  their own scripts, e.g. a stall when the prompt says so.
* :mod:`tests.support.fake_llama.fast` -- the benchmarks' server in its own process
  (``python -m bench.fake_llama``): hundreds of concurrent streams at a set token rate,
  queued on its slots, with time-stamped tokens for latency measurement.

Scripts are lists of actions (:mod:`.script`); every engine answers the probes with the
same bodies (:mod:`.api`).
"""

from tests.support.fake_llama.api import CHAT_PATH, COMPLETION_PATH, words
from tests.support.fake_llama.llama import FakeLlama
from tests.support.fake_llama.script import (
    DEFAULT_TEXTS,
    DONE,
    PING,
    Action,
    Close,
    CloseOnReuse,
    Hold,
    Pause,
    Reset,
    Respond,
    Script,
    ScriptFor,
    Send,
    SSEHeaders,
    Stall,
    answer_with,
    chat_chunk,
    chat_stream,
    completion_chunk,
    event,
    held_chat_stream,
    llama_error,
    stream_script,
    usage_chunk,
)
from tests.support.fake_llama.server import (
    CLOSE_SEEN_S,
    Connection,
    ScriptedHttpServer,
    ScriptedSSEServer,
)

__all__ = [
    "CHAT_PATH",
    "CLOSE_SEEN_S",
    "COMPLETION_PATH",
    "DEFAULT_TEXTS",
    "DONE",
    "PING",
    "Action",
    "Close",
    "CloseOnReuse",
    "Connection",
    "FakeLlama",
    "Hold",
    "Pause",
    "Reset",
    "Respond",
    "SSEHeaders",
    "Script",
    "ScriptFor",
    "ScriptedHttpServer",
    "ScriptedSSEServer",
    "Send",
    "Stall",
    "answer_with",
    "chat_chunk",
    "chat_stream",
    "completion_chunk",
    "event",
    "held_chat_stream",
    "llama_error",
    "stream_script",
    "usage_chunk",
    "words",
]

"""JSON from another program, decoded without recursing deeper than JSON needs.

Python's ``json`` and msgspec recurse once per nesting level, up to the interpreter's
recursion limit. Near that limit anything in Python that runs meanwhile -- a garbage
collection callback, an object's finalizer, a warning -- fails with ``RecursionError``
itself, and in a finalizer that error cannot even be caught: it is reported as
"unraisable". So the nesting depth is checked first, without recursion, and JSON nested
deeper than any real message of llama-server (5 levels) or a device is refused as
malformed. The check costs two ``count`` calls for ordinary messages: text with fewer
brackets than the limit cannot nest deeper than it.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_STRING_BYTES = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_BRACKET_BYTES = re.compile(rb"[\[\]{}]")
_OPEN = frozenset("[{")
_OPEN_BYTES = frozenset(b"[{")


def too_deep(text: str | bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether ``text`` opens more than ``limit`` arrays/objects inside one another.

    Brackets inside JSON strings do not count. Malformed text is measured as far as it
    goes (the decoder rejects it afterwards anyway).

    Args:
        text: JSON text.
        limit: the deepest nesting allowed.

    Returns:
        True if some bracket lies more than ``limit`` levels deep.
    """
    if isinstance(text, bytes):
        if text.count(b"[") + text.count(b"{") <= limit:
            return False
        brackets = (m.group()[0] in _OPEN_BYTES
                    for m in _BRACKET_BYTES.finditer(_STRING_BYTES.sub(b"", text)))
    else:
        if text.count("[") + text.count("{") <= limit:
            return False
        brackets = (m.group() in _OPEN for m in _BRACKET.finditer(_STRING.sub("", text)))
    depth = 0
    for opens in brackets:
        depth += 1 if opens else -1
        if depth > limit:
            return True
    return False


def loads(text: str | bytes, limit: int = MAX_DEPTH) -> Any:
    """``json.loads`` for text that may come from a faulty or hostile peer.

    Raises:
        ValueError: malformed JSON, or nested more than ``limit`` levels deep.
    """
    if too_deep(text, limit):
        raise ValueError(f"JSON nested more than {limit} levels deep")
    try:
        return json.loads(text)
    except RecursionError as exc:  # called with the stack already deep: still malformed
        raise ValueError("JSON nested too deeply for the stack") from exc

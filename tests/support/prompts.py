"""What tests send to llama.cpp, and what must never come back.

The seed makes the real model's answers repeatable (a bridge's answer can be compared
with llama-server's own); the message builders write a conversation in a line.
"""

from __future__ import annotations

from typing import Any

SEED = 42
HI = [{"role": "user", "content": "hi"}]  # the shortest conversation

# What the chat templates llama.cpp falls back to (ChatML) or Gemma's own turn format
# would leave in an answer.
TEMPLATE_MARKERS = ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>")


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, Any]:
    return {"role": "system", "content": text}

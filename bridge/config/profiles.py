"""Named request presets from the configuration (``[profiles.NAME]``; a request's ``profile``).

A profile holds what a device should not have to send every time: a system
prompt, tools, sampling defaults, ``think`` and a ``max_tokens`` cap. A request
names one with ``"profile": "NAME"``; its own fields win over the profile's
defaults, and the profile's ``max_tokens`` caps the request's.

The profile is applied once, when the request is accepted (:func:`apply_profile`),
so a request keeps the profile it started with when the profiles are reloaded
(``SIGHUP``) while it is queued or running. :class:`ProfileRegistry` is what the
bridge reads and what the reload swaps, in one assignment.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "stop", "seed", "repeat_penalty")
"""Sampling settings a profile may default (same names and ranges as in a request)."""


class Profile(BaseModel):
    """One named preset (``[profiles.NAME]`` in the TOML file). Every field is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str | None = Field(
        None, description="System prompt, sent first unless the request has its own system "
                          "message (chat requests only).")
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = Field(
        None, description="OpenAI tool definitions; present => one non-streamed 'reply'.")
    tool_choice: str | dict[str, Any] | None = None
    temperature: Annotated[float, Field(ge=0, le=5)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=100_000)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: int | None = None
    repeat_penalty: Annotated[float, Field(ge=0, le=10)] | None = None
    think: bool | None = Field(None, description="false disables thinking (reasoning models).")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Default and upper bound of the request's max_tokens "
                          "(itself capped by max_tokens_cap).")


class UnknownProfile(ValueError):
    """The request named a profile the configuration does not define."""


class ProfileRegistry:
    """The profiles in force; :meth:`replace` swaps them all at once (``SIGHUP`` reload).

    Args:
        profiles: name -> profile.
    """

    def __init__(self, profiles: Mapping[str, Profile] | None = None) -> None:
        self._lock = threading.Lock()
        self._profiles: Mapping[str, Profile] = MappingProxyType(dict(profiles or {}))
        self.generation = 0  # bumped by every replace(), for logs and tests

    def get(self, name: str) -> Profile:
        """The profile called ``name``.

        Raises:
            UnknownProfile: no such profile (the message lists the known ones).
        """
        profiles = self._profiles  # one read: a concurrent replace() cannot split it
        found = profiles.get(name)
        if found is None:
            known = ", ".join(sorted(profiles)) if profiles else None
            raise UnknownProfile(
                f"unknown profile '{name}': "
                + (f"this bridge knows {known}" if known else "this bridge has no profiles "
                   "configured ([profiles.NAME] in its config file)"))
        return found

    def names(self) -> list[str]:
        return sorted(self._profiles)

    def replace(self, profiles: Mapping[str, Profile]) -> None:
        """Put ``profiles`` in force for requests accepted from now on."""
        fresh = MappingProxyType(dict(profiles))
        with self._lock:
            self._profiles = fresh
            self.generation += 1


__all__ = ["Profile", "ProfileRegistry", "UnknownProfile"]

"""Named request presets from the configuration (``[profiles.NAME]``; a request's ``profile``).

A profile holds what a device should not have to send every time: a system
prompt, tools, sampling defaults, ``think`` and a ``max_tokens`` cap. A request
names one with ``"profile": "NAME"``; its own fields win over the profile's
defaults, and the profile's ``max_tokens`` caps the request's.

The profile is applied once, when the request is accepted
(:func:`bridge.service.intake.apply_profile`), so a request keeps the profile it
started with when the profiles are reloaded (``SIGHUP``) while it is queued or
running. :class:`ProfileRegistry` is what the bridge reads and what the reload swaps,
in one assignment.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from pydantic import ConfigDict, Field

from bridge.protocol.errors import UnknownProfile
from bridge.protocol.messages import Sampling, Tools

SAMPLING_FIELDS = tuple(name for name in Sampling.model_fields if name != "max_tokens")
"""The :class:`~bridge.protocol.messages.Sampling` settings a profile's value is only a
default for; its ``max_tokens`` is also a cap (see :class:`Profile`)."""


class Profile(Sampling):
    """One named preset (``[profiles.NAME]`` in the TOML file). Every field is optional.

    The sampling settings have a request's names and ranges; ``max_tokens`` is the default
    and the upper bound of the request's ``max_tokens`` (itself capped by
    ``max_tokens_cap``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str | None = Field(
        None, description="System prompt, sent first unless the request has its own system "
                          "message (chat requests only).")
    tools: Tools | None = Field(
        None, description="OpenAI tool definitions; present => one non-streamed 'reply'.")
    tool_choice: str | dict[str, Any] | None = None
    think: bool | None = Field(None, description="false disables thinking (reasoning models).")


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

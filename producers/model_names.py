"""Model names: the name a client asks for, and the name the backend serves (``ROLLSTREAM_GATEWAY_MODEL_MAP``).

A comma-separated list of ``client=backend`` pairs, with one optional catch-all for every other name:
``*=NAME`` sends it to NAME, a bare ``*`` to the backend's own model (the first id of its
``GET /models``). Without a catch-all other names pass unchanged; an empty map changes no name.
The default, ``*``, lets agents written for ``gpt-4o`` or ``claude-sonnet-4`` talk to whatever
the backend serves. The forwarded request carries the backend's name; the recorded LlmCall keeps
the client's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from rollstream.errors import ConfigError

VARIABLE = "ROLLSTREAM_GATEWAY_MODEL_MAP"


class _BackendModel:
    """Marker: whatever model the backend serves (its first ``GET /models`` id)."""

    def __repr__(self) -> str:
        return "BACKEND_MODEL"


BACKEND_MODEL: Final = _BackendModel()


@dataclass(frozen=True)
class ModelMap:
    """Client model names to backend model names."""

    pairs: dict[str, str] = field(default_factory=dict)
    other: str | _BackendModel | None = None  # every other name: a name, the backend's model, or unchanged

    @classmethod
    def parse(cls, text: str) -> ModelMap:
        pairs: dict[str, str] = {}
        other: str | _BackendModel | None = None
        for position, entry in enumerate((e.strip() for e in text.split(",")), start=1):
            if not entry:
                continue
            client, sep, backend = (part.strip() for part in entry.partition("="))
            if client == "*" and other is not None:
                raise ConfigError(f"{VARIABLE}: entry {position} ({entry!r}) is a second catch-all; keep one of "
                                  "'*' (the backend's model) and '*=NAME'")
            if client == "*" and not sep:
                other = BACKEND_MODEL
            elif not sep or not client or not backend:
                raise ConfigError(f"{VARIABLE}: entry {position} ({entry!r}) is not 'client=backend', '*=backend' "
                                  "or '*'; e.g. 'gpt-4o=tiny,*'")
            elif client == "*":
                other = backend
            elif client in pairs:
                raise ConfigError(f"{VARIABLE}: {client!r} is mapped twice (entry {position})")
            else:
                pairs[client] = backend
        return cls(pairs, other)

    @property
    def identity(self) -> bool:
        """True when no name is ever changed."""
        return not self.pairs and self.other is None

    def target(self, name: str | None) -> str | _BackendModel | None:
        """The backend name for client name ``name``: a name, BACKEND_MODEL, or None (no name: leave it out)."""
        if name is not None and name in self.pairs:
            return self.pairs[name]
        if self.other is not None:
            return self.other
        return name

"""Bearer API keys for the gateway, each with the scopes it may use.

``ROLLSTREAM_GATEWAY_API_KEYS`` is a comma-separated list of ``key=scope+scope`` entries,
for example ``agent-key=models,grader-key=rewards,admin-key=models+rewards``:

- ``models``: the model endpoints (chat, completions, responses, messages, models); the Anthropic
  Messages route also takes the key in an ``x-api-key`` header, as Anthropic clients send it;
- ``rewards``: the rollout and reward API (``/v1/rollouts...``).

The OTLP receiver reads ``ROLLSTREAM_OTLP_API_KEYS`` in the same form with one scope, ``traces``
(``POST /v1/traces``, which publishes calls and rewards). A key written without ``=`` has every
scope of the service that reads it. Keys are compared in constant time
(``hmac.compare_digest`` over SHA-256 digests, every configured key checked) and never
logged; only a key's position in the list (``key#2``) appears in logs.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from dataclasses import dataclass
from typing import Literal, get_args

from rollstream.errors import ConfigError
from rollstream.producers.http import HttpError

log = logging.getLogger(__name__)

LOOPBACK_NAMES = {"localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def guard_unauthenticated(keys: KeyRing, host: str, service: str, variable: str, example: str) -> None:
    """Without keys a service may only listen on loopback: refuse anything else, and say auth is off."""
    if keys.enabled:
        return
    if not is_loopback(host):
        raise ConfigError(
            f"no API keys configured, so the {service} only binds loopback, not {host!r}; "
            f"set {variable} (e.g. '{example}')"
        )
    log.warning("no API keys configured (%s): authentication is OFF; binding loopback only (%s)", variable, host)

ScopeName = Literal["models", "rewards", "traces"]
GATEWAY_SCOPES: tuple[ScopeName, ...] = ("models", "rewards")
OTLP_SCOPES: tuple[ScopeName, ...] = ("traces",)
SCOPES: tuple[ScopeName, ...] = get_args(ScopeName)


@dataclass(frozen=True)
class ApiKey:
    """One configured key: its digest (the key itself is not kept) and its scopes."""

    label: str
    digest: bytes
    scopes: frozenset[str]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_api_keys(text: str, variable: str = "ROLLSTREAM_GATEWAY_API_KEYS",
                   scopes: tuple[ScopeName, ...] = GATEWAY_SCOPES) -> list[ApiKey]:
    """Parse ``key=scope+scope,...`` for a service offering ``scopes``; malformed entries raise ConfigError
    (without the key)."""
    keys: list[ApiKey] = []
    for position, entry in enumerate((e.strip() for e in text.split(",")), start=1):
        if not entry:
            continue
        key, sep, scope_text = entry.partition("=")
        key = key.strip()
        label = f"key#{position}"
        if not key:
            raise ConfigError(f"{variable}: entry {position} has an empty key")
        given = {s.strip() for s in scope_text.split("+") if s.strip()} if sep else set(scopes)
        unknown = sorted(given - set(scopes))
        if unknown or not given:
            raise ConfigError(
                f"{variable}: {label} has scope(s) {unknown or '(none)'}; "
                f"use {' / '.join(scopes)} joined with '+', e.g. key={'+'.join(scopes)}"
            )
        keys.append(ApiKey(label, _digest(key), frozenset(given)))
    return keys


class KeyRing:
    """Checks ``Authorization: Bearer <key>`` (or ``x-api-key``) headers against the configured keys."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    @classmethod
    def from_text(cls, text: str, variable: str = "ROLLSTREAM_GATEWAY_API_KEYS",
                  scopes: tuple[ScopeName, ...] = GATEWAY_SCOPES) -> KeyRing:
        return cls(parse_api_keys(text, variable, scopes))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def identify(self, authorization: str | None) -> ApiKey | None:
        """The key presented in ``authorization``, or None; compares with every key in constant time."""
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = _digest(token.strip())
        found: ApiKey | None = None
        for key in self.keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    def authorize(self, authorization: str | None, scope: ScopeName, api_key: str | None = None) -> ApiKey | None:
        """Raise 401 for a missing or unknown key, 403 for a key without ``scope``; None when auth is off.

        ``api_key`` is the ``x-api-key`` header on routes that accept it (Anthropic clients send their key
        there, not in Authorization): a string, empty when the header is absent; None elsewhere."""
        if not self.keys:
            return None
        key = self.identify(authorization)
        if key is None and authorization is None and api_key:
            key = self.identify(f"Bearer {api_key}")
        if key is None:
            what = "missing" if authorization is None and not api_key else "invalid"
            how = "'x-api-key: <key>' or 'Authorization: Bearer <key>'" if api_key is not None else \
                "'Authorization: Bearer <key>'"
            raise HttpError(401, f"{what} API key: send {how}", code="invalid_api_key")
        if scope not in key.scopes:
            raise HttpError(
                403, f"this API key lacks the '{scope}' scope (it has: {', '.join(sorted(key.scopes))})",
                code="insufficient_scope",
            )
        return key

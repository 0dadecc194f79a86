"""Small ASGI helpers for the gateway: request bodies, JSON responses, OpenAI-style (and Anthropic-style) errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from rollstream.errors import GatewayError, InvalidEventError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
# An answer that leaves part of the request unread: what arrives next on the connection is that
# request's rest, not a new request, so the server closes it once answered.
CLOSE = [(b"connection", b"close")]

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    502: "backend_error",
    503: "unavailable_error",
    504: "backend_timeout",
}

# Anthropic's error types, for the Messages route (its clients read error.type).
ANTHROPIC_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
                         503: "overloaded_error", 504: "timeout_error"}


class HttpError(GatewayError):
    """A request the gateway answers with an error status and an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 extra: dict[str, Any] | None = None, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.extra = extra
        self.headers = headers or []

    @classmethod
    def of(cls, exc: HttpError | InvalidEventError) -> HttpError:
        """``exc`` as the gateway answers it: an invalid event (``api``'s validation) is a 422 naming its field."""
        if isinstance(exc, InvalidEventError):
            return cls(422, exc.message, param=exc.param, code="invalid_field")
        return exc

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.param, self.code, self.extra)

    async def send(self, send: Send, anthropic: bool = False) -> None:
        """Answer with this error (JSON body, in Anthropic's shape if asked, and the headers it was raised with)."""
        body = anthropic_error_body(self.status, self.message) if anthropic else self.body()
        await respond(send, self.status, body, [*JSON_HEADERS, *self.headers])


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               extra: dict[str, Any] | None = None) -> bytes:
    """``{"error": {...}}`` in the shape OpenAI clients parse; ``extra`` adds fields to the error object."""
    error = {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": code,
                       **(extra or {})}}
    try:
        return orjson.dumps(error)
    except TypeError:  # a message quoting client text that is not valid UTF-8: escape it instead
        return json.dumps(error).encode()


def anthropic_error_body(status: int, message: str) -> bytes:
    """``{"type": "error", "error": {"type": ..., "message": ...}}``, the shape Anthropic clients parse."""
    kind = ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    error = {"type": "error", "error": {"type": kind, "message": message}}
    try:
        return orjson.dumps(error)
    except TypeError:
        return json.dumps(error).encode()


async def read_body(receive: Receive, limit: int, timeout: float | None = None) -> bytes:
    """The whole request body; 413 past ``limit`` bytes, 408 when ``timeout`` seconds pass with nothing
    more of it arriving (a client that announced more than it sends, or stalled).

    The timeout is between reads, not for the whole body (as nginx's ``client_body_timeout``), so a
    large body on a slow but moving link is not cut off."""
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), timeout)
        except TimeoutError:
            raise HttpError(
                408, f"the request body stopped arriving: nothing more came for {timeout:g} s after {size} bytes "
                     "(ROLLSTREAM_GATEWAY_BODY_TIMEOUT); send the whole body the Content-Length header announces",
                code="body_timeout", headers=CLOSE) from None
        if message["type"] == "http.disconnect":
            raise HttpError(400, "client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"request body is larger than {limit} bytes (ROLLSTREAM_GATEWAY_MAX_BODY)")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object. NaN and Infinity literals (invalid JSON, but sent by some clients) parse to
    non-finite floats so that validation can refuse them naming the field that holds them."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise HttpError(400, f"request body is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(value, dict):
        raise HttpError(400, f"request body must be a JSON object, not {type(value).__name__}")
    _check_text(value)
    return value


def _check_text(value: Any) -> None:
    """400 for strings with unpaired surrogates (``"\\ud800"``): JSON allows them, UTF-8 and Avro do not."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError as exc:
                raise HttpError(400, "request body holds text that is not valid Unicode (an unpaired surrogate "
                                     f"escape such as \\ud800 at character {exc.start})") from exc


async def respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, status: int, value: Any) -> None:
    await respond(send, status, orjson.dumps(value))


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower-case bytes), decoded as latin-1."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None

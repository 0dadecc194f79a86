"""The rollout and reward API's validation: a neutral InvalidEventError, answered 422 by the gateway."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from rollstream.errors import GatewayError, InvalidEventError, RollstreamError
from rollstream.producers import api
from rollstream.producers.gateway import Gateway, GatewaySettings
from rollstream.producers.http import HttpError, error_body
from rollstream.producers.publisher import Delivery
from rollstream.schemas.topics import Topics

TOPICS = Topics(prefix="unit.")
NOT_FINITE = "'value': must be finite (NaN and infinities are not rewards)"


class Publisher:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def has_room(self, n: int = 1) -> bool:
        return True

    def publish(self, topic: str, key: str, records: list[dict[str, Any]]) -> Delivery | None:
        self.sent += records
        return Delivery.settled()

    def depth(self) -> int:
        return 0

    def close(self, timeout: float = 30.0) -> int:
        return 0


def test_invalid_input_raises_a_neutral_error_naming_the_field() -> None:
    with pytest.raises(InvalidEventError) as err:
        api.reward("r-1", {"value": float("nan")}, "src")
    assert isinstance(err.value, RollstreamError) and not isinstance(err.value, GatewayError)
    assert err.value.param == "value" and str(err.value) == NOT_FINITE
    with pytest.raises(InvalidEventError, match="rollout_id") as err:
        api.check_id("a/b", "rollout_id")
    assert err.value.param == "rollout_id"


@pytest.mark.parametrize(("path", "body", "param", "message"), [
    ("/v1/rollouts/r-1/rewards", b'{"value": NaN}', "value", NOT_FINITE),
    ("/v1/rollouts/r-1/finish", b'{"status": "DONE"}', "status",
     "'status': must be one of SUCCEEDED, FAILED, CANCELLED"),
    ("/v1/rollouts", b'{"colour": 1}', "colour", None),
])
def test_the_gateway_answers_an_invalid_event_422_with_the_field(path: str, body: bytes, param: str,
                                                                 message: str | None) -> None:
    publisher = Publisher()

    async def go() -> httpx.Response:
        app = Gateway(GatewaySettings(backend_url="http://127.0.0.1:9/v1"), publisher, TOPICS)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return await client.post(path, content=body)

    r = asyncio.run(go())
    error = r.json()["error"]
    assert (r.status_code, error["param"], error["code"], error["type"]) == (422, param, "invalid_field",
                                                                              "invalid_request_error")
    if message is not None:
        assert r.content == error_body(422, message, param, "invalid_field")
    assert publisher.sent == []


def test_http_error_of_maps_an_invalid_event_and_keeps_an_http_error() -> None:
    mapped = HttpError.of(InvalidEventError("'attempt': must be an integer", "attempt"))
    assert (mapped.status, mapped.param, mapped.code) == (422, "attempt", "invalid_field")
    assert orjson.loads(mapped.body())["error"]["message"] == "'attempt': must be an integer"
    original = HttpError(404, "no route")
    assert HttpError.of(original) is original

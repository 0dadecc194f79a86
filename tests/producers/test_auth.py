"""API keys: parsing, scopes, 401 / 403, and keys never appearing in errors."""

from __future__ import annotations

import pytest

from rollstream.errors import ConfigError
from rollstream.producers.auth import KeyRing, parse_api_keys
from rollstream.producers.http import HttpError


def test_parse_keys_and_scopes() -> None:
    keys = parse_api_keys(" agent=models , grader=rewards,admin=models+rewards,bare ,")
    assert [k.label for k in keys] == ["key#1", "key#2", "key#3", "key#4"]
    assert [sorted(k.scopes) for k in keys] == [["models"], ["rewards"], ["models", "rewards"], ["models", "rewards"]]
    assert all(b"agent" not in k.digest for k in keys)


@pytest.mark.parametrize("text", ["secret=models+admin", "secret=", "=models"])
def test_bad_entries_name_the_problem_not_the_key(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_api_keys(text)
    assert "secret" not in str(err.value) and "ROLLSTREAM_GATEWAY_API_KEYS" in str(err.value)


def test_authorize() -> None:
    ring = KeyRing.from_text("agent=models,grader=rewards")
    assert ring.authorize("Bearer agent", "models") is not None
    assert ring.authorize("bearer grader", "rewards") is not None
    for header in (None, "Bearer wrong", "Basic agent", "Bearer ", "agent"):
        with pytest.raises(HttpError) as err:
            ring.authorize(header, "models")
        assert err.value.status == 401
    with pytest.raises(HttpError) as err:
        ring.authorize("Bearer agent", "rewards")
    assert err.value.status == 403 and "rewards" in err.value.message and "agent" not in err.value.message


def test_no_keys_means_no_auth() -> None:
    ring = KeyRing.from_text("")
    assert not ring.enabled and ring.authorize(None, "rewards") is None

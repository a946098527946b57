"""Every way a caller can be refused: status, envelope, and a log row for each."""

from __future__ import annotations

import httpx
import pytest

from tests.gateway.conftest import Stack


def call(stack: Stack, authorization: str | None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return httpx.get(f"{stack.gateway_url}/v1/models", headers=headers)


def refused(stack: Stack, response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    row = stack.row(response.headers["x-request-id"])
    assert row["status"] == status and row["outcome"] == "rejected"
    assert row["error"] == error["message"]


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "missing_api_key"),
        ("Basic dXNlcjpwYXNz", "invalid_authorization_header"),
        ("Bearer", "invalid_authorization_header"),
        ("Bearer lsk_0123456789_" + "A" * 43, "invalid_api_key"),
        ("Bearer sk-not-ours", "invalid_api_key"),
    ],
    ids=["no-header", "not-bearer", "empty-bearer", "unknown-key", "foreign-key"],
)
def test_bad_credentials_are_401(stack: Stack, authorization: str | None, code: str) -> None:
    refused(stack, call(stack, authorization), 401, code)


def test_the_engine_key_is_refused(stack: Stack) -> None:
    refused(stack, call(stack, f"Bearer {stack.engine_key}"), 401, "invalid_api_key")


def test_a_tampered_secret_is_refused(stack: Stack, alice: str) -> None:
    tampered = alice[:-1] + ("A" if alice[-1] != "A" else "B")
    refused(stack, call(stack, f"Bearer {tampered}"), 401, "invalid_api_key")


def test_each_key_acts_as_its_own_user(stack: Stack) -> None:
    bob, carol = stack.create_user("bob-auth"), stack.create_user("carol-auth")
    for name, key in (("bob-auth", bob), ("carol-auth", carol)):
        response = call(stack, f"Bearer {key}")
        assert response.status_code == 200
        assert stack.row(response.headers["x-request-id"])["username"] == name


def test_revoked_key_is_401_at_once(stack: Stack) -> None:
    key = stack.create_user("dave-auth")
    assert call(stack, f"Bearer {key}").status_code == 200
    key_id = key.split("_")[1]
    assert stack.cli("revoke-key", "--key-id", key_id).returncode == 0
    refused(stack, call(stack, f"Bearer {key}"), 401, "key_revoked")


def test_rotated_away_key_is_401_and_the_new_one_works(stack: Stack) -> None:
    import json

    key = stack.create_user("erin-auth")
    assert call(stack, f"Bearer {key}").status_code == 200
    rotated = stack.cli("rotate-key", "--key-id", key.split("_")[1], "--json")
    assert rotated.returncode == 0, rotated.stderr
    new_key = json.loads(rotated.stdout)["key"]
    refused(stack, call(stack, f"Bearer {key}"), 401, "key_revoked")
    assert call(stack, f"Bearer {new_key}").status_code == 200


def test_disabled_user_is_403_and_enabled_again_200(stack: Stack) -> None:
    key = stack.create_user("frank-auth")
    assert stack.cli("disable-user", "--username", "frank-auth").returncode == 0
    refused(stack, call(stack, f"Bearer {key}"), 403, "user_disabled")
    assert stack.cli("enable-user", "--username", "frank-auth").returncode == 0
    assert call(stack, f"Bearer {key}").status_code == 200

"""Both engines' answers where OpenAI's API says more than the engines did: `Allow` on
a 405."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ENVELOPE, Engine


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/v1/chat/completions", "POST"), ("PUT", "/v1/completions", "POST"),
     ("POST", "/v1/models", "GET"), ("DELETE", "/v1/models/{model}", "GET"),
     ("POST", "/health", "GET")],
)  # fmt: skip
def test_a_wrong_method_is_405_naming_the_routes_method(
    engine: Engine, method: str, path: str, allow: str
) -> None:
    response = httpx.request(
        method,
        f"{engine.base_url}{path.format(model=engine.model)}",
        headers={"Authorization": f"Bearer {engine.api_key}"},
    )
    assert response.status_code == 405, response.text
    assert response.headers.get_list("allow") == [allow]
    error = response.json()["error"]
    assert set(error) == ENVELOPE and error["type"] == "invalid_request_error"

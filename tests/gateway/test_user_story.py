"""The README's multi-user story with the official SDK and a user's own key."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.gateway.conftest import Stack

CHAT = [{"role": "user", "content": "Say hello in one sentence."}]


def test_models_chat_stream_and_completions_with_a_user_key(stack: Stack, alice: str) -> None:
    client = stack.client(alice)
    assert [m.id for m in client.models.list().data] == [stack.model]

    chat = client.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=8)
    assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens == 8

    chunks = list(
        client.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=8, stream=True)
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # the usage we ask for is not passed on

    with_usage = list(
        client.chat.completions.create(
            model=stack.model,
            messages=CHAT,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 8

    completion = client.completions.create(model=stack.model, prompt="Once upon", max_tokens=5)
    assert completion.choices[0].text and completion.choices[0].finish_reason == "length"


@pytest.mark.one_engine
def test_health_needs_no_key_and_ready_checks_both(stack: Stack) -> None:
    assert httpx.get(f"{stack.gateway_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.gateway_url}/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    assert_whole(ready)


def assert_whole(response: httpx.Response) -> None:
    """A whole answer says its length, rather than arriving in chunks."""
    assert "transfer-encoding" not in response.headers
    assert int(response.headers["content-length"]) == len(response.content)


def test_retrieve_model_with_a_user_key(stack: Stack, alice: str) -> None:
    client = stack.client(alice)
    assert client.models.retrieve(stack.model).id == stack.model
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        stack.client("lsk_0000000000_" + "0" * 43).models.retrieve(stack.model)


def test_whole_answers_say_their_length(stack: Stack, alice: str) -> None:
    headers = {"Authorization": f"Bearer {alice}"}
    chat = {"model": stack.model, "messages": CHAT, "max_tokens": 4}
    answer = httpx.post(f"{stack.gateway_url}/v1/chat/completions", json=chat, headers=headers)
    assert answer.status_code == 200 and answer.json()["choices"]
    assert_whole(answer)
    assert_whole(httpx.get(f"{stack.gateway_url}/v1/models", headers=headers))


@pytest.mark.one_engine
def test_the_engine_listens_on_loopback_only(stack: Stack) -> None:
    status = stack.project.console("status")
    assert status.returncode == 0, status.stdout
    lines = dict(line.split(": ", 1) for line in status.stdout.strip().splitlines())
    assert "127.0.0.1:" in lines["engine"]
    assert lines["gateway"].startswith("running") and lines["database"].startswith("running")


@pytest.mark.one_engine
def test_engine_routes_other_than_openai_are_unreachable(stack: Stack, alice: str) -> None:
    headers = {"Authorization": f"Bearer {alice}"}
    for path in ("/slots", "/props", "/extras/tokenize", "/docs", "/v1/unknown"):
        response = httpx.get(stack.gateway_url + path, headers=headers)
        assert response.status_code == 404, path
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    # /metrics is the gateway's own, for the operator's key: never the engine's.
    response = httpx.get(stack.gateway_url + "/metrics", headers=headers)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "admin_key_required"


@pytest.mark.one_engine
def test_no_key_ever_reaches_the_gateway_log(stack: Stack, alice: str) -> None:
    stack.client(alice).models.list()
    httpx.get(
        f"{stack.gateway_url}/v1/models", headers={"Authorization": "Bearer " + stack.engine_key}
    )
    log = (stack.project.runtime / "logs" / "gateway.log").read_text()
    assert "request id=" in log
    assert alice not in log and stack.engine_key not in log


@pytest.mark.one_engine
def test_no_table_holds_a_key_after_traffic(stack: Stack, alice: str) -> None:
    client = stack.client(alice)
    client.models.list()
    client.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=2)
    tables = stack.query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    assert {"users", "api_keys", "llama_requests"} <= {t["table_name"] for t in tables}
    for table in tables:
        name = table["table_name"]
        hits = stack.query(
            f'SELECT count(*) AS n FROM "{name}" t WHERE t::text LIKE $1 OR t::text LIKE $2',
            f"%{alice}%",
            f"%{stack.engine_key}%",
        )
        assert hits[0]["n"] == 0, name

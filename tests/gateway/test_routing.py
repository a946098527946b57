"""Routing among several engines by prefix (`gateway/affinity.py`): a conversation's
turns go where its earlier turns went, unless that engine is full and another is free;
the map of prefixes is bounded. Through an in-process gateway with two mock engines, and
the pieces on their own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from bench.mock_engine import MODEL, MockEngine

from llamaserve.gateway.affinity import PrefixMap, prefixes_of
from llamaserve.gateway.scheduling import BALANCE_SLOTS, EngineState, QueueLimits, Scheduler
from tests.gateway.conftest import Stack
from tests.gateway.harness import Site

CHAT = "/v1/chat/completions"
SYSTEM = "You are a patient tutor of {}. Answer in a few sentences, with one example."


def opening(topic: str) -> list[dict[str, Any]]:
    # The mock engine tags a request by its first message: the conversation's.
    return [
        {"role": "system", "content": SYSTEM.format(topic)},
        {"role": "user", "content": f"Tell me about {topic}."},
    ]


class Conversation:
    """One conversation through a gateway: its history grows by each turn's answer."""

    def __init__(self, gateway: httpx.AsyncClient, key: str, topic: str) -> None:
        self.gateway, self.key = gateway, key
        self.messages = opening(topic)
        self.engines: list[str] = []  # where each turn went (its request-log row)

    async def turn(self, site: Site, delay: float = 0.0) -> None:
        if len(self.messages) > 2:
            self.messages.append({"role": "user", "content": "And then? Tell me more."})
        body = {"model": MODEL, "messages": self.messages, "mock_delay": delay}
        answer = await self.gateway.post(
            CHAT, json=body, headers={"Authorization": f"Bearer {self.key}"}
        )
        assert answer.status_code == 200, answer.text
        text = answer.json()["choices"][0]["message"]["content"]
        self.messages.append({"role": "assistant", "content": text})
        row = await site.logged(answer.headers["x-request-id"])
        self.engines.append(row["engine"])


@pytest.fixture
def engines() -> Iterator[tuple[MockEngine, MockEngine]]:
    first, second = MockEngine(slots=2).start(), MockEngine(slots=2).start()
    try:
        yield first, second
    finally:
        first.kill()
        second.kill()


async def converse(site: Site, backends: str, routing: str) -> tuple[list[str], list[str]]:
    """Two conversations: their first turns at once (one on each engine), then turns
    one at a time, alternating, while both engines are free."""
    key = site.create_user(f"routing-{routing}")
    async with site.gateway(llama_server_backend_url=backends, llama_proxy_routing=routing) as g:
        a, b = Conversation(g, key, "tides"), Conversation(g, key, "volcanoes")
        await asyncio.gather(a.turn(site, delay=0.3), b.turn(site, delay=0.3))
        for _ in range(3):
            await a.turn(site)
            await b.turn(site)
    return a.engines, b.engines


@pytest.mark.anyio
async def test_each_conversation_stays_on_the_engine_of_its_first_turn(
    site: Site, engines: tuple[MockEngine, MockEngine]
) -> None:
    backends = ",".join(e.url for e in engines)
    a, b = await converse(site, backends, "prefix")
    assert {a[0], b[0]} == {e.url for e in engines}  # two conversations: two engines
    assert a == [a[0]] * 4 and b == [b[0]] * 4


@pytest.mark.anyio
async def test_least_loaded_routing_scatters_a_conversation(
    site: Site, engines: tuple[MockEngine, MockEngine]
) -> None:
    """The contrast, and LLAMA_PROXY_ROUTING=least-loaded at work: with both engines
    free, every later turn goes to the same (first) engine, whichever conversation it is."""
    backends = ",".join(e.url for e in engines)
    a, b = await converse(site, backends, "least-loaded")
    assert {a[0], b[0]} == {e.url for e in engines}
    assert set(a[1:]) == set(b[1:]) == {engines[0].url}


@pytest.mark.anyio
async def test_a_turn_goes_to_a_free_engine_when_its_own_is_full(site: Site) -> None:
    first, second = MockEngine(slots=1).start(), MockEngine(slots=1).start()
    key = site.create_user("routing-full")
    backends = f"{first.url},{second.url}"
    try:
        async with site.gateway(llama_server_backend_url=backends) as g:
            a, c = Conversation(g, key, "tides"), Conversation(g, key, "comets")
            await a.turn(site)  # both free: the first engine
            busy = asyncio.create_task(c.turn(site, delay=1.0))  # both free: the first again
            await asyncio.sleep(0.3)
            await a.turn(site)  # its engine is full, the other free: there, at once
            await busy
            await a.turn(site)  # and from then on where its last turn went
    finally:
        first.kill()
        second.kill()
    assert c.engines == [first.url]
    assert a.engines == [first.url, second.url, second.url]
    row = (await site.fetch("SELECT max(queue_ms) AS wait FROM llama_requests "
                            "WHERE username = $1", "routing-full"))[0]  # fmt: skip
    assert row["wait"] < 500  # no turn waited for the busy engine


@pytest.mark.anyio
async def test_a_turn_waits_for_any_engine_when_all_are_full() -> None:
    """In the queue, the preferred engine is taken when it frees first, another engine
    when that frees first: a request never waits for its own engine while one is free."""
    first, second = EngineState("first", capacity=1), EngineState("second", capacity=1)
    scheduler = Scheduler([first, second], QueueLimits())
    held = [await scheduler.acquire("u1"), await scheduler.acquire("u2")]
    waiting = asyncio.create_task(scheduler.acquire("u3", prefer=first))
    await asyncio.sleep(0)
    scheduler.release("u2", second)
    grant = await waiting
    assert grant.engine is second and held[0].engine.in_flight == 1
    scheduler.release("u1", first)
    assert (await scheduler.acquire("u4", prefer=first)).engine is first


@pytest.mark.anyio
async def test_a_turn_leaves_its_engine_for_a_much_less_busy_one() -> None:
    """Each engine batches its own requests: one with BALANCE_SLOTS fewer busy slots
    answers sooner than a cached prompt saves."""
    first, second = EngineState("first", capacity=4), EngineState("second", capacity=4)
    scheduler = Scheduler([first, second], QueueLimits())
    grants = [await scheduler.acquire(f"u{i}", prefer=first) for i in range(3)]
    assert BALANCE_SLOTS == 2
    # 4 free against 4, then 3 against 4: its own; 2 against 4: the other.
    assert [g.engine for g in grants] == [first, first, second]


def chat(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages}


def test_the_longest_remembered_prefix_names_the_engine() -> None:
    one, two = EngineState("one"), EngineState("two")
    routes = PrefixMap()
    turn1 = opening("tides")
    first = prefixes_of(CHAT, chat(turn1))
    assert first is not None and routes.holder(first) is None
    routes.remember(first, one)
    turn2 = [*turn1, {"role": "assistant", "content": "Tides..."}, {"role": "user", "content": "?"}]
    second = prefixes_of(CHAT, chat(turn2))
    assert second is not None and routes.holder(second) is one
    routes.remember(second, two)  # turn 2 went elsewhere: turn 3 follows it there
    turn3 = [*turn2, {"role": "assistant", "content": "..."}, {"role": "user", "content": "!"}]
    assert routes.holder(prefixes_of(CHAT, chat(turn3))) is two
    # Another conversation shares the system prompt only, less than half of it: it goes
    # where the load says.
    question = "Tell me about comets: their tails, their orbits, where they come from, " * 2
    other = [turn1[0], {"role": "user", "content": question}]
    assert routes.holder(prefixes_of(CHAT, chat(other))) is None


def test_each_api_and_a_plain_prompt_has_prefixes() -> None:
    long_prompt = "word" * 512  # 2048 characters: four blocks
    completions = prefixes_of("/v1/completions", {"model": MODEL, "prompt": long_prompt})
    assert completions is not None and len(completions.digests) == 4
    longer = prefixes_of("/v1/completions", {"prompt": long_prompt + "more words " * 60})
    assert longer is not None and longer.digests[:4] == completions.digests
    responses = prefixes_of("/v1/responses", {"input": [{"role": "user", "content": "hi"}]})
    messages = prefixes_of("/v1/messages", {"system": "s", "messages": opening("x")})
    assert responses is not None and len(responses.digests) == 2  # header, one item
    assert messages is not None and len(messages.digests) == 3
    assert prefixes_of("/v1/embeddings", {"input": "x"}) is None
    assert prefixes_of("/v1/completions", {"prompt": ["a", "b"]}) is None  # a batch


def test_the_map_is_bounded_and_forgets_the_least_recently_used() -> None:
    engine = EngineState("one")
    routes = PrefixMap(entries=4)
    conversations = []
    for topic in ("a", "b", "c"):
        prefixes = prefixes_of(CHAT, chat(opening(topic)))
        assert prefixes is not None and len(prefixes.digests) == 3  # header, system, user
        routes.remember(prefixes, engine)
        conversations.append(prefixes)
        assert len(routes) <= 4
    assert len(routes) == 4
    assert routes.holder(conversations[0]) is None  # the oldest is forgotten
    assert routes.holder(conversations[2]) is engine


@pytest.mark.one_engine  # llama-server: llama-cpp-python does not count cached tokens
def test_a_conversations_next_turn_reuses_its_cached_prefix(stack: Stack, alice: str) -> None:
    """Through the gateway, turn N's usage says how much of its prompt llama-server took
    from its cache: the history that turn N-1 computed, its answer included."""
    client = stack.client(alice)
    messages = opening("tides")
    prompts, completions, cached = [], [], []
    for turn in range(3):
        if turn:
            messages.append({"role": "user", "content": "And then? Tell me more, please."})
        options = {"stream_options": {"include_usage": True}} if turn == 2 else {}
        answer = client.chat.completions.create(
            model=stack.model, messages=messages, max_tokens=16, temperature=0,
            stream=turn == 2, **options,
        )  # fmt: skip
        if turn == 2:
            chunks = list(answer)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
        else:
            text, usage = answer.choices[0].message.content, answer.usage
        messages.append({"role": "assistant", "content": text})
        assert usage is not None and usage.prompt_tokens_details is not None
        prompts.append(usage.prompt_tokens)
        completions.append(usage.completion_tokens)
        cached.append(usage.prompt_tokens_details.cached_tokens)
    # Each turn finds in the cache all that the previous turn computed: its prompt and its
    # answer (but the answer's last token, sampled and never decoded).
    assert cached[0] < prompts[0]
    assert cached[1] == prompts[0] + completions[0] - 1 < prompts[1]
    assert cached[2] == prompts[1] + completions[1] - 1 < prompts[2]
    responses = [
        client.responses.create(model=stack.model, input=messages, max_output_tokens=16)
        for _ in range(2)
    ]
    assert responses[1].usage is not None and responses[1].usage.input_tokens_details.cached_tokens

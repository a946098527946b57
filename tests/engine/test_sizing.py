"""llama-server's slots sized to the machine (LLAMA_PARALLEL=0): the choice for a few
machines, the model's KV cost read from its GGUF header, the flags llama-server gets,
and (slow) the engine started by the real scripts with them, a long request included."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

import httpx
import pytest

from llamaserve.config import ConfigError, Settings
from llamaserve.engine.gguf import read_shape
from llamaserve.engine.llama_server import build_argv
from llamaserve.engine.sizing import POOL_CONTEXTS, Sizing, auto_slots, choose, size_for
from tests.conftest import default_model, make_project

GIB = 1024**3
KV_270M = 18 * 1 * (256 + 256) * 2  # Gemma 3 270M: 18 layers, 1 KV head of 256, f16


@pytest.mark.parametrize(("cores", "slots"), [(1, 8), (2, 16), (3, 24), (4, 32), (64, 32)])
def test_the_slots_grow_with_the_cores_within_bounds_and_the_pool_does_not(
    cores: int, slots: int
) -> None:
    assert auto_slots(cores) == slots
    sizing = choose(0, 4096, cores=cores, available=64 * GIB, model_bytes=GIB,
                    kv_bytes_per_token=KV_270M)  # fmt: skip
    # Memory to spare: the pool holds POOL_CONTEXTS whole contexts, whatever the slots,
    # one request at most its own.
    assert sizing == Sizing(slots, POOL_CONTEXTS * 4096, 4096, auto=True)


def test_short_memory_shrinks_the_shared_pool_never_below_one_context() -> None:
    # 2 cores, 1 GiB free, a 0.5 GiB model: 0.25 GiB of KV at 18 KiB a token.
    sizing = choose(0, 4096, cores=2, available=GIB, model_bytes=GIB // 2,
                    kv_bytes_per_token=KV_270M)  # fmt: skip
    assert (sizing.slots, sizing.per_slot) == (16, 4096)
    assert sizing.pool == (GIB // 4) // KV_270M < POOL_CONTEXTS * 4096
    starved = choose(0, 4096, cores=2, available=GIB, model_bytes=GIB,
                     kv_bytes_per_token=KV_270M)  # fmt: skip
    assert starved.pool == 4096


def test_a_set_size_is_kept_and_the_models_own_context_is_shared() -> None:
    kept = choose(4, 4096, cores=2, available=None, model_bytes=0, kv_bytes_per_token=None)
    assert kept == Sizing(4, 4 * 4096, 4096, auto=False)  # no more than its slots can use
    pool = choose(0, 4096, pool=6000, cores=2, available=GIB, model_bytes=GIB,
                  kv_bytes_per_token=KV_270M)  # fmt: skip
    assert pool == Sizing(16, 6000, 4096, auto=True)  # as set, memory or not
    with pytest.raises(ConfigError, match="LLAMA_KV_POOL=2000"):
        choose(0, 4096, pool=2000, cores=2, available=None, model_bytes=0,
               kv_bytes_per_token=None)  # fmt: skip
    shared = choose(0, 0, cores=2, available=64 * GIB, model_bytes=0, kv_bytes_per_token=KV_270M)
    assert shared == Sizing(16, 0, 0, auto=True)


def gguf(values: dict[str, int | str]) -> bytes:
    """A GGUF header with these key-values (u32 or string) and an array, no tensors."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(values) + 1)

    def text(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    out += text("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + text("a") + text("b")
    for key, value in values.items():
        kind = (8, text(value)) if isinstance(value, str) else (4, struct.pack("<I", value))
        out += text(key) + struct.pack("<I", kind[0]) + kind[1]
    return out


def test_the_kv_cost_of_a_token_is_read_from_the_models_header(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(gguf({
        "general.architecture": "gemma3", "gemma3.block_count": 18,
        "gemma3.embedding_length": 640, "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 256,
        "gemma3.attention.value_length": 256, "gemma3.context_length": 32768,
        "gemma3.attention.sliding_window": 512,
    }))  # fmt: skip
    shape = read_shape(model)
    assert shape is not None and shape.kv_bytes_per_token == KV_270M
    assert shape.context_length == 32768 and shape.sliding_window == 512
    model.write_bytes(gguf({"general.architecture": "x"}))  # says nothing of its shape
    assert read_shape(model) is None
    model.write_bytes(b"not a model")
    assert read_shape(model) is None


def test_llama_server_gets_the_slots_and_one_shared_pool(tmp_path: Path) -> None:
    sizing = Sizing(16, 65536, 4096, auto=True)
    argv = build_argv(Settings(), tmp_path / "m.gguf", binary=tmp_path / "bin", port=1,
                      key_file=tmp_path, sizing=sizing)  # fmt: skip
    assert argv[argv.index("--parallel") + 1] == "16" and "--kv-unified" in argv
    assert argv[argv.index("--ctx-size") + 1] == "65536"
    assert argv[argv.index("--kv-unified-per-slot") + 1] == "4096"
    shared = build_argv(Settings(), tmp_path / "m.gguf", binary=tmp_path / "bin", port=1,
                        key_file=tmp_path, sizing=Sizing(16, 0, 0, auto=True))  # fmt: skip
    assert shared[shared.index("--ctx-size") + 1] == "0"
    assert "--kv-unified-per-slot" not in shared and "--swa-full" not in shared


def test_a_model_with_sliding_window_layers_keeps_them_whole() -> None:
    """So that a conversation's next turn finds the previous answer in the cache (see
    `test_a_conversations_next_turn_reuses_its_cached_prefix`)."""
    model = default_model()
    assert size_for(Settings(), model).full_windows  # Gemma 3: sliding-window layers
    shape = read_shape(model)
    assert shape is not None and shape.sliding_window > 0
    argv = build_argv(Settings(), model, binary=model, port=1, key_file=model,
                      sizing=Sizing(16, 65536, 4096, auto=True, full_windows=True))  # fmt: skip
    assert "--swa-full" in argv


def child_argv(engine_pid: int) -> list[str]:
    """The command line of the engine process's llama-server."""
    children = Path(f"/proc/{engine_pid}/task/{engine_pid}/children").read_text().split()
    for pid in children:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        if Path(argv[0]).name == "llama-server":
            return argv
    raise AssertionError(f"no llama-server among {children}")


@pytest.mark.slow  # it starts an engine of its own
def test_the_real_scripts_start_llama_server_with_the_slots_chosen(tmp_path: Path) -> None:
    slots = auto_slots(os.cpu_count() or 1)
    project = make_project(tmp_path / "rt", LLAMA_ENGINE="llama-server")  # the template's 0
    try:
        started = project.console("start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"{slots} slots (chosen for this machine) of up to 4096 tokens" in started.stdout
        record = json.loads((project.runtime / "run" / "engine.pid").read_text())
        argv = child_argv(record["pid"])
        assert argv[argv.index("--parallel") + 1] == str(slots) and "--kv-unified" in argv
        assert argv[argv.index("--kv-unified-per-slot") + 1] == "4096"
        config = dict(line.split("=", 1) for line in (project.runtime / "config.env")
                      .read_text().splitlines() if line.startswith("LLAMA_SERVER_"))  # fmt: skip
        url = f"http://127.0.0.1:{config['LLAMA_SERVER_PORT'].strip(chr(34))}"
        key = config["LLAMA_SERVER_API_KEY"].strip('"')
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/health", headers=headers).json()["slots"] == slots
        # A request near a slot's whole context still fits with all these slots.
        model = default_model().name
        body = {"model": model, "prompt": "word " * 3000, "max_tokens": 600}
        answer = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=300)
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
        assert usage["prompt_tokens"] > 3000 and usage["completion_tokens"] > 0
    finally:
        project.console("stop")


@pytest.mark.slow  # it starts an engine of its own
def test_requests_that_outgrow_the_pool_wait_for_room_and_end_whole(tmp_path: Path) -> None:
    """Four requests that together need more than the KV pool: llama-server alone ends
    every one in progress with "Context size has been exceeded" once the pool is full;
    the front sends each only when the pool has room for it, so all four end whole."""
    project = make_project(tmp_path / "rt", LLAMA_ENGINE="llama-server", LLAMA_PARALLEL="4",
                           LLAMA_N_CTX="512", LLAMA_KV_POOL="1024")  # fmt: skip
    try:
        started = project.console("start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "4 slots (LLAMA_PARALLEL) of up to 512 tokens each, sharing a KV pool of 1024" in (
            started.stdout
        )
        config = dict(line.split("=", 1) for line in (project.runtime / "config.env")
                      .read_text().splitlines() if line.startswith("LLAMA_SERVER_"))  # fmt: skip
        url = f"http://127.0.0.1:{config['LLAMA_SERVER_PORT'].strip(chr(34))}"
        headers = {"Authorization": f"Bearer {config['LLAMA_SERVER_API_KEY'].strip(chr(34))}"}
        # About 440 tokens each, 1,760 together: the pool holds two at once.
        body = {"model": default_model().name, "prompt": "word " * 40, "max_tokens": 400,
                "temperature": 0, "ignore_eos": True}  # fmt: skip

        async def four() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
                sent = [client.post("/v1/completions", json=body) for _ in range(4)]
                return await asyncio.gather(*sent)

        for answer in asyncio.run(four()):
            assert answer.status_code == 200, answer.text
            result = answer.json()
            assert result["choices"][0]["finish_reason"] == "length"
            assert result["usage"]["completion_tokens"] == 400
        engine_log = (project.runtime / "logs" / "engine.log").read_text()
        assert "the KV pool is full" in engine_log  # the operator is told they waited
    finally:
        project.console("stop")

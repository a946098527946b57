"""How many requests llama-server decodes at once (its slots), and the KV cache they
share, chosen from the machine when LLAMA_PARALLEL is 0 (the default).

On CPU, decoding several requests in one batch costs little more than decoding one, up to
a point that grows with the cores: on 2 cores, 16 slots made 1.9 times the tokens of 4
at 16 users, each request finishing sooner too (docs/performance.md). So `auto` is
SLOTS_PER_CORE slots a core, between MIN_SLOTS and MAX_SLOTS.

The slots share one KV pool (`--kv-unified`), each request using up to LLAMA_N_CTX of it
(`--kv-unified-per-slot`). The pool's size does not follow the slots: LLAMA_KV_POOL
tokens, or by default POOL_CONTEXTS contexts of LLAMA_N_CTX (fewer with fewer slots),
bounded to MEMORY_SHARE of the memory available (less the model) at the KV cache's cost
per token read from the model's header (`gguf.Shape`), never below one context. More
slots than the pool holds whole contexts is safe: the front sends a request only once
the pool has room for the most it may take (`engine/room.py`). LLAMA_N_CTX 0 keeps the
model's own context as the pool, shared by the slots, with no such bound.

A model with sliding-window layers (Gemma 2 and 3, among others) keeps them whole
(`--swa-full`), as the pool's size already counts them. Otherwise llama-server keeps only
the window's last tokens of those layers, and a conversation's next turn reuses its
cache only from a checkpoint taken before the end of the previous prompt: the previous
answer and the prompt's last tokens are computed again at every turn (figures:
docs/performance.md, "Multi-turn conversations").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from llamaserve.config import ConfigError, Settings
from llamaserve.engine.gguf import read_shape

SLOTS_PER_CORE = 8
MIN_SLOTS, MAX_SLOTS = 4, 32
POOL_CONTEXTS = 8  # contexts of LLAMA_N_CTX in the pool by default, whatever the slots
MEMORY_SHARE = 0.5  # of the memory available, less the model's file


@dataclass(frozen=True)
class Sizing:
    slots: int
    pool: int  # tokens of KV cache the slots share (-c); 0 = the model's own context
    per_slot: int  # tokens one request may use; 0 = the whole pool
    auto: bool  # chosen from the machine, not set
    full_windows: bool = False  # sliding-window layers keep every token (--swa-full)

    def describe(self) -> str:
        how = "chosen for this machine" if self.auto else "LLAMA_PARALLEL"
        if not self.pool:
            return f"{self.slots} slots ({how}) sharing the model's own context"
        return (
            f"{self.slots} slots ({how}) of up to {self.per_slot} tokens each, "
            f"sharing a KV pool of {self.pool} tokens"
        )


def auto_slots(cores: int) -> int:
    """The slots for a machine with this many cores."""
    return max(MIN_SLOTS, min(MAX_SLOTS, SLOTS_PER_CORE * cores))


def choose(
    parallel: int,
    n_ctx: int,
    *,
    pool: int = 0,
    cores: int,
    available: int | None,
    model_bytes: int,
    kv_bytes_per_token: int | None,
) -> Sizing:
    """The sizing for LLAMA_PARALLEL (`parallel`, 0 = auto), LLAMA_N_CTX and LLAMA_KV_POOL
    (`pool`, 0 = auto) on a machine with `cores` and `available` bytes of memory (None:
    unknown, not bounded)."""
    slots = parallel or auto_slots(cores)
    if not n_ctx:
        return Sizing(slots, 0, 0, auto=not parallel)
    if pool:
        if pool < n_ctx:
            raise ConfigError(
                f"LLAMA_KV_POOL={pool} cannot hold one request's context (LLAMA_N_CTX={n_ctx})"
            )
        return Sizing(slots, pool, n_ctx, auto=not parallel)
    pool = min(slots, POOL_CONTEXTS) * n_ctx  # more than all slots' contexts is of no use
    if available is not None and kv_bytes_per_token:
        budget = int((available - model_bytes) * MEMORY_SHARE) // kv_bytes_per_token
        pool = max(n_ctx, min(pool, budget))
    return Sizing(slots, pool, n_ctx, auto=not parallel)


def size_for(settings: Settings, model: Path) -> Sizing:
    """The sizing of llama-server on this machine, for this model."""
    shape = read_shape(model)
    try:
        model_bytes = model.stat().st_size
    except OSError:
        model_bytes = 0
    sizing = choose(
        settings.llama_parallel,
        settings.llama_n_ctx,
        pool=settings.llama_kv_pool,
        cores=os.cpu_count() or 1,
        available=memory_available(),
        model_bytes=model_bytes,
        kv_bytes_per_token=shape.kv_bytes_per_token if shape else None,
    )
    return replace(sizing, full_windows=bool(shape and shape.sliding_window))


def memory_available() -> int | None:
    """Bytes of memory available for new work (Linux's MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None

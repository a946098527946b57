"""What a GGUF model's header says of its shape: enough to size its KV cache.

A GGUF file (version 2 or 3) opens with its magic, version, tensor count and key-value
count, then the key-values, each a length-prefixed key, a type and a value (arrays
typed once, strings length-prefixed). Only the header is read, never the tensors.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# Scalar value types by their GGUF number: struct format and size.
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
STRING, ARRAY = 8, 9
KV_BYTES = 2  # an f16 cache cell, llama.cpp's default type for keys and values


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    key_length: int
    value_length: int
    context_length: int  # tokens the model was trained with
    sliding_window: int = 0  # tokens its sliding-window layers attend to; 0: it has none

    @property
    def kv_bytes_per_token(self) -> int:
        """The KV cache of one token, every layer counted in full (as llama-server keeps
        them: `engine/sizing.py`)."""
        return self.layers * self.kv_heads * (self.key_length + self.value_length) * KV_BYTES


def read_shape(path: Path) -> Shape | None:
    """The model's shape from its header; None if the header does not say it."""
    try:
        with path.open("rb") as f:
            values = _read_header(f)
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None
    arch = values.get("general.architecture")
    try:
        heads = int(values[f"{arch}.attention.head_count"])
        kv_heads = values.get(f"{arch}.attention.head_count_kv", heads)
        head_length = int(values[f"{arch}.embedding_length"]) // heads
        return Shape(
            layers=int(values[f"{arch}.block_count"]),
            kv_heads=int(kv_heads if not isinstance(kv_heads, list) else max(kv_heads)),
            key_length=int(values.get(f"{arch}.attention.key_length", head_length)),
            value_length=int(values.get(f"{arch}.attention.value_length", head_length)),
            context_length=int(values.get(f"{arch}.context_length", 0)),
            sliding_window=int(values.get(f"{arch}.attention.sliding_window", 0)),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _read_header(f: IO[bytes]) -> dict[str, Any]:
    if f.read(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    (version,) = struct.unpack("<I", f.read(4))
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}")
    _tensors, count = struct.unpack("<QQ", f.read(16))
    values: dict[str, Any] = {}
    for _ in range(count):
        key = _string(f)
        (kind,) = struct.unpack("<I", f.read(4))
        values[key] = _value(f, kind)
    return values


def _value(f: IO[bytes], kind: int) -> Any:
    if kind == STRING:
        return _string(f)
    if kind == ARRAY:
        item, length = struct.unpack("<IQ", f.read(12))
        if item in SCALARS:  # read at once: a vocabulary's scores are 256k floats
            fmt = SCALARS[item]
            size = struct.calcsize(fmt)
            return list(struct.unpack(f"<{length}{fmt[1]}", f.read(size * length)))
        return [_value(f, item) for _ in range(length)]
    if kind not in SCALARS:
        raise ValueError(f"GGUF value type {kind}")
    fmt = SCALARS[kind]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _string(f: IO[bytes]) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    return f.read(length).decode("utf-8", errors="replace")

"""Finding the one GGUF model to serve, and refusing files that are not GGUF."""

from __future__ import annotations

import re
from pathlib import Path

from llamaserve.config import ConfigError, Layout, Settings

GGUF_MAGIC = b"GGUF"
# Split models ship as name-00001-of-00003.gguf ...; llama.cpp loads them from the first shard.
_LATER_SHARD = re.compile(r"-(?!00001-)\d{5}-of-\d{5}\.gguf$")


def find_models(models_dir: Path) -> list[Path]:
    """The loadable .gguf files of a directory (one entry per split model)."""
    if not models_dir.is_dir():
        return []
    return sorted(p for p in models_dir.glob("*.gguf") if not _LATER_SHARD.search(p.name))


def resolve_model(settings: Settings, layout: Layout) -> Path:
    """The model file to serve, or a ConfigError saying in one line what is wrong."""
    if settings.llama_model:
        path = Path(settings.llama_model)
        path = path if path.is_absolute() else layout.models / path
        if not path.is_file():
            raise ConfigError(f"LLAMA_MODEL={settings.llama_model}: no such file ({path})")
    else:
        models = find_models(layout.models)
        if not models:
            raise ConfigError(
                f"no model: {layout.models} holds no .gguf file "
                "(run ./runtime/install.sh for the default model, or copy a GGUF file there)"
            )
        if len(models) > 1:
            names = ", ".join(p.name for p in models)
            raise ConfigError(
                f"several models in {layout.models} ({names}): "
                "set LLAMA_MODEL in runtime/config.env to the one to serve"
            )
        path = models[0]
    check_gguf(path)
    return path


def check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ConfigError(f"{path} is not a GGUF file (it does not begin with the GGUF magic)")


def model_created(path: Path) -> int:
    """The model's `created` in OpenAI's model list: its file's modification time, the
    same on every call and on both engines."""
    return int(path.stat().st_mtime)

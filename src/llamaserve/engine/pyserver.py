"""Runs llama-cpp-python's `llama_cpp.server` for one model, mended by CompatMiddleware.

This module is the engine process itself (`llamaserve serve-engine`): it imports
llama_cpp, so nothing else in the package imports it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from llamaserve.config import Settings
from llamaserve.engine.bridge import ApiBridge
from llamaserve.engine.compat import CompatMiddleware, current_usage
from llamaserve.engine.models import model_created


def _add_missing_request_fields() -> None:
    """Let `typical_p` reach the engine: the server's request models drop it.

    Must run before llama_cpp.server.app is imported, which binds the models by name.
    """
    if "llama_cpp.server.app" in sys.modules:
        raise RuntimeError(
            "llama_cpp.server.app was imported before its request models were mended"
        )
    types: Any = importlib.import_module("llama_cpp.server.types")
    typical_p_field = Field(default=1.0, ge=0.0, le=1.0, description="Locally typical sampling.")

    class CreateChatCompletionRequest(types.CreateChatCompletionRequest):  # type: ignore[misc]
        typical_p: float = typical_p_field

    class CreateCompletionRequest(types.CreateCompletionRequest):  # type: ignore[misc]
        typical_p: float = typical_p_field

    types.CreateChatCompletionRequest = CreateChatCompletionRequest
    types.CreateCompletionRequest = CreateCompletionRequest


def _meter(llama: Any) -> None:
    """Count prompt and generated tokens of every generation into the request's Usage,
    and end the generation once its client has gone (`Usage.stopped`).

    The count mirrors llama-cpp-python's own non-streamed usage: every sampled token
    but the end-of-generation one.
    """
    import llama_cpp

    generate: Callable[..., Iterator[int]] = llama.generate
    vocab = llama._model.vocab

    def metered_generate(tokens: Any, *args: Any, **kwargs: Any) -> Iterator[int]:
        usage = current_usage.get()
        if usage is not None:
            usage.prompt_tokens += len(tokens)
        for token in generate(tokens, *args, **kwargs):
            if usage is not None and usage.stopped:
                return
            if usage is not None and not llama_cpp.llama_vocab_is_eog(vocab, token):
                usage.completion_tokens += 1
            yield token

    llama.generate = metered_generate


def _prompt_counter(llama: Any) -> Callable[[str], int]:
    """The tokens llama_cpp's usage counts for a completion's prompt (without `suffix`),
    with the model's own tokenizer: the text's, after the BOS (or CLS) and before the EOS
    (or SEP) its vocabulary asks for, as `Llama._create_completion` builds them."""
    model = llama._model
    first = model.token_cls() if model.token_cls() != -1 else llama.token_bos()
    framing = int(model.add_bos_token() and first != -1)
    framing += int(model.add_eos_token() or model.token_sep() != -1)

    def count(prompt: str) -> int:
        text = prompt.encode("utf-8")
        return framing + (len(llama.tokenize(text, add_bos=False, special=True)) if text else 0)

    return count


def build_app(settings: Settings, model: Path) -> ApiBridge:
    """llama_cpp.server's app, mended (`compat`), with the Responses and Messages APIs."""
    _add_missing_request_fields()
    server_app: Any = importlib.import_module("llama_cpp.server.app")
    engine_settings = server_app.Settings(
        model=str(model),
        model_alias=model.name,
        host=settings.llama_server_host,
        port=settings.llama_server_port,
        api_key=settings.llama_server_api_key.get_secret_value(),
        # The default cuts off a running stream whenever another request arrives.
        interrupt_requests=False,
        n_ctx=settings.llama_n_ctx,
        n_threads=settings.threads(),
        n_threads_batch=settings.threads_batch(),
        n_gpu_layers=settings.llama_n_gpu_layers,
        chat_format=settings.llama_chat_format or None,
        verbose=False,
    )
    app = server_app.create_app(settings=engine_settings)
    llama = server_app._llama_proxy(model.name)
    _meter(llama)
    # After OpenAI's checks, as llama-server's front makes them (see compat), llama_cpp's own.
    schemas: dict[str, type[BaseModel]] = {
        "/v1/chat/completions": server_app.CreateChatCompletionRequest,
        "/v1/completions": server_app.CreateCompletionRequest,
    }
    front = CompatMiddleware(
        app,
        api_key=settings.llama_server_api_key,
        model_id=model.name,
        created=model_created(model),
        prompt_tokens=_prompt_counter(llama),
        schemas=schemas,
        fold_system=settings.llama_chat_format == "gemma",  # llama_cpp's drops system turns
    )
    return ApiBridge(front, api_key=settings.llama_server_api_key, model_id=model.name)


def serve(settings: Settings, model: Path) -> None:
    from sse_starlette.sse import AppStatus

    from llamaserve.engine import serving

    # sse_starlette ends every stream as soon as uvicorn begins to stop, cut without an
    # error event; the stop's grace decides instead (see http/stopping.py).
    AppStatus.enable_automatic_graceful_drain = False
    app = build_app(settings, model)
    print(
        f"llamaserve engine: llama-cpp-python, model {model.name}, "
        f"threads {settings.threads()}/{settings.threads_batch()}, ctx {settings.llama_n_ctx}",
        flush=True,
    )
    serving.serve(
        app,
        host=settings.llama_server_host,
        port=settings.llama_server_port,
        grace=settings.stop_grace(),
        header_timeout=settings.llama_header_timeout,
    ).run()

"""`python -m bench.fuzz`: fuzz Llamaserve with OpenAI's own OpenAPI description.

schemathesis generates requests from OpenAI's description of its API (read where it
lies, `../shared/data/openai-openapi/openapi.yaml`, MIT; never copied into the project),
reduced to the eight of its operations Llamaserve serves: GET /v1/models, GET
/v1/models/{model}, POST /v1/chat/completions, /v1/completions, /v1/embeddings and
/v1/responses, GET and DELETE /v1/responses/{response_id}. It sends valid and invalid
ones (its examples, coverage and fuzzing phases) to one target, and checks each answer:

- not_a_server_error: no 5xx, whatever the request;
- content_type_conformance, response_schema_conformance: an answer the description
  describes (a 200) has its content type and its schema (not deleteResponse's 404,
  which it describes as a bare error object: OpenAI sends its envelope);
- ignored_auth: a request without a valid key is refused;
- error_envelope (ours): every 4xx and 5xx is OpenAI's envelope, `{"error": {...}}`
  with exactly `message`, `type`, `param` and `code`.

It does not check that every status is one the description lists (it lists 200 only,
so every 400 and 404 would count), nor that invalid requests are refused and valid ones
taken (OpenAI's schema is not Llamaserve's: `n` > 1, images, embeddings and tools other
than functions are refused on purpose). Nor can it check a stream, the few times it asks
for one: schemathesis checks each server-sent event against the schema OpenAI gives for
its data, so a streamed answer fails response_schema_conformance (a streamed completion
content_type_conformance too: its 200 is described as JSON only); the streams' events are
checked against the description by tests/engine/test_openapi_answers.py.

Targets: `gateway` (with a user's key, in front of `--engine`), `llama-server` and
`llama-cpp-python` (each alone, with the engine's key), started as the benchmark starts
them (bench/stack.py: a temporary runtime, a private PostgreSQL, `console.sh start`,
everything stopped at the end), with the default model; or `--url`, a server already
running, whose key is in the environment variable FUZZ_API_KEY.

Every generation is bounded: before each request is sent, `max_tokens` and
`max_completion_tokens` (a Responses request's `max_output_tokens`) above `--max-tokens`
(or null, or all absent) become `--max-tokens`, and a request that names a model (any
string) names the served one, or nearly every request would be a 404, as does a
Responses request that names none (its description makes `model` optional, but the
engines need it); every other request for GET /v1/models/{model} names it too, and
every other one for a stored response names the last response created and stored, if
any (the gateway stores them; the engine alone keeps none, and answers 404 naming the
gateway).

Output: schemathesis's report on the terminal (each failure with a curl command that
reproduces it, shrunk as far as the time allowed), and in `--out`/fuzz-TARGET-TIME/ its
JSON summary (report.json), every request and answer (requests.har), its JUnit report,
the stack's logs, and figures.json: requests sent, their statuses, the server errors
(the shortest request of each kind), the failures by check. Exit status: schemathesis's,
1 when it found any failure.

    python -m bench.fuzz --target gateway|llama-server|llama-cpp-python --max-examples 50
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx

from bench.progress import say
from bench.stack import ROOT, BenchError, Stack, guarded, take_environment

SPEC = ROOT.parent / "shared" / "data" / "openai-openapi" / "openapi.yaml"
OPERATIONS = ("listModels", "retrieveModel", "createChatCompletion", "createCompletion",
              "createEmbedding", "createResponse", "getResponse", "deleteResponse")  # fmt: skip
TARGETS = ("gateway", "llama-server", "llama-cpp-python")
ENVELOPE = {"message", "type", "param", "code"}  # OpenAI's error object
# The keys are hidden in the reports (schemathesis would hide every field named like a
# secret: `max_tokens` too, and the reproducers with it); no cache in the working directory.
# The checks run are named here, not with --checks, which would override the operation's;
# `error_envelope` is ours.
CONFIG = """[output.sanitization]
keys-to-sanitize = ["authorization", "cookie", "set-cookie", "proxy-authorization"]
sensitive-markers = ["authorization"]

[cache]
enabled = false

[checks]
enabled = false
not_a_server_error.enabled = true
content_type_conformance.enabled = true
response_schema_conformance.enabled = true
ignored_auth.enabled = true
error_envelope.enabled = true

# The description says deleteResponse's 404 is OpenAI's bare error object (`Error`), but
# OpenAI answers it in its envelope, as every other error (error_envelope checks it);
# its 200 has no schema, so there is nothing else to check.
[[operations]]
include-operation-id = "deleteResponse"
checks.response_schema_conformance.enabled = false
"""
# The description's paths (after /v1) that generate, and the fields that bound each.
GENERATION = {
    "/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/completions": ("max_tokens", "max_completion_tokens"),
    "/responses": ("max_output_tokens",),
}
RESPONSES, STORED = "/responses", "/responses/{response_id}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz", description=__doc__.split("\n")[0]
    )
    add = parser.add_argument
    add("--target", choices=TARGETS, default="gateway")
    add("--engine", choices=TARGETS[1:], default="llama-server", help="behind the gateway")
    add("--url", help="fuzz this running server instead (its key: FUZZ_API_KEY)")
    add("--max-examples", type=int, default=50, help="per route and phase (default 50)")
    add("--max-time", type=int, default=480, help="seconds, the start aside (default 480)")
    add("--max-tokens", type=int, default=8, help="what one request generates (default 8)")
    add("--seed", type=int, default=1, help="schemathesis's seed (default 1)")
    add("--spec", type=Path, default=SPEC, help=f"the description (default {SPEC})")
    add("--out", type=Path, default=ROOT / "bench" / "results", help="default bench/results")
    add("--keep", action="store_true", help="keep the stack's runtime directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.spec.is_file():
        print(f"fuzz: error: no OpenAPI description at {args.spec}", file=sys.stderr)
        return 1
    name = "url" if args.url else args.target
    out = args.out / f"fuzz-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.url:
        return guarded(
            "fuzz", lambda: fuzz(args, args.url, os.environ.get("FUZZ_API_KEY", ""), out)
        )
    return guarded("fuzz", lambda: _with_stack(args, out))


def _with_stack(args: argparse.Namespace, out: Path) -> int:
    """Start what the target needs, fuzz it, stop it (its logs go to `out`)."""
    engine = args.engine if args.target == "gateway" else args.target
    say(f"setting up a private stack: {engine}" + (" behind the gateway" * (engine != args.target)))
    stack = Stack.create(take_environment())
    try:
        if args.target != "gateway":
            stack.write_config(LLAMA_PROXY_ENABLED="0")  # the engine alone
        stack.start(engine, parallel=1)
        if args.target == "gateway":
            return fuzz(args, stack.gateway_url, stack.create_user("fuzz"), out)
        return fuzz(args, stack.engine_url, stack.engine_key, out)
    finally:
        say(f"stopping the stack; its logs go to {out / 'logs'}")
        stack.destroy(keep=args.keep, logs_to=out / "logs")
        if args.keep:
            say(f"kept {stack.base}")


def fuzz(args: argparse.Namespace, url: str, key: str, out: Path) -> int:
    """Run schemathesis against `url`; write and print the figures. Its exit code."""
    model = served_model(url, key)
    say(f"fuzzing {url} (model {model}), at most {args.max_time} s")
    out.mkdir(parents=True, exist_ok=True)
    with bounded_requests(model, args.max_tokens):
        code = run_schemathesis(args, url, key, out)
    figures = summarise(out)
    (out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(table(figures))
    say(f"written: {os.path.relpath(out)}")
    return code


def served_model(url: str, key: str) -> str:
    answer = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    if answer.status_code != 200:
        raise BenchError(f"GET {url}/v1/models answered {answer.status_code}: {answer.text[:300]}")
    return str(answer.json()["data"][0]["id"])


@contextmanager
def bounded_requests(model: str, max_tokens: int) -> Iterator[None]:
    """While it lasts, every request is bounded before it is sent, and every other one
    names what is served (see the docstring)."""
    import schemathesis
    from schemathesis import hooks
    from schemathesis.checks import CHECKS as registry

    calls: dict[str, int] = {}  # requests sent so far, by path
    stored: list[str] = []  # the ids of the responses created and stored

    def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
        path = case.operation.path
        calls[path] = calls.get(path, 0) + 1
        every_other = calls[path] % 2 == 1
        named = case.path_parameters if isinstance(case.path_parameters, dict) else {}
        if every_other and path == "/models/{model}":
            named["model"] = model
        elif every_other and path == STORED and stored:
            named["response_id"] = stored[-1]
        body = case.body if isinstance(case.body, dict) else None
        if body is not None and path == RESPONSES:
            body.setdefault("model", model)  # optional in the description, not here
        if body is not None and path in GENERATION:
            bound_body(body, model, max_tokens, GENERATION[path])
        elif body is not None and isinstance(body.get("model"), str):
            body["model"] = model

    def after_call(context: Any, case: Any, response: Any) -> None:
        if case.operation.path == RESPONSES and response.status_code == 200:
            created = _json(response)
            if isinstance(created, dict) and created.get("store") is True:
                stored.append(str(created["id"]))

    schemathesis.hook(before_call)
    schemathesis.hook(after_call)
    schemathesis.check(error_envelope)
    try:
        yield
    finally:
        hooks.unregister(before_call)
        hooks.unregister(after_call)
        registry.unregister(error_envelope.__name__)


def bound_body(body: dict[str, Any], model: str, max_tokens: int, lengths: tuple[str, ...]) -> None:
    if isinstance(body.get("model"), str):
        body["model"] = model
    for name in lengths:
        value = body.get(name, 0)
        if value is None or (type(value) is int and value > max_tokens):
            body[name] = max_tokens
    if not any(name in body for name in lengths):
        body[lengths[0]] = max_tokens


def error_envelope(ctx: Any, response: Any, case: Any) -> None:
    """A check: an error answer (4xx, 5xx) is OpenAI's envelope, `{"error": {...}}` with
    a message, a type, a param and a code."""
    if response.status_code < 400:
        return
    body = _json(response)
    error = body.get("error") if isinstance(body, dict) else None
    if not (
        isinstance(error, dict)
        and set(body) == {"error"}
        and set(error) == ENVELOPE
        and isinstance(error["message"], str)
        and isinstance(error["type"], str)
    ):
        raise AssertionError(
            f"A {response.status_code} answer is not OpenAI's error envelope: {response.text[:300]}"
        )


def _json(response: Any) -> Any:
    """A whole JSON answer's body (None for a stream or anything else)."""
    try:
        return response.json()
    except ValueError:
        return None


def run_schemathesis(args: argparse.Namespace, url: str, key: str, out: Path) -> int:
    """schemathesis's own command line, in this process (so that the hook applies)."""
    from schemathesis.cli import schemathesis as command

    config = out / "schemathesis.toml"
    config.write_text(CONFIG)
    argv = [
        "--config-file", str(config),
        "run", str(args.spec), "--url", f"{url}/v1", "--header", f"Authorization: Bearer {key}",
        *[arg for op in OPERATIONS for arg in ("--include-operation-id", op)],
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(args.max_examples), "--max-time", str(args.max_time),
        "--seed", str(args.seed), "--workers", "1", "--request-timeout", "120",
        "--generation-database", "none", "--suppress-health-check", "all", "--no-color",
        "--report", "json,har,junit", "--report-json-path", str(out / "report.json"),
        "--report-har-path", str(out / "requests.har"),
        "--report-junit-path", str(out / "junit.xml"),
    ]  # fmt: skip
    try:
        command.main(argv, prog_name="schemathesis", standalone_mode=False)
        return 0
    except SystemExit as exit:
        return int(exit.code or 0)
    finally:
        # schemathesis leaves each report file it checked open (cli/ext/fs.py, open_file):
        # closed now, not whenever a later collection finds them.
        gc.collect()


def summarise(out: Path) -> dict[str, Any]:
    """The run's figures, from the reports schemathesis wrote."""
    report = _read_json(out / "report.json") if (out / "report.json").exists() else {}
    entries = _har_entries(out)
    errors = [entry for entry in entries if entry["response"]["status"] >= 500]
    return {
        "requests": len(entries),
        "unanswered": sum(1 for entry in entries if entry["response"]["status"] == 0),
        "statuses": _count(str(entry["response"]["status"]) for entry in entries),
        "test_cases": report.get("test_cases"),
        "server_errors": len(errors),
        "server_error_kinds": _shortest_by_kind(errors),
        "failures": report.get("failures", []),
        "errors": report.get("errors", []),
        "reproducers": _reproducers(out),
    }


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _har_entries(out: Path) -> list[dict[str, Any]]:
    return [e for path in out.glob("*.har") for e in _read_json(path)["log"]["entries"]]


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def _shortest_by_kind(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The shortest request of each kind (route, status, error message) among the 5xx,
    and how many there were of that kind."""
    kinds: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for entry in errors:
        request, response = entry["request"], entry["response"]
        answer = response["content"].get("text") or ""
        route = request["method"] + " " + request["url"].split("/v1", 1)[-1].split("?")[0]
        kind = (route.split("/models/")[0], str(response["status"]), _message(answer))
        body = (request.get("postData") or {}).get("text", "")
        sent = {h["name"].lower(): h["value"] for h in request["headers"]}.get("content-type")
        found = {"request": route, "content_type": sent, "body": body,
                 "status": response["status"], "answer": answer}  # fmt: skip
        kinds.setdefault(kind, []).append(found)
    return [
        {**min(same, key=lambda found: len(found["request"]) + len(found["body"])),
         "count": len(same)}
        for same in kinds.values()
    ]  # fmt: skip


def _message(answer: str) -> str:
    try:
        return str(json.loads(answer)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return answer[:200]


def _reproducers(out: Path) -> list[str]:
    """The failures as schemathesis reported them (with curl), from its JUnit report."""
    found = []
    for path in out.glob("*.xml"):
        for failure in ElementTree.parse(path).iter("failure"):
            found.append(failure.text or failure.get("message", ""))
    return found


def table(figures: dict[str, Any]) -> str:
    lines = [
        f"requests sent:   {figures['requests']} (no answer: {figures['unanswered']})",
        f"statuses:        {figures['statuses']}",
        f"server errors:   {figures['server_errors']}",
    ]
    for kind in figures["server_error_kinds"]:
        sent = f"(Content-Type: {kind['content_type']}) " if kind["content_type"] else ""
        lines.append(
            f"  {kind['count']} x {kind['status']} {kind['request']} {sent}{kind['body'][:300]}"
        )
        lines.append(f"      -> {kind['answer'][:200]}")
    lines.append("failures by check:")
    for failure in figures["failures"]:
        lines.append(f"  {failure['count']} x {failure['title']}: {failure['operations']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""OpenAI's own OpenAPI description, to check answers against its schemas.

The file lives beside the checkout (../shared/data/openai-openapi/openapi.yaml, from
openai/openai-openapi) and is read at test time, never copied here: a test that needs it
is skipped when it is absent. Its schemas mix OpenAPI 3.0's `nullable` into 3.1's JSON
Schema, which ignores the keyword: here it means "or null", as OpenAI means it.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from tests.conftest import ROOT

SPEC = ROOT.parent / "shared" / "data" / "openai-openapi" / "openapi.yaml"
URI = "urn:openai:openapi.yaml"


class OpenAPI:
    """The description's component schemas, by name."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self._schemas: dict[str, Any] = spec["components"]["schemas"]
        self._registry = Registry().with_resource(URI, DRAFT202012.create_resource(spec))

    def check(self, name: str, instance: Any) -> None:
        """Fail with every place where `instance` is not a valid `name`."""
        schema = {"$ref": f"{URI}#/components/schemas/{name}"}
        errors = Draft202012Validator(schema, registry=self._registry).iter_errors(instance)
        found = [f"{name} at /{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
        assert not found, "\n".join(message[:300] for message in found)

    def member(self, union: str, kind: str) -> str:
        """The schema of a union (`ResponseStreamEvent`) whose `type` is `kind`: checked
        against it, an event that fails says where, not only that no member took it."""
        for choice in self._schemas[union]["anyOf"]:
            name = choice["$ref"].rsplit("/", 1)[-1]
            kinds = self._schemas[name].get("properties", {}).get("type", {}).get("enum", [])
            if kind in kinds:
                return str(name)
        raise AssertionError(f"{union} has no member of type {kind!r}")


@functools.cache
def openapi() -> OpenAPI:
    """OpenAI's description, read once; the test is skipped when the file is absent."""
    if not SPEC.is_file():
        pytest.skip(f"OpenAI's OpenAPI description is not at {SPEC}")
    return OpenAPI(_nullable(yaml.load(SPEC.read_text(), Loader=yaml.CSafeLoader)))


def _nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable(value) for key, value in node.items()}
    if node.get("nullable") is True:  # a keyword; a property named so would be a dict
        del node["nullable"]
        return {"anyOf": [node, {"type": "null"}]}
    return node

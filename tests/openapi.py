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

    def __init__(self, registry: Registry[Any]) -> None:
        self._registry = registry

    def check(self, name: str, instance: Any) -> None:
        """Fail with every place where `instance` is not a valid `name`."""
        schema = {"$ref": f"{URI}#/components/schemas/{name}"}
        errors = Draft202012Validator(schema, registry=self._registry).iter_errors(instance)
        found = [f"{name} at /{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
        assert not found, "\n".join(message[:300] for message in found)


@functools.cache
def openapi() -> OpenAPI:
    """OpenAI's description, read once; the test is skipped when the file is absent."""
    if not SPEC.is_file():
        pytest.skip(f"OpenAI's OpenAPI description is not at {SPEC}")
    spec = _nullable(yaml.load(SPEC.read_text(), Loader=yaml.CSafeLoader))
    return OpenAPI(Registry().with_resource(URI, DRAFT202012.create_resource(spec)))


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

"""GET /openapi.json (api/openapi.py): a valid OpenAPI 3.1 document that lists exactly the routes the app
serves, with the auth rules the app applies, served without a token. The live property-based test of the
API against it is tests/e2e/test_openapi_live.py (slow suite)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31  # the OpenAPI Initiative's 3.1 schema

from kawai import engine
from kawai.api import errors
from kawai.api.app import GRANTS, build_routes
from kawai.api.auth import PUBLIC
from kawai.api.errors import ApiError, error_body
from kawai.api.openapi import ErrorDetail, OpenAIErrorDetail, openapi_document
from kawai.api.routes_openai import ERROR_KINDS, error_fields
from api_harness import live_server
from tiny_models import write_tiny_model

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def document() -> dict:
    return openapi_document()


def operations(document: dict) -> dict[tuple[str, str], dict]:
    return {(path, method.upper()): op for path, item in document["paths"].items()
            for method, op in item.items() if method in METHODS}


def served_routes() -> dict[tuple[str, str], str]:
    """(path, method) -> route name, of what the app's router serves (HEAD is implied by GET)."""
    return {(r.path, m): r.name for r in build_routes() for m in r.methods if m != "HEAD"}


def refs(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_the_document_is_valid_openapi_3_1(document):
    jsonschema.Draft202012Validator(OPENAPI_31).validate(document)
    assert document["openapi"].startswith("3.1.")
    for name, schema in document["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)  # each one a valid JSON Schema 2020-12
    for ref in refs(document):  # every $ref points into the document
        node = document
        for part in ref.removeprefix("#/").split("/"):
            assert part in node, ref
            node = node[part]
    json.dumps(document)  # plain JSON


def test_the_document_lists_exactly_the_served_routes(document):
    assert set(operations(document)) == set(served_routes())


def test_open_routes_in_the_document_are_the_open_routes_of_the_app(document):
    """An operation with `security: []` is open; every other needs a token (x-api-key or Bearer)."""
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "x-api-key"}
    assert schemes["Bearer"]["type"] == "http" and schemes["Bearer"]["scheme"] == "bearer"
    assert document["security"] == [{"ApiKey": []}, {"Bearer": []}]
    routes = served_routes()
    for key, op in operations(document).items():
        assert (op.get("security") == []) == (GRANTS[routes[key]] == PUBLIC), key


def test_error_shapes_are_the_ones_the_server_sends(document):
    assert set(ErrorDetail.model_fields["type"].annotation.__args__) == set(errors.ERROR_TYPES.values())
    assert set(OpenAIErrorDetail.model_fields["type"].annotation.__args__) == (
        {kind for kind, _ in ERROR_KINDS.values()} | {"server_error"})

    def valid(name: str, value) -> None:  # the refs are relative to the document's root
        root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        jsonschema.Draft202012Validator(root).validate(value)

    for status, error_type in errors.ERROR_TYPES.items():
        valid("ErrorResponse", error_body(error_type, "m", "req_1"))
        valid("OpenAIErrorResponse", {"error": error_fields(status, "m")})
        for path, item in document["paths"].items():  # a documented status answers with the error schema
            for op in item.values():
                response = op["responses"].get(str(status))
                if response is not None and path not in ("/health",):
                    schema = response["content"]["application/json"]["schema"]["$ref"]
                    assert schema.endswith("ErrorResponse"), (path, status)
    assert error_body(ApiError("x").error_type, "x", None)["request_id"] is None


def test_the_document_is_served_without_a_token(tmp_path, document):
    llm = engine.load(write_tiny_model(tmp_path, "qwen2", n_ctx=128), threads=1)
    with live_server(tmp_path / "home", [llm]) as server:  # auth on
        r = httpx.get(server.url + "/openapi.json", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.json() == document
        assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401

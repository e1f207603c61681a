"""Property-based tests of the served API against its own OpenAPI document (schemathesis), slow suite.

A real uvicorn server on loopback serves a tiny model with auth on; the document it serves at GET
/openapi.json is api/openapi.py's (checked first; schemathesis' lazy fixture loader does not run on pytest 9,
so the operations are collected from the same document built in-process), and for every operation
schemathesis sends requests generated from the document (valid ones and invalid
ones: wrong types, missing fields, out-of-range numbers, wrong methods, no token) and checks each answer:
- no 5xx (`not_a_server_error`);
- the status, content type, headers and body are the ones the document declares for that operation
  (`status_code_conformance`, `content_type_conformance`, `response_headers_conformance`,
  `response_schema_conformance`): every 4xx is therefore an Anthropic-shaped error (OpenAI's under
  /v1/chat/), with a `request-id` header;
- a request without a token is refused (`ignored_auth`), a wrong method is a 405 with `allow`.
Left out, on purpose: `negative_data_rejection` (the server ignores unknown fields and turns block types
a local model cannot run into text, api/blocks.py, so some requests outside the document are accepted)
and `positive_data_acceptance` (a valid request can still be refused: max_tokens past the tiny model's
256-token context).
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi import checks as openapi_checks

from kawai import engine
from kawai.api.openapi import openapi_document
from api_harness import live_server, make_tokens
from tiny_models import write_tiny_model

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 100


schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def token_and_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    llm = engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=256), threads=1)
    token = make_tokens(home).all
    with live_server(home, [llm]) as server:
        assert httpx.get(server.url + "/openapi.json", timeout=30).json() == openapi_document()
        yield token, server


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_every_answer_follows_the_document(case, token_and_server):
    token, server = token_and_server
    case.call_and_validate(
        base_url=server.url,
        headers={"x-api-key": token},
        timeout=60,
        excluded_checks=[openapi_checks.negative_data_rejection, openapi_checks.positive_data_acceptance],
    )

"""Thinking through the official SDK against a real server: budget_tokens closes the <think> block and
the answer follows; without thinking enabled no thinking is shown; display "omitted" sends empty,
signed blocks. A tiny random-weight model whose vocabulary has <think> / </think> (as Qwen3's does): it
never closes a block by itself, so a block that ends was ended by the budget. The reply is opened inside
a block with an assistant prefill, as a template with thinking on does.
"""

from __future__ import annotations

import anthropic
import pytest

from kawai import engine
from api_harness import home, live_server, tokens  # noqa: F401 (fixtures)
from tiny_models import write_tiny_model

MODEL = "tiny-qwen2-f32"
OPEN_THINK = [{"role": "user", "content": "Think, then answer."}, {"role": "assistant", "content": "<think>\n"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=512), threads=1)


@pytest.fixture(scope="module")
def client(llm, home, tokens):
    with live_server(home, [llm]) as s:
        yield anthropic.Anthropic(base_url=s.url, api_key=tokens.all, max_retries=0, timeout=60)


def create(client, **kw):
    return client.messages.create(model=MODEL, max_tokens=40, extra_body={"temperature": 0}, messages=OPEN_THINK, **kw)


def test_budget_tokens_closes_the_block_and_the_answer_follows(client, llm):
    unlimited = create(client, thinking={"type": "enabled", "budget_tokens": 1000})
    assert [b.type for b in unlimited.content] == ["thinking"]  # the model alone never closes it
    budget = 5
    limited = create(client, thinking={"type": "enabled", "budget_tokens": budget})
    assert [b.type for b in limited.content] == ["thinking", "text"] and limited.stop_reason == "max_tokens"
    thought = limited.content[0].thinking
    assert unlimited.content[0].thinking.startswith(thought)  # the same greedy tokens, cut at the budget
    assert len(thought) < len(unlimited.content[0].thinking)
    shorter = create(client, thinking={"type": "enabled", "budget_tokens": 2}).content[0].thinking
    assert thought.startswith(shorter) and len(shorter) < len(thought)
    assert "</think>" not in limited.content[1].text


def test_the_budget_holds_when_streamed(client):
    with client.messages.stream(model=MODEL, max_tokens=40, extra_body={"temperature": 0}, messages=OPEN_THINK,
                                thinking={"type": "enabled", "budget_tokens": 5}) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == create(client, thinking={"type": "enabled", "budget_tokens": 5}).content[0].thinking


def test_thinking_not_enabled_is_never_shown(client):
    reply = create(client)
    assert all(b.type == "text" for b in reply.content)
    assert all("<think>" not in b.text and "</think>" not in b.text for b in reply.content)


def test_display_omitted_sends_empty_signed_blocks(client):
    thinking = {"type": "enabled", "budget_tokens": 5, "display": "omitted"}
    with client.messages.stream(model=MODEL, max_tokens=40, extra_body={"temperature": 0}, messages=OPEN_THINK,
                                thinking=thinking) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "thinking_delta" not in kinds and "signature_delta" in kinds
    block = final.content[0]
    assert block.type == "thinking" and block.thinking == "" and block.signature
    assert final.content[1].type == "text"

"""Building a prompt costs O(1) per content block (api/prompt.py): a request of 32 MB may hold ~300,000
text blocks in one message (api/limits.MAX_JSON_VALUES allows it), so anything quadratic in the block
count holds a prompt-building thread for hours. CPU time of 8x the blocks against 1x (linear: ~8)."""

from __future__ import annotations

import time

import pytest

from kawai import engine
from kawai.api.errors import InvalidRequestError
from kawai.api.prompt import build_prompt
from kawai.api.wire import CountTokensRequest, parse_request
from tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=256), threads=1)


def build_seconds(llm, n: int) -> float:
    req = parse_request(CountTokensRequest, {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "w" * 90}] * n}]})
    t0 = time.thread_time()
    with pytest.raises(InvalidRequestError, match="prompt is too long"):  # 256-token context
        build_prompt(llm, req)
    return time.thread_time() - t0


def test_many_text_blocks_in_one_message_build_in_linear_time(tiny_llm):
    small = min(build_seconds(tiny_llm, 2000) for _ in range(3))
    large = build_seconds(tiny_llm, 16000)
    assert large < 20 * max(small, 5e-3), f"2000 blocks: {small:.3f} s, 16000 blocks: {large:.3f} s"

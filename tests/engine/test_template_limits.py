"""A malicious GGUF's chat template cannot get past the render bounds (engine/chat_template.py): time is
checked on every call, filter and operation (not only in `for` loops), and formats that would allocate
past the size cap are refused before they run. Memory is the process's peak RSS, reset before each
render (Linux clear_refs)."""

from __future__ import annotations

import time

import pytest

from kawai.engine.chat_template import ChatTemplate, TemplateLimitError
from costs import peak_rss_growth

MB = 1024 * 1024
MESSAGES = [{"role": "user", "content": "x"}]


def test_a_recursive_macro_without_loops_is_timed():
    """2^22 macro calls, no `for` and no output: only the per-call check can stop it."""
    template = ChatTemplate(
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(22) }}",
        max_loop_iterations=10**12,
        max_render_seconds=0.2,
    )
    start = time.monotonic()
    with pytest.raises(TemplateLimitError, match="too long"):
        template.render(MESSAGES)
    assert time.monotonic() - start < 5


def test_calls_count_against_the_iteration_bound():
    template = ChatTemplate("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                            "{{ f(22) }}", max_loop_iterations=10_000, max_render_seconds=600)
    with pytest.raises(TemplateLimitError, match="iterations"):
        template.render(MESSAGES)


@pytest.mark.parametrize(
    "source",
    [
        "{{ '%400000000s' % 'x' }}",  # a constant: Jinja folds it when it compiles the template
        "{{ '%400000000s' % messages[0].content }}",
        "{{ '%.400000000f' % messages|length }}",
        "{{ '%(a)400000000s' % {'a': messages[0].content} }}",
        "{{ '%400000000s'|format('x') }}",
        "{{ '{:>400000000}'.format('x') }}",
        "{{ '{0:0400000000}'.format(1) }}",
        "{% set lines = ('a\n' * 20000) %}{{ lines|indent(100000) }}",
        "{% set s = 'x' * 4000000 %}{{ [s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s,"
        " s, s, s, s, s, s, s, s, s, s, s, s]|join }}",
        "{% set s = 'x' * 4000000 %}{{ ([s] * 100)|join(',') }}",
    ],
)
def test_formats_past_the_cap_are_refused_before_allocating(source):
    grew = peak_rss_growth(lambda: pytest.raises(TemplateLimitError, lambda: ChatTemplate(source).render(MESSAGES)))
    assert grew < 100 * MB, f"peak RSS grew by {grew / MB:.0f} MB"


def test_ordinary_formats_still_work():
    source = ("{{ '%s-%05d' % ('a', 7) }} {{ '%.2f'|format(1.5) }} {{ '{:>6}'.format('b') }} "
              "{{ 'l1\nl2'|indent(2) }} {{ ['x', 'y']|join(', ') }} {{ 7 % 3 }}")
    assert ChatTemplate(source).render(MESSAGES) == "a-00007 1.50      b l1\n  l2 x, y 1"


def test_a_template_error_shows_no_exception_text_to_the_client(tmp_path, caplog):
    """A template whose code raises (here a TypeError): the 400 says the template failed; the Python
    error text is in the server log, with the request id."""
    import httpx

    from kawai import engine
    from kawai.api.app import create_app
    from kawai.api.state import ServerSettings
    from api_harness import LiveServer
    from tiny_models import write_tiny_model

    source = "{{ messages[0].content + 1 }}"
    llm = engine.load(write_tiny_model(tmp_path, "qwen2", n_ctx=128, chat_template=source), threads=1)
    with LiveServer(create_app(ServerSettings(home=tmp_path, auth=False), [llm])) as server:
        r = httpx.post(server.url + "/v1/messages", timeout=60, json={
            "model": llm.id, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    message = r.json()["error"]["message"]
    assert "chat template" in message and "TypeError" not in message and "concatenate" not in message
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "kawai.prompt"]
    assert any(r.headers["request-id"] in m and "TypeError" in m for m in logged), logged

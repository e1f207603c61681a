"""engine/chat_template.py against transformers' `apply_chat_template` (the oracle), and its sandbox bounds.

Templates: Qwen2.5's and SmolLM2's come from the model files (the oracle reads them with its own GGUF
reader); Qwen3's is the official one (Qwen/Qwen3-0.6B tokenizer_config.json, as kept in llama.cpp's
models/templates/Qwen-Qwen3-0.6B.jinja), rendered by the oracle with `chat_template=`.
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from tokenizer_oracle import hf_gguf_tokenizer

from kawai.engine.chat_template import CHATML_TEMPLATE, ChatTemplate, TemplateLimitError
from kawai.engine.errors import KawaiError
from kawai.engine.tokenizer import Tokenizer

QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather — température, 天气 <b>now</b>",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "The time.", "parameters": {"type": "object"}}},
]

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}}}
STRING_CALL = {"type": "function", "function": {"name": "now", "arguments": "{}"}}

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "Hi!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "multi-turn": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "Ça va ? 😀 <b>&amp;</b>"},
    ],
    "tool round trip": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Zürich, and the time?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL, STRING_CALL]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "21 °C at noon."},
        {"role": "user", "content": "Thanks"},
    ],
    "content None with tool call": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny"},
    ],
}

THINKING = {
    "reasoning in history": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "Again."},
    ],
    "think tags in content": [
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "<think>\nLet me see.\n</think>\n\nBecause."},
        {"role": "user", "content": "Sure?"},
    ],
    "multi-step tools": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "Call the tool.", "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "Got it."},
    ],
}


@pytest.fixture(scope="module")
def qwen_tok(qwen_meta):
    return Tokenizer.from_gguf(qwen_meta)


@pytest.fixture(scope="module")
def qwen_template(qwen_meta, qwen_tok):
    return ChatTemplate.from_gguf(qwen_meta, qwen_tok)


@pytest.fixture(scope="module")
def smollm_template(smollm_meta):
    return ChatTemplate.from_gguf(smollm_meta, Tokenizer.from_gguf(smollm_meta))


@pytest.fixture(scope="module")
def qwen3_template():
    return ChatTemplate(QWEN3_TEMPLATE, bos_token="<|endoftext|>", eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def hf_qwen(default_model_path):
    return hf_gguf_tokenizer(default_model_path)


@pytest.fixture(scope="module")
def hf_smollm(smollm_model_path):
    return hf_gguf_tokenizer(smollm_model_path)


def hf_render(hf, messages, **kwargs) -> str:
    return hf.apply_chat_template(messages, tokenize=False, **kwargs)


# ---- rendering equals the oracle -----------------------------------------------------------------


@pytest.mark.parametrize("with_tools", [False, True], ids=["no-tools", "tools"])
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "no-gen"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_qwen25_template_matches_transformers(qwen_template, hf_qwen, name, with_tools, add_generation_prompt):
    messages, tools = CONVERSATIONS[name], TOOLS if with_tools else None
    ours = qwen_template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    assert ours == hf_render(hf_qwen, messages, tools=tools, add_generation_prompt=add_generation_prompt)


def test_qwen25_prompt_tokens_match_transformers(qwen_template, qwen_tok, hf_qwen):
    """End to end: rendered and tokenized (special tokens parsed) equals the oracle's token ids."""
    messages = CONVERSATIONS["tool round trip"]
    ids = qwen_tok.encode(qwen_template.render(messages, tools=TOOLS))
    expected = hf_qwen.apply_chat_template(messages, tools=TOOLS, tokenize=True, add_generation_prompt=True)
    assert ids == expected["input_ids"]
    assert ids[0] == 151644 and ids.count(151645) == 6  # <|im_start|>, then six turns end in <|im_end|>


@pytest.mark.parametrize("enable_thinking", [None, True, False], ids=["default", "on", "off"])
@pytest.mark.parametrize("name", [*CONVERSATIONS, *THINKING])
def test_qwen3_template_matches_transformers(qwen3_template, hf_qwen, name, enable_thinking):
    messages = {**CONVERSATIONS, **THINKING}[name]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    for tools in (None, TOOLS):
        try:
            expected = hf_render(
                hf_qwen, messages, tools=tools, add_generation_prompt=True, chat_template=QWEN3_TEMPLATE, **kwargs
            )
        except Exception as e:  # Qwen3's template needs `content`; one set to None is dropped, so both fail
            with pytest.raises(KawaiError, match="has no attribute 'content'"):
                qwen3_template.render(messages, tools=tools, enable_thinking=enable_thinking)
            assert "has no attribute 'content'" in str(e)
            continue
        assert qwen3_template.render(messages, tools=tools, enable_thinking=enable_thinking) == expected


def test_qwen3_thinking_switch(qwen3_template):
    user = CONVERSATIONS["user only"]
    assert qwen3_template.render(user, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert qwen3_template.render(user, enable_thinking=True).endswith("<|im_start|>assistant\n")
    assert qwen3_template.render(user) == qwen3_template.render(user, enable_thinking=True)


@pytest.mark.parametrize("name", ["user only", "system", "multi-turn"])
def test_smollm_template_matches_transformers(smollm_template, hf_smollm, name):
    messages = CONVERSATIONS[name]
    for gen in (True, False):
        assert smollm_template.render(messages, add_generation_prompt=gen) == hf_render(
            hf_smollm, messages, add_generation_prompt=gen
        )


def test_capabilities(qwen_template, qwen3_template, smollm_template):
    assert (qwen_template.supports_tools, qwen_template.supports_thinking) == (True, False)
    assert (qwen3_template.supports_tools, qwen3_template.supports_thinking) == (True, True)
    assert (smollm_template.supports_tools, smollm_template.supports_thinking) == (False, False)
    assert not qwen_template.is_fallback


FEATURES = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
    "{% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}[{{ m.role }}]{% endfor %}\n"
    "  {% if true %}\n    lstrip and trim {{ ns.n }}\n  {% endif %}\n"
    "{{ messages|tojson }}|{{ tools|tojson(indent=2) }}|{{ {'b': 1, 'a': '<é>'}|tojson(sort_keys=true) }}|"
    "{{ messages[0]|tojson(separators=(',', ':')) }}|{{ bos_token }}{{ eos_token }}|{{ custom }}|"
    "{{ dict(a=1)|tojson }}|{{ messages|length }}{{ documents is none }}"
)


def test_environment_matches_transformers(hf_qwen):
    """Loop controls, trim/lstrip blocks, namespace, dict, tojson options, special tokens, extra kwargs."""
    messages = CONVERSATIONS["multi-turn"]
    ours = ChatTemplate(FEATURES, bos_token="<|endoftext|>", eos_token="<|im_end|>").render(
        messages, tools=TOOLS, custom="x"
    )
    expected = hf_render(hf_qwen, messages, tools=TOOLS, custom="x", add_generation_prompt=True, chat_template=FEATURES)
    assert ours == expected
    assert '"<é>"' in ours  # no HTML escaping, no ASCII escaping


def test_strftime_now():
    year = datetime.now().year
    assert ChatTemplate("{{ strftime_now('%Y') }}").render([]) in {str(year), str(year + 1)}


def test_generation_tag_renders_its_body():
    source = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert ChatTemplate(source).render(messages) == "ab"


def test_chatml_fallback(qwen_meta, qwen_tok):
    meta = {k: v for k, v in qwen_meta.items() if k != "tokenizer.chat_template"}
    template = ChatTemplate.from_gguf(meta, qwen_tok)
    assert template.is_fallback and template.source == CHATML_TEMPLATE
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert template.render(messages) == expected
    assert template.render(messages, add_generation_prompt=False).endswith("U<|im_end|>\n")


def test_inputs_are_not_modified(qwen3_template):
    messages = json.loads(json.dumps(THINKING["reasoning in history"]))
    before = json.dumps(messages)
    qwen3_template.render(messages, tools=TOOLS)
    assert json.dumps(messages) == before


# ---- errors ----------------------------------------------------------------------------------------


def test_raise_exception_becomes_a_kawai_error():
    source = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}ok"
    )
    template = ChatTemplate(source)
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(KawaiError, match="Conversation roles must alternate"):
        template.render([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{% for %}", "syntax error on line 1"),
        ("{{ x | no_such_filter }}", "no_such_filter"),
        ("{% endif %}", "syntax"),
    ],
)
def test_broken_template_is_a_clear_error(source, message):
    with pytest.raises(KawaiError, match=message):
        ChatTemplate(source)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ messages[0].content + 1 }}", "TypeError"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
        ("{{ messages[5].content.upper() }}", "chat template"),
    ],
)
def test_runtime_failures_are_kawai_errors(source, message):
    with pytest.raises(KawaiError, match=message):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("bad", [None, "hello", [1, 2], {"role": "user"}])
def test_bad_messages_are_kawai_errors(bad):
    with pytest.raises(KawaiError, match="list of objects"):
        ChatTemplate(None).render(bad)


def test_bad_tools_are_kawai_errors():
    with pytest.raises(KawaiError, match="tools must be a list of objects"):
        ChatTemplate(None).render([], tools="get_weather")


def test_non_string_template_in_metadata(qwen_tok):
    with pytest.raises(KawaiError, match="must be a string"):
        ChatTemplate.from_gguf({"tokenizer.chat_template": ["a"]}, qwen_tok)


# ---- the sandbox -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ namespace.__init__.__globals__['os'] }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ (messages|attr('__class__')).__base__ }}",
        "{{ messages['__class__'].__base__ }}",
        "{% set ns = namespace(_secret=1) %}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{{ messages.append(1) }}",
        "{{ {}.update(a=1) }}",
        "{{ lipsum(100000) }}",
        "{{ 'x'.format.__globals__ }}",
        "{{ dict.mro() }}",
    ],
)
def test_sandbox_blocks_escapes(source):
    """An unsafe attribute is an error, or (printed directly, as in transformers) an empty undefined."""
    try:
        out = ChatTemplate(source).render([{"role": "user", "content": "x"}])
    except KawaiError:
        return
    assert out == ""


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% set big = range(100000)|list %}{% for i in big %}{% for j in big %}{{ '' }}{% endfor %}{% endfor %}",
        "{% macro f() %}{% for i in range(100000) %}{% endfor %}{% endmacro %}"
        "{% for i in range(100000) %}{{ f() }}{% endfor %}",
    ],
)
def test_huge_loops_are_bounded(source):
    with pytest.raises(TemplateLimitError, match="loop iterations|too long"):  # 1e10 iterations unbounded
        ChatTemplate(source).render([])


def test_time_bound_alone():
    template = ChatTemplate(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        max_loop_iterations=10**12,
        max_render_seconds=0.2,
    )
    with pytest.raises(TemplateLimitError, match="too long"):  # the clock, not the iteration count, stopped it
        template.render([])


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",  # output grows past the cap
        "{{ 'a' * 1000000000 }}",
        "{{ [1] * 1000000000 }}",
        "{{ 2 ** 100000000 }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{{ 'x'|center(1000000000) }}",
        "{{ 'x'.ljust(1000000000) }}",
        "{{ '%*d'|format(1000000000, 1) }}",
        "{{ messages|tojson(indent=1000000000) }}",
    ],
)
def test_sizes_are_bounded(source):
    with pytest.raises(TemplateLimitError):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_output_cap_is_configurable():
    template = ChatTemplate("{{ messages[0].content }}", max_output_chars=10)
    assert template.render([{"role": "user", "content": "0123456789"}]) == "0123456789"
    with pytest.raises(TemplateLimitError, match="longer than 10"):
        template.render([{"role": "user", "content": "0123456789a"}])


def test_classic_escape_is_an_error():
    with pytest.raises(KawaiError, match="unsafe"):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([])


def test_deeply_nested_template_is_a_clear_error():
    with pytest.raises(KawaiError, match="nested too deeply"):
        ChatTemplate("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}")

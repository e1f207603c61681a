"""Constrained decoding (engine/constraint.py, the grammar step in engine/sampling.py).

The strongest proof is a random-weight model: unconstrained, its output is garbage; constrained, every
sampled reply must validate against the schema (checked by `jsonschema`, an independent validator).
"""

from __future__ import annotations

import json
import threading

import jsonschema
import numpy as np
import pytest
from tiny_models import write_tiny_model

from kawai import engine
from kawai.api.worker import Failed, Finished, Job, Worker
from kawai.engine.constraint import Grammar, GrammarCompiler, GrammarError, json_rule, json_schema_error
from kawai.engine.errors import KawaiError
from kawai.engine.kv_cache import KVCache
from kawai.engine.sampling import Sampler, SamplingParams

WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["location", "unit", "days"],
    "additionalProperties": False,
}


class Tiny:
    def __init__(self, path):
        self.llm = engine.load(path, threads=1)
        self.cfg = self.llm.config
        self.tokenizer = self.llm.tokenizer
        self.grammars = GrammarCompiler(self.tokenizer)

    def run(self, params: SamplingParams, prompt: str = "<|im_start|>user\nweather?<|im_end|>\n") -> tuple[str, str]:
        ids = self.tokenizer.encode(prompt)
        gen = self.llm.generate(ids, params, cache=KVCache(self.cfg, 512))
        steps = list(gen)
        return "".join(s.text for s in steps), steps[-1].finish_reason


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2"))


def test_random_model_output_validates_against_the_schema(tiny):
    grammar = tiny.grammars.compile("start: " + json_rule(WEATHER))
    for seed in range(5):
        text, finish = tiny.run(SamplingParams(temperature=1.0, seed=seed, max_tokens=200, grammar=grammar))
        assert finish == "eos", text  # the grammar completed, then allowed only end-of-sequence
        jsonschema.validate(json.loads(text), WEATHER)


def test_without_the_grammar_the_same_model_writes_no_json(tiny):
    for seed in range(3):
        text, _ = tiny.run(SamplingParams(temperature=1.0, seed=seed, max_tokens=60))
        with pytest.raises(ValueError):
            json.loads(text)


def test_greedy_follows_the_grammar_too(tiny):
    grammar = tiny.grammars.compile("start: " + json_rule(WEATHER))
    text, finish = tiny.run(SamplingParams(temperature=0, max_tokens=200, grammar=grammar))
    assert finish == "eos"
    jsonschema.validate(json.loads(text), WEATHER)


def test_an_envelope_around_the_json(tiny):
    """The tool-call markup of the chat format around schema-checked arguments (user-defined tokens)."""
    lark = f'start: "<tool_call>\\n{{\\"name\\": \\"get_weather\\", \\"arguments\\": " args "}}\\n</tool_call>"\nargs: {json_rule(WEATHER)}'
    grammar = tiny.grammars.compile(lark)
    text, finish = tiny.run(SamplingParams(temperature=1.0, seed=7, max_tokens=200, grammar=grammar))
    assert finish == "eos"
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
    call = json.loads(text[len("<tool_call>\n") : -len("\n</tool_call>")])
    assert call["name"] == "get_weather"
    jsonschema.validate(call["arguments"], WEATHER)


def test_compiled_grammars_are_cached_by_text(tiny):
    compiler = GrammarCompiler(tiny.tokenizer, cache_size=2)
    a = compiler.compile('start: "a"')
    assert compiler.compile('start: "a"') is a
    compiler.compile('start: "b"')
    compiler.compile('start: "c"')  # evicts "a", the least recently used
    assert compiler.cache_info() == (2, 2)
    assert compiler.compile('start: "a"') is not a


def test_each_sequence_gets_its_own_position(tiny):
    grammar = tiny.grammars.compile('start: "ab" | "ac"')
    one, two = grammar.start(), grammar.start()
    a = tiny.tokenizer.encode("a")[0]
    one.advance(a)
    assert one.allowed().sum() == 2  # "b" or "c"
    assert two.allowed()[a] and two.allowed().sum() == 1


def test_greedy_picks_the_best_allowed_token_not_the_best_token(tiny):
    grammar = tiny.grammars.compile('start: "b"')
    V = tiny.tokenizer.vocab_size
    logits = np.zeros(V, dtype=np.float32)
    a, b = tiny.tokenizer.encode("a")[0], tiny.tokenizer.encode("b")[0]
    logits[a], logits[b] = 10.0, -5.0
    sampler = Sampler(SamplingParams(temperature=0, grammar=grammar))
    assert sampler.sample(logits) == b
    assert sampler.constraint.done
    after = sampler.constraint.allowed()
    assert set(np.flatnonzero(after)) == set(tiny.tokenizer.stop_ids)  # complete: only the end remains


def test_sampled_candidates_are_only_allowed_tokens(tiny):
    grammar = tiny.grammars.compile('start: /[0-9]+/')
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=50, seed=1, grammar=grammar))
    rng = np.random.default_rng(0)
    ids, probs = sampler.candidates(rng.normal(size=tiny.tokenizer.vocab_size).astype(np.float32))
    digits = {tiny.tokenizer.encode(str(d))[0] for d in range(10)}
    assert set(ids[probs > 0]) <= digits


@pytest.mark.parametrize(
    "schema, feature",
    [
        ({"not": {"type": "string"}}, "not"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if"),
    ],
)
def test_unsupported_schema_features_are_named(schema, feature):
    error = json_schema_error(schema)
    assert error is not None and feature in error


def test_supported_schemas_have_no_error():
    assert json_schema_error(WEATHER) is None
    assert json_schema_error({"type": "object"}) is None


def test_a_bad_grammar_is_a_grammar_error(tiny):
    with pytest.raises(GrammarError, match="unknown name"):
        tiny.grammars.compile("start: nothing_defined")


def test_grammar_must_be_a_compiled_grammar():
    with pytest.raises(KawaiError, match="grammar"):
        SamplingParams(grammar='start: "a"')


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_k=20, top_p=0.8), dict(temperature=1.0), dict(top_p=0.5)])
def test_sampling_over_allowed_tokens_equals_masking_the_rest(tiny, kw):
    """The sampler draws among the allowed ids only; the oracle masks the others with -inf."""
    grammar = tiny.grammars.compile('start: /[a-z0-9 ]+/')
    logits = np.random.default_rng(3).normal(size=tiny.tokenizer.vocab_size).astype(np.float32) * 3
    constrained = Sampler(SamplingParams(**kw, grammar=grammar))
    masked = np.where(constrained.constraint.allowed(), logits, np.float32(-np.inf))
    ids, probs = constrained.candidates(logits)
    oracle_ids, oracle_probs = Sampler(SamplingParams(**kw)).candidates(masked)
    keep = oracle_probs > 0
    np.testing.assert_array_equal(ids, oracle_ids[keep])
    np.testing.assert_allclose(probs, oracle_probs[keep], rtol=1e-6)


class Channel:
    """What the engine thread sends a request, recorded."""

    def __init__(self):
        self.items, self.done = [], threading.Event()

    def put(self, item) -> bool:
        self.items.append(item)
        if isinstance(item, (Finished, Failed)):
            self.done.set()
        return True


def test_a_failed_grammar_fails_its_request_not_the_engine_thread(tiny, tmp_path):
    """A matcher in its error state (here: fed a token its grammar refuses; in serving: a resource limit)
    must not end the reply as if complete: the request fails, the engine thread and other requests go on."""
    llm = engine.load(write_tiny_model(tmp_path, "qwen2", n_ctx=128), threads=1)
    good = llm.grammars.compile('start: "b"')
    broken = llm.grammars.compile('start: "a"')._initial.deep_copy()
    broken.consume_token(llm.tokenizer.encode("b")[0])  # refused: the matcher is now in its error state
    assert broken.is_error()
    stuck = Grammar("broken", broken, llm.tokenizer.vocab_size)

    worker = Worker(llm, queue_size=4, max_sequences=2)
    worker.start()
    try:
        bad, ok = Channel(), Channel()
        prompt = llm.tokenizer.encode("hello")
        worker.submit(Job(prompt, SamplingParams(temperature=0, max_tokens=5, grammar=stuck), bad, "req_bad"))
        worker.submit(Job(prompt, SamplingParams(temperature=0, max_tokens=5, grammar=good), ok, "req_ok"))
        assert bad.done.wait(60) and ok.done.wait(60)
        assert isinstance(bad.items[-1], Failed)
        assert isinstance(ok.items[-1], Finished) and "".join(getattr(i, "text", "") for i in ok.items) == "b"
        assert worker.alive
    finally:
        worker.stop(timeout=10)

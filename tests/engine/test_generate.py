"""The generation loop on a tiny GGUF model (real tokenizer, real KV cache, real forward pass).

Stop rules need chosen outputs, which random weights cannot give: those tests run the real loop with a
`ScriptedModel` that returns one-hot logits for a chosen token sequence and advances the real cache as a
model would. Everything else (prefix reuse, cached decode) runs the real forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import EOS_ID, TOKEN_ID, write_tiny_model

from kawai import engine
from kawai.engine.errors import ContextLengthError, KawaiError
from kawai.engine.generate import Prompt, Step, common_prefix_length
from kawai.engine.kv_cache import KVCache
from kawai.engine.prefix_cache import OneCache
from kawai.engine.sampling import SamplingParams
from kawai.engine.scheduler import Generation, Request, Scheduler

GREEDY = SamplingParams(temperature=0, max_tokens=50)


class TinyModel:
    def __init__(self, path):
        self.llm = engine.load(path, threads=1, kv_dtype="f32")
        self.cfg = self.llm.config
        self.tokenizer = self.llm.tokenizer
        self.forward = self.llm.forward_batch  # the real forward pass

    def cache(self, max_seq=128) -> KVCache:
        return KVCache(self.cfg, max_seq)


def Generation_(forward, tiny, prompt, params, cache, should_stop=None, prefill_chunk=128) -> Generation:
    """One sequence through the scheduler, with the given forward function (real or scripted)."""
    scheduler = Scheduler(tiny.llm, OneCache(cache), max_sequences=1, chunk=prefill_chunk, forward=forward)
    return Generation(scheduler, Request(Prompt(list(prompt)), params, should_stop=should_stop or (lambda: False)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyModel:
    return TinyModel(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2"))


class ScriptedModel:
    """Emits `script` token by token (one-hot logits), whatever the input; records every forward call."""

    def __init__(self, script: list[int], n_vocab: int):
        self.script, self.n_vocab = list(script), n_vocab
        self.calls: list[list[int]] = []

    def __call__(self, chunks, caches) -> list[np.ndarray]:
        (chunk,), (cache,) = chunks, caches  # one sequence
        self.calls.append(chunk.ids.tolist())
        cache.advance(chunk.ids)  # what a model does to the cache (keys/values are not needed here)
        n_fed = sum(len(c) for c in self.calls[1:])  # decode calls feed back one sampled token each
        logits = np.zeros((1, self.n_vocab), dtype=np.float32)
        logits[0, self.script[min(n_fed, len(self.script) - 1)]] = 10.0
        return [logits]


def scripted_run(tiny, script, params=GREEDY, *, prompt=None, max_seq=128, should_stop=None):
    model = ScriptedModel(script, tiny.cfg.n_vocab)
    prompt = prompt or tiny.tokenizer.encode("Hi")
    gen = Generation_(model, tiny, prompt, params, tiny.cache(max_seq), should_stop=should_stop)
    steps = list(gen)
    return steps, gen, model


def ids_of(tiny, text: str) -> list[int]:
    return tiny.tokenizer.encode(text, special=True)


def joined(steps: list[Step]) -> str:
    return "".join(s.text for s in steps)


def check_only_last_is_final(steps: list[Step]) -> None:
    assert all(s.finish_reason is None for s in steps[:-1]) and steps[-1].finish_reason is not None


# ---- stop rules --------------------------------------------------------------------------------


def test_eos_stops_and_its_text_is_not_emitted(tiny):
    script = ids_of(tiny, "Hello world") + [EOS_ID] + ids_of(tiny, "never")
    steps, gen, _ = scripted_run(tiny, script)
    check_only_last_is_final(steps)
    assert joined(steps) == "Hello world"
    assert steps[-1].token_id == EOS_ID and steps[-1].finish_reason == "eos" and steps[-1].text == ""
    assert gen.stats.generated_tokens == len(script) - len(ids_of(tiny, "never"))


def test_stop_string_split_across_tokens(tiny):
    script = ids_of(tiny, "The answer</ans") + ids_of(tiny, "wer> and more text")
    pieces = [tiny.tokenizer.decode([t]) for t in script]
    assert not any("</answer>" in p for p in pieces)  # the stop string spans several tokens
    steps, gen, _ = scripted_run(tiny, script, SamplingParams(temperature=0, stop=("</answer>",)))
    check_only_last_is_final(steps)
    assert joined(steps) == "The answer"
    assert steps[-1].finish_reason == "stop_sequence" and steps[-1].stop_sequence == "</answer>"
    # No step ever showed a piece of the stop string.
    assert all("<" not in s.text for s in steps)
    assert gen.stats.finish_reason == "stop_sequence"


def test_stop_string_inside_one_token_keeps_the_text_before_it(tiny):
    script = ids_of(tiny, "say the word") + [EOS_ID]
    steps, _, _ = scripted_run(tiny, script, SamplingParams(temperature=0, stop=("he w",)))
    assert joined(steps) == "say t" and steps[-1].stop_sequence == "he w"


def test_false_stop_prefix_is_released_at_the_end(tiny):
    script = ids_of(tiny, "a </ans")
    steps, _, _ = scripted_run(tiny, script, SamplingParams(temperature=0, max_tokens=len(script), stop=("</answer>",)))
    assert steps[-1].finish_reason == "max_tokens"
    assert joined(steps) == "a </ans"
    assert steps[-1].text.endswith("</ans")  # held back until the end, then released


def test_max_tokens(tiny):
    script = ids_of(tiny, "one two three four five six")
    steps, gen, model = scripted_run(tiny, script, SamplingParams(temperature=0, max_tokens=4))
    assert len(steps) == 4 and steps[-1].finish_reason == "max_tokens"
    assert [s.token_id for s in steps] == script[:4]
    assert joined(steps) == tiny.tokenizer.decode(script[:4])
    # The last token is returned but never fed: 1 prefill + 3 decode calls.
    assert len(model.calls) == 4 and gen.stats.decode_steps == 3 and gen.stats.generated_tokens == 4


def test_context_full(tiny):
    prompt = ids_of(tiny, "Hi")
    script = ids_of(tiny, "one two three four five six seven")
    steps, gen, _ = scripted_run(tiny, script, prompt=prompt, max_seq=len(prompt) + 3)
    # Room for 3 more positions: 3 tokens are fed, the 4th is sampled, emitted, and ends the run.
    assert steps[-1].finish_reason == "context_full"
    assert [s.token_id for s in steps] == script[:4]
    assert gen.state.cache.length == len(prompt) + 3


def test_prompt_longer_than_the_context_is_a_clear_error(tiny):
    with pytest.raises(ContextLengthError, match="context window of 4"):
        Generation_(ScriptedModel([1], tiny.cfg.n_vocab), tiny, [1] * 5, GREEDY, tiny.cache(4))
    with pytest.raises(KawaiError, match="empty"):
        Generation_(ScriptedModel([1], tiny.cfg.n_vocab), tiny, [], GREEDY, tiny.cache(4))


def test_prompt_exactly_filling_the_context_still_gives_one_token(tiny):
    prompt = ids_of(tiny, "Hi there")
    steps, _, _ = scripted_run(tiny, ids_of(tiny, "ok go"), prompt=prompt, max_seq=len(prompt))
    assert len(steps) == 1 and steps[0].finish_reason == "context_full" and steps[0].token_id is not None


def test_cancel_is_checked_every_token_and_releases_held_text(tiny):
    script = ids_of(tiny, "abc </an more")
    produced = []

    def should_stop():
        return len(produced) >= len(ids_of(tiny, "abc </an"))

    model = ScriptedModel(script, tiny.cfg.n_vocab)
    gen = Generation_(model, tiny, ids_of(tiny, "Hi"), SamplingParams(temperature=0, stop=("</answer>",)),
                     tiny.cache(), should_stop=should_stop)
    steps = []
    for step in gen:
        steps.append(step)
        if step.token_id is not None:
            produced.append(step.token_id)
    assert steps[-1].finish_reason == "cancelled" and steps[-1].token_id is None
    assert joined(steps) == "abc </an"
    assert gen.stats.finish_reason == "cancelled"


def test_cancel_during_prefill(tiny):
    calls = []
    model = ScriptedModel(ids_of(tiny, "x"), tiny.cfg.n_vocab)
    prompt = list(range(100, 130))  # 30 tokens, prefilled 8 at a time
    gen = Generation_(model, tiny, prompt, GREEDY, tiny.cache(),
                     should_stop=lambda: calls.append(1) or len(model.calls) >= 2, prefill_chunk=8)
    steps = list(gen)
    assert [len(c) for c in model.calls] == [8, 8]
    assert len(steps) == 1 and steps[0].finish_reason == "cancelled" and steps[0].token_id is None
    assert gen.stats.prefill_tokens == 16 and gen.stats.generated_tokens == 0


# ---- text: whole UTF-8 characters only ----------------------------------------------------------


def test_multibyte_characters_split_over_byte_tokens(tiny):
    text = "é日本🙂!"
    # The tiny vocabulary has one token per byte: look them up by their bytes.
    byte_id = {tiny.tokenizer.token_bytes(i): i for i in range(256)}
    script = [byte_id[bytes([b])] for b in text.encode("utf-8")] + [EOS_ID]
    steps, _, _ = scripted_run(tiny, script)
    assert joined(steps) == text
    assert all("\ufffd" not in s.text for s in steps)
    assert [s.text for s in steps[:4]] == ["", "é", "", ""]  # é is 2 bytes, 日 is 3
    assert steps[4].text == "日"


def test_a_character_cut_by_the_end_is_dropped_not_garbled(tiny):
    byte_id = {tiny.tokenizer.token_bytes(i): i for i in range(256)}
    script = [byte_id[bytes([b])] for b in "ok🙂".encode("utf-8")]
    steps, _, _ = scripted_run(tiny, script, SamplingParams(temperature=0, max_tokens=len(script) - 1))
    assert steps[-1].finish_reason == "max_tokens" and joined(steps) == "ok"
    steps, _, _ = scripted_run(tiny, script[:-1] + [EOS_ID])
    assert steps[-1].finish_reason == "eos" and joined(steps) == "ok"


def test_control_tokens_are_not_shown_but_user_defined_ones_are(tiny):
    script = ids_of(tiny, "a") + [TOKEN_ID["<|im_start|>"], TOKEN_ID["<tool_call>"]] + ids_of(tiny, "b") + [EOS_ID]
    steps, _, _ = scripted_run(tiny, script)
    assert joined(steps) == "a<tool_call>b"


# ---- the KV cache: prefix reuse and correctness -------------------------------------------------


def test_second_turn_prefills_only_new_tokens_and_matches_a_fresh_cache(tiny):
    params = SamplingParams(temperature=0, max_tokens=8)
    cache = tiny.cache()
    turn1 = ids_of(tiny, "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    gen1 = Generation_(tiny.forward, tiny, turn1, params, cache)
    answer = [s.token_id for s in gen1]
    assert gen1.stats.cached_tokens == 0 and gen1.stats.prefill_tokens == len(turn1)
    # The cache holds the prompt and every generated token but the last (sampled, never fed).
    assert cache.tokens == turn1 + answer[:-1] and cache.length == len(turn1) + len(answer) - 1

    turn2 = turn1 + answer + ids_of(tiny, "<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n")
    gen2 = Generation_(tiny.forward, tiny, turn2, params, cache)
    reused = [s.token_id for s in gen2]
    assert gen2.stats.cached_tokens == len(turn1) + len(answer) - 1
    assert gen2.stats.prefill_tokens == len(turn2) - gen2.stats.cached_tokens

    fresh = Generation_(tiny.forward, tiny, turn2, params, tiny.cache())
    assert [s.token_id for s in fresh] == reused
    assert fresh.stats.cached_tokens == 0


def test_diverging_cache_is_truncated_to_the_common_prefix(tiny):
    params = SamplingParams(temperature=0, max_tokens=5)
    cache = tiny.cache()
    a = ids_of(tiny, "the cat is on the mat")
    list(Generation_(tiny.forward, tiny, a, params, cache))
    b = a[:3] + ids_of(tiny, " dog")
    gen = Generation_(tiny.forward, tiny, b, params, cache)
    out = [s.token_id for s in gen]
    assert gen.stats.cached_tokens == 3 and gen.stats.prefill_tokens == len(b) - 3
    assert out == [s.token_id for s in Generation_(tiny.forward, tiny, b, params, tiny.cache())]


def test_whole_prompt_cached_reruns_its_last_token(tiny):
    params = SamplingParams(temperature=0, max_tokens=3)
    prompt = ids_of(tiny, "hello world")
    cache = tiny.cache()
    first = [s.token_id for s in Generation_(tiny.forward, tiny, prompt, params, cache)]
    cache.truncate(len(prompt))
    gen = Generation_(tiny.forward, tiny, prompt, params, cache)
    assert [s.token_id for s in gen] == first
    assert gen.stats.cached_tokens == len(prompt) - 1 and gen.stats.prefill_tokens == 1


def test_a_cache_filled_outside_the_loop_knows_its_ids(tiny):
    """The forward pass records the ids with the keys and values (KVCache.tokens), so a cache filled by
    anyone is reused; one whose ids differ is not."""
    cache = tiny.cache()
    prompt = ids_of(tiny, "hello world")
    tiny.llm.forward(prompt, cache)
    assert cache.tokens == prompt
    gen = Generation_(tiny.forward, tiny, prompt, SamplingParams(temperature=0, max_tokens=2), cache)
    list(gen)
    assert gen.stats.cached_tokens == len(prompt) - 1 and gen.stats.prefill_tokens == 1
    other = tiny.cache()
    tiny.llm.forward(ids_of(tiny, "other words"), other)
    gen = Generation_(tiny.forward, tiny, prompt, SamplingParams(temperature=0, max_tokens=2), other)
    list(gen)
    assert gen.stats.cached_tokens == 0 and gen.stats.prefill_tokens == len(prompt)


def test_prefill_chunks_give_the_same_tokens(tiny):
    params = SamplingParams(temperature=0, max_tokens=6)
    prompt = ids_of(tiny, "a longer prompt that goes over several prefill chunks, the end")
    whole = [s.token_id for s in Generation_(tiny.forward, tiny, prompt, params, tiny.cache())]
    chunked = Generation_(tiny.forward, tiny, prompt, params, tiny.cache(), prefill_chunk=5)
    assert [s.token_id for s in chunked] == whole


def test_seeded_sampling_is_reproducible_through_the_loop(tiny):
    prompt = ids_of(tiny, "hello")
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=12)
    runs = [[s.token_id for s in Generation_(tiny.forward, tiny, prompt, params, tiny.cache())]
            for _ in range(2)]
    assert runs[0] == runs[1]
    other = Generation_(tiny.forward, tiny, prompt, SamplingParams(temperature=1.0, seed=12, max_tokens=12),
                       tiny.cache())
    assert [s.token_id for s in other] != runs[0]


def test_stats(tiny):
    prompt = ids_of(tiny, "hello world")
    gen = Generation_(tiny.forward, tiny, prompt, SamplingParams(temperature=0, max_tokens=5), tiny.cache())
    assert gen.stats.finish_reason is None
    steps = list(gen)
    s = gen.stats
    assert (s.prompt_tokens, s.prefill_tokens, s.generated_tokens, s.decode_steps) == (len(prompt), len(prompt), 5, 4)
    assert s.prefill_seconds > 0 and s.decode_seconds > 0
    assert s.prefill_tokens_per_second > 0 and s.decode_tokens_per_second > 0
    assert s.finish_reason == steps[-1].finish_reason == "max_tokens"


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2

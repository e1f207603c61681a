"""The LLM facade on the real SmolLM2-135M model: load, logits, generation, stop strings, cache reuse."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kawai import engine
from kawai.engine.errors import ContextLengthError, KawaiError
from kawai.engine.sampling import SamplingParams

# Short questions SmolLM2-135M answers briefly and ends with <|im_end|> ("2 + 2 = 4").
QUESTION = [{"role": "user", "content": "What is 2+2? Answer with just the number."}]
FOLLOW_UP = {"role": "user", "content": "And 3+3?"}


@pytest.fixture(scope="module")
def llm(smollm_model_path):
    return engine.load(smollm_model_path, n_ctx=1024, threads=1)  # 1 thread: the test machine is shared


def greedy(max_tokens=24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def run(llm, ids, params, cache=None):
    gen = llm.generate(ids, params, cache=cache)
    steps = list(gen)
    return steps, gen.stats


# ---- loading ---------------------------------------------------------------------------------------


def test_load_reports_what_it_loaded(llm, smollm_model_path):
    assert llm.id == "smollm2-135m-instruct-q4_1" and llm.path == smollm_model_path
    assert llm.config.arch == "llama" and llm.config.n_vocab == 49152
    assert llm.n_ctx == 1024 and llm.new_cache().max_seq == 1024
    assert llm.load_seconds > 0 and llm.compile_seconds > 0 and llm.threads >= 1
    assert llm.has_chat_template


def test_load_summary_reports_both_times_as_measured(llm):
    """The server logs this line; it once subtracted the warm-up twice and printed a negative load time."""
    summary = llm.load_summary()
    assert f"in {llm.load_seconds:.1f} s" in summary and f"warmed in {llm.compile_seconds:.1f} s" in summary
    assert "-" not in summary.replace(llm.id, "")


LOADER_PROBE = """
import os, sys, threading
from kawai import engine
import kawai.engine.llm  # the kernels: importing them starts a thread of their own
def tasks():
    return len(os.listdir("/proc/self/task"))
out = []
def loader():  # the server loads on a worker thread and runs the model on its engine thread
    before = tasks()
    llm = engine.load(sys.argv[1], n_ctx=64, threads=2)
    out.extend([before, tasks()])
t = threading.Thread(target=loader); t.start(); t.join()
print(*out)
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not os.path.isdir("/proc/self/task"), reason="needs 2 CPUs, Linux")
def test_load_leaves_no_kernel_workers_on_the_loading_thread(smollm_model_path):
    """The warm-up's OpenMP workers end with the load: left idle they made every launch of the server's
    engine thread wait for its own sleeping workers (decode 37 ms a token instead of 29, kernels/threads.py)."""
    out = subprocess.run([sys.executable, "-P", "-c", LOADER_PROBE, str(smollm_model_path)], capture_output=True,
                         text=True, check=True, env={**os.environ, "NUMBA_NUM_THREADS": "2"})
    before, after = map(int, out.stdout.split())
    assert after == before


def test_default_context_is_the_trained_one(smollm_model_path):
    from kawai.engine.config import ModelConfig
    from kawai.engine.gguf import open_gguf
    from kawai.engine.llm import _context_size

    cfg = ModelConfig.from_gguf(open_gguf(smollm_model_path))
    assert _context_size(None, cfg) == cfg.n_ctx_train == 8192
    assert _context_size(4096, cfg) == 4096


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_ctx": 0}, "n_ctx"),
        ({"n_ctx": 10**6}, "n_ctx"),
        ({"n_ctx": "512"}, "n_ctx"),
        ({"threads": 0}, "threads"),
        ({"threads": 1000}, "thread"),
    ],
)
def test_bad_load_options_are_clear_errors(smollm_model_path, kwargs, message):
    with pytest.raises(KawaiError, match=message):
        engine.load(smollm_model_path, **kwargs)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(engine.ModelNotFoundError, match="no-such-model"):
        engine.load("no-such-model")


# ---- logits ----------------------------------------------------------------------------------------


def test_logits_are_teacher_forced_and_match_cached_decode(llm):
    ids = llm.encode_chat(QUESTION).ids
    full = llm.logits(ids)
    assert full.shape == (len(ids), llm.config.n_vocab) and full.dtype == np.float32
    # Decoding the same tokens one by one through a cache gives the same rows.
    cache = llm.new_cache()
    split = len(ids) - 4
    rows = [llm.forward(ids[:split], cache)]
    for t in ids[split:]:
        rows.append(llm.forward([t], cache))
    # Bit for bit: each row's arithmetic is the same whether it is decoded alone or in a prefill.
    np.testing.assert_array_equal(np.stack(rows), full[split - 1 :])


@pytest.mark.parametrize("bad", [[-1], [49152], [True], [1.5], []])
def test_logits_reject_bad_ids(llm, bad):
    with pytest.raises(KawaiError):
        llm.logits(bad)


# ---- generation -------------------------------------------------------------------------------------


def test_greedy_answer_ends_at_end_of_turn(llm):
    ids = llm.encode_chat(QUESTION).ids
    steps, stats = run(llm, ids, greedy(20))
    text = "".join(s.text for s in steps)
    assert "4" in text
    assert steps[-1].finish_reason == "eos" and steps[-1].token_id in llm.tokenizer.stop_ids
    assert steps[0].token_id == int(np.argmax(llm.logits(ids)[-1]))
    assert stats.prompt_tokens == len(ids) and stats.generated_tokens == len(steps)
    # Every shown piece joins to the decoded answer (end-of-turn token excluded).
    assert text == llm.tokenizer.decode([s.token_id for s in steps[:-1]], skip_special=True)


def test_real_stop_string_across_a_token_boundary(llm):
    ids = llm.encode_prompt("The three primary colors are")
    free, _ = run(llm, ids, greedy(12))
    pieces = [s.text for s in free]
    # A stop string made of the end of one token and the start of the next.
    i = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    full_text = "".join(pieces)
    expected = full_text[: full_text.index(stop)]
    steps, stats = run(llm, ids, greedy(12, stop=(stop,)))
    assert "".join(s.text for s in steps) == expected
    assert steps[-1].finish_reason == "stop_sequence" and steps[-1].stop_sequence == stop
    assert stats.finish_reason == "stop_sequence"


def test_seeded_sampling_reproducible(llm):
    ids = llm.encode_chat(QUESTION).ids
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=8)
    a = [s.token_id for s in llm.generate(ids, params)]
    b = [s.token_id for s in llm.generate(ids, params)]
    assert a == b


def test_multibyte_output_is_never_split(llm):
    # SmolLM2 spells most CJK characters as several byte tokens.
    ids = llm.encode_prompt("日本語: こんにちは。中国語: 你好。韓国語:")
    steps, _ = run(llm, ids, greedy(12))
    text = "".join(s.text for s in steps)
    assert "\ufffd" not in text
    assert any(s.text == "" for s in steps)  # a token that ended mid-character showed nothing yet
    generated = [s.token_id for s in steps if s.finish_reason != "eos"]
    assert text == llm.tokenizer.decode(generated, skip_special=True).rstrip("\ufffd")


def test_context_and_max_tokens_limits(llm):
    ids = llm.encode_chat(QUESTION).ids
    steps, _ = run(llm, ids, greedy(3))
    assert len(steps) == 3 and steps[-1].finish_reason == "max_tokens"
    small = llm.new_cache(len(ids) + 2)
    steps, _ = run(llm, ids, greedy(40), cache=small)
    assert [s.finish_reason for s in steps] == [None, None, "context_full"]
    with pytest.raises(ContextLengthError):
        llm.generate(ids, greedy(), cache=llm.new_cache(len(ids) - 1))
    with pytest.raises(KawaiError):
        llm.new_cache(llm.n_ctx + 1)


def test_cancel_stops_at_the_next_token(llm):
    ids = llm.encode_chat(QUESTION).ids
    seen = []
    gen = llm.generate(ids, greedy(40), should_stop=lambda: len(seen) >= 2)
    for step in gen:
        seen.append(step)
    assert len(seen) == 3 and seen[-1].finish_reason == "cancelled" and seen[-1].token_id is None


def test_chat_turns_reuse_the_cache(llm):
    cache = llm.new_cache()
    ids1 = llm.encode_chat(QUESTION).ids
    steps1, stats1 = run(llm, ids1, greedy(16), cache=cache)
    answer = "".join(s.text for s in steps1)
    assert stats1.cached_tokens == 0 and stats1.prefill_tokens == len(ids1)

    turn2 = QUESTION + [{"role": "assistant", "content": answer}, FOLLOW_UP]
    ids2 = llm.encode_chat(turn2).ids
    steps2, stats2 = run(llm, ids2, greedy(16), cache=cache)
    # The template re-renders the answer as generated, so the first turn's prompt and answer are reused
    # and only the new user turn is prefilled.
    answer_ids = [s.token_id for s in steps1]
    assert ids2[: len(ids1) + len(answer_ids)] == ids1 + answer_ids
    assert stats2.cached_tokens == len(ids1) + len(answer_ids) - 1
    assert stats2.prefill_tokens == len(ids2) - stats2.cached_tokens < 20
    assert cache.tokens == ids2 + [s.token_id for s in steps2[:-1]]

    fresh_steps, _ = run(llm, ids2, greedy(16))
    assert [s.token_id for s in fresh_steps] == [s.token_id for s in steps2]


def test_logits_beyond_the_context_is_a_clear_error(llm):
    with pytest.raises(ContextLengthError):
        llm.logits([1] * (llm.n_ctx + 1))


def test_count_and_format_helpers(llm):
    text = llm.render_chat(QUESTION)
    assert text.endswith("<|im_start|>assistant\n") and QUESTION[0]["content"] in text
    assert llm.encode_chat(QUESTION).ids == llm.encode_prompt(text)
    assert llm.count_tokens(text) == len(llm.encode_prompt(text))
    assert llm.count_tokens("Paris") == len(llm.tokenizer.encode("Paris"))  # SmolLM2 adds no BOS

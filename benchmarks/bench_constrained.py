"""Constrained decoding cost: decode speed with and without a grammar, on a real model and a real tool schema.

    KAWAI_THREADS=2 .venv/bin/python benchmarks/bench_constrained.py [--model PATH] [--repeats 5]

The request is a forced call of a forecast tool (location, unit enum, an array of daily objects with a
date pattern, numbers and an enum), built by the server's own code (api/prompt.py, api/structured.py),
so the grammar is exactly the one /v1/messages would use. Each repeat runs, alternating, with the server's default sampling (temperature 0.7, top-k 20, top-p 0.8,
seeded):
  constrained    with the grammar, until the call is complete (end of turn)
  unconstrained  the same prompt, no grammar, for the same number of tokens
Decode time per token = decode seconds (forward + sampling, + the mask when constrained) / decode
steps, from engine.generate's stats; the forward calls are timed apart, so the sampling share is known
too. Medians over the repeats. On a busy machine the end-to-end ratio is noisy; the grammar's extra
sampling time over a token's time is the robust figure. Also: the mask alone per token
(Constraint.allowed + advance), the first grammar compile (llguidance's view of the vocabulary
included) and a cached one. Prompt tokens are never counted. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from kawai import engine
from kawai.api.prompt import build_prompt
from kawai.api.structured import reply_lark
from kawai.api.wire import MessagesRequest
from kawai.engine.generate import Prompt
from kawai.engine.prefix_cache import OneCache
from kawai.engine.scheduler import Generation, Request, Scheduler
from kawai.engine.sampling import SamplingParams

DEFAULT_MODEL = Path(os.environ.get("KAWAI_HOME", Path.home() / ".cache" / "kawai")) / "models" / (
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
FORECAST_TOOL = {
    "name": "get_forecast",
    "description": "Daily weather forecast for a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {
                "type": "array",
                "minItems": 3,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "date": {"type": "string", "pattern": "^2026-[0-9]{2}-[0-9]{2}$"},
                        "high": {"type": "number"},
                        "low": {"type": "number"},
                        "conditions": {"type": "string", "enum": ["sunny", "cloudy", "rain", "snow"]},
                    },
                    "required": ["date", "high", "low", "conditions"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["location", "unit", "days"],
        "additionalProperties": False,
    },
    "strict": True,
}
QUESTION = "Give me the forecast for Paris for the next three days, starting 2026-06-01."


class TimedForward:
    """llm.forward_batch, timed: what decode spends in the model, apart from sampling (and the mask)."""

    def __init__(self, llm):
        self.llm, self.seconds, self.calls = llm, 0.0, 0

    def __call__(self, chunks, caches):
        t0 = time.perf_counter()
        logits = self.llm.forward_batch(chunks, caches)
        if len(chunks[0].ids) == 1:  # decode steps only
            self.seconds += time.perf_counter() - t0
            self.calls += 1
        return logits


def run(llm, prompt_ids, params) -> dict:
    """One generation: per-token decode, forward and sampling times (seconds), tokens, text."""
    forward = TimedForward(llm)
    scheduler = Scheduler(llm, OneCache(llm.new_cache()), max_sequences=1, forward=forward)
    gen = Generation(scheduler, Request(Prompt(list(prompt_ids)), params))
    text = "".join(step.text for step in gen)
    s = gen.stats
    steps = max(1, s.decode_steps)
    return {
        "decode": s.decode_seconds / steps,
        "forward": forward.seconds / max(1, forward.calls),
        "sampling": (s.decode_seconds - forward.seconds) / steps,  # sampler (+ mask) and bookkeeping
        "tokens": s.generated_tokens,
        "text": text,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    threads = int(os.environ.get("KAWAI_THREADS", "2"))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; kernel threads {threads}")
    llm = engine.load(args.model, threads=threads, n_ctx=2048)
    req = MessagesRequest.model_validate({
        "model": llm.id, "max_tokens": 400, "messages": [{"role": "user", "content": QUESTION}],
        "tools": [FORECAST_TOOL], "tool_choice": {"type": "tool", "name": "get_forecast",
                                                 "disable_parallel_tool_use": True},
    })
    prompt = build_prompt(llm, req)
    lark = reply_lark(req, prompt)
    t0 = time.perf_counter()
    grammar = llm.grammars.compile(lark)
    first_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.grammars.compile(lark)
    cached_compile = time.perf_counter() - t0
    print(f"model {llm.id}; prompt {len(prompt.ids)} tokens; grammar compile: first {first_compile:.2f} s "
          f"(vocabulary view included), cached {cached_compile * 1e6:.0f} us")

    sampling = dict(temperature=0.7, top_k=20, top_p=0.8, seed=1)  # the server's defaults, seeded
    with_grammar, without = [], []
    for r in range(args.repeats):
        a = run(llm, prompt.ids, SamplingParams(**sampling, max_tokens=400, grammar=grammar))
        b = run(llm, prompt.ids, SamplingParams(**sampling, max_tokens=a["tokens"]))
        with_grammar.append(a)
        without.append(b)
        print(f"repeat {r}: {a['tokens']} tokens; ms/token constrained {a['decode'] * 1e3:.2f} "
              f"(sampling {a['sampling'] * 1e3:.3f}), unconstrained {b['decode'] * 1e3:.2f} "
              f"(sampling {b['sampling'] * 1e3:.3f})")
    n_tokens, text = with_grammar[0]["tokens"], with_grammar[0]["text"]
    call = json.loads(prompt.seed[prompt.seed.index("{"):] + text.split("\n</tool_call>")[0])
    print(f"the constrained call: {json.dumps(call)}")

    # The mask alone, replayed over the same tokens.
    ids = llm.tokenizer.encode(text, special=False)
    constraint, mask_times = grammar.start(), []
    for token in ids:
        t0 = time.perf_counter()
        allowed = constraint.allowed()
        constraint.advance(token)
        mask_times.append(time.perf_counter() - t0)
        assert allowed[token]

    def median(runs, key):
        return statistics.median(r[key] for r in runs)

    med_with, med_without = median(with_grammar, "decode"), median(without, "decode")
    # Robust to a busy machine: the grammar's extra work per token over the time a token takes.
    extra = median(with_grammar, "sampling") - median(without, "sampling")
    per_token = median(without, "forward") + median(without, "sampling")
    results = {
        "model": llm.id,
        "threads": threads,
        "cpu": _cpu(),
        "prompt_tokens": len(prompt.ids),
        "generated_tokens": n_tokens,
        "repeats": args.repeats,
        "decode_tok_s_constrained": round(1 / med_with, 2),
        "decode_tok_s_unconstrained": round(1 / med_without, 2),
        "slowdown": round(med_with / med_without - 1, 4),
        "forward_ms_per_token": round(median(without, "forward") * 1e3, 2),
        "sampling_ms_per_token_constrained": round(median(with_grammar, "sampling") * 1e3, 3),
        "sampling_ms_per_token_unconstrained": round(median(without, "sampling") * 1e3, 3),
        "grammar_share_of_a_token": round(extra / per_token, 4),
        "mask_us_per_token_median": round(statistics.median(mask_times) * 1e6, 1),
        "mask_us_per_token_max": round(max(mask_times) * 1e6, 1),
        "first_compile_s": round(first_compile, 3),
        "cached_compile_us": round(cached_compile * 1e6, 1),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    print(f"decode {results['decode_tok_s_constrained']} tok/s constrained vs "
          f"{results['decode_tok_s_unconstrained']} unconstrained ({results['slowdown']:+.1%} end to end); "
          f"the grammar's extra sampling work is {results['grammar_share_of_a_token']:.2%} of a token's time; "
          f"mask alone {results['mask_us_per_token_median']} us/token median")
    print(json.dumps(results))
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())

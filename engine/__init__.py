"""Kawai's engine: load a GGUF model, tokenize, render chat prompts, generate.

    from kawai import engine
    llm = engine.load("qwen2.5-coder-0.5b-instruct-q4_k_m")      # or a path to a .gguf
    prompt = llm.encode_chat([{"role": "user", "content": "Hi"}])      # an engine.Prompt
    for step in llm.generate(prompt, engine.SamplingParams(temperature=0, max_tokens=64)):
        print(step.text, end="")

The names below are imported on first use, so `import kawai.engine.errors` (the CLI, the catalog) stays light
and does not pull in Numba or the tokenizer.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load": "kawai.engine.llm",
    "LLM": "kawai.engine.llm",
    "SamplingParams": "kawai.engine.sampling",
    "Sampler": "kawai.engine.sampling",
    "Step": "kawai.engine.generate",
    "Generation": "kawai.engine.scheduler",
    "Prompt": "kawai.engine.generate",
    "GenerationStats": "kawai.engine.generate",
    "FINISH_REASONS": "kawai.engine.generate",
    "KawaiError": "kawai.engine.errors",
    "ContextLengthError": "kawai.engine.errors",
    "ModelNotFoundError": "kawai.engine.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kawai.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

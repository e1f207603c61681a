"""Make tests/data/qwen2.5-coder-reference.npz: transformers' answers for the default served model, stored
so the default suite can compare the engine with them without running transformers on a 0.5B model.

    .venv/bin/python -P tests/make_reference.py      # ~3-10 min on 2 cores; needs torch + transformers

Everything comes from outside Kawai: the model file is read and copied by gguf-py (tiny_models.load_hf_model),
the logits are transformers' float32 forward pass, the token ids are transformers' GGUF tokenizer and its
`apply_chat_template`. The file holds (P = positions over all prompts, K = TOP_K):

    prompt_ids_{i}   (T_i,) int32     the i-th prompt of test_model_real.PROMPTS, tokenized
    top_ids          (P, K) int32     reference token ids at each position, highest logit first
    top_logits       (P, K) float32   their logits
    logsumexp        (P,)   float64   log-sum-exp of the whole logit row (for log-probabilities)
    chat_ids_{j}     (N_j,) int32     apply_chat_template(CHATS[j] (+ its tools), add_generation_prompt=True)
    meta             ()     str       JSON: model id, file size, transformers and torch versions, CHATS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "qwen2.5-coder-reference.npz"
MODEL_ID = "qwen2.5-coder-0.5b-instruct-q4_k_m"
TOP_K = 8

# Conversations whose prompt length the API must count like transformers (Anthropic shape: top-level system).
CHATS = [
    {"messages": [{"role": "user", "content": "Hello, how are you?"}]},
    {"system": "You are a terse code reviewer.",
     "messages": [{"role": "user", "content": "Review: def add(a, b): return a - b"},
                  {"role": "assistant", "content": "The function subtracts; it should add."},
                  {"role": "user", "content": "Fix it, and explain in one line. Ünïcödé: 日本語 ✓"}]},
    {"system": "Be brief.",
     "tools": [{"name": "get_weather", "description": "Get the current weather for a location",
                "input_schema": {"type": "object", "required": ["location"],
                                 "properties": {"location": {"type": "string", "description": "City name"}}}}],
     "messages": [{"role": "user", "content": "What is the weather in Paris?"}]},
]


def hf_messages(chat: dict) -> list[dict]:
    """An Anthropic-shaped chat as the chat template's messages: the system prompt becomes the first turn."""
    system = [{"role": "system", "content": chat["system"]}] if "system" in chat else []
    return system + chat["messages"]


def hf_tools(chat: dict) -> list[dict] | None:
    """Anthropic tools as the OpenAI function format chat templates take (the documented mapping)."""
    return [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                              "parameters": t["input_schema"]}}
            for t in chat["tools"]] if "tools" in chat else None


def main() -> None:
    sys.path.insert(0, str(HERE))
    import torch
    import transformers

    from kawai.engine.catalog import ensure_model
    sys.path.insert(0, str(HERE / "engine"))
    from test_model_real import PROMPTS
    from tiny_models import load_hf_model
    from tokenizer_oracle import hf_gguf_tokenizer

    path = ensure_model(MODEL_ID)
    tokenizer = hf_gguf_tokenizer(path)
    model = load_hf_model(path)
    arrays: dict[str, np.ndarray] = {}
    tops, top_logits, lses = [], [], []
    for i, text in enumerate(PROMPTS):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        arrays[f"prompt_ids_{i}"] = np.array(ids, np.int32)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()  # (T, V)
        values, indices = logits.topk(TOP_K, dim=-1)
        tops.append(indices.numpy().astype(np.int32))
        top_logits.append(values.numpy().astype(np.float32))
        lses.append(torch.logsumexp(logits, -1).numpy())
        print(f"prompt {i}: {len(ids)} tokens", flush=True)
    arrays["top_ids"] = np.concatenate(tops)
    arrays["top_logits"] = np.concatenate(top_logits)
    arrays["logsumexp"] = np.concatenate(lses)
    for j, chat in enumerate(CHATS):
        ids = tokenizer.apply_chat_template(hf_messages(chat), tools=hf_tools(chat), add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        arrays[f"chat_ids_{j}"] = np.array(ids, np.int32)
    meta = {"model": MODEL_ID, "file_size": path.stat().st_size, "top_k": TOP_K, "chats": CHATS,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "command": "python -P tests/make_reference.py"}
    arrays["meta"] = np.array(json.dumps(meta))
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays['top_ids'])} positions)")


if __name__ == "__main__":
    main()

"""The real models (Qwen2.5-Coder-0.5B Q4_K_M, SmolLM2-135M Q4_1) against transformers loading the same GGUF.

transformers dequantizes the GGUF with gguf-py and runs in float32: an independent oracle.
(b) teacher-forced logits on 4 prompts (>= 300 tokens): with the fast kernels (int8 activations, the top
    logits recomputed exactly, q/k/v at ~15 bits) mean KL(ref || ours) and top-1 agreement near the measured
    values, every flip a near-tie; in exact mode (float32 weights) max |logit diff| near the measured one;
(c) the cache: prefill + token-by-token decode equals the teacher-forced logits bit for bit;
(d) greedy decoding of 64 tokens in exact mode equals transformers' greedy output.
Each model is loaded once per module; the 0.5B (transformers needs ~2 GB and minutes) is marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kawai.engine.config import ModelConfig
from kawai.engine.gguf import open_gguf
from kawai.engine.kv_cache import KVCache
from one_sequence import forward
from kawai.engine.tokenizer import Tokenizer
from kawai.engine.weights import load_weights
from tiny_models import load_hf_model

PROMPTS = [
    # code
    'def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n    """Merge two sorted lists into one '
    'sorted list."""\n    result = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n        if a[i] <= '
    "b[j]:\n            result.append(a[i])\n            i += 1\n        else:\n            result.append(b[j])\n"
    "            j += 1\n    result.extend(a[i:])\n    result.extend(b[j:])\n    return result\n",
    # a ChatML conversation, as the server renders it
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the difference "
    "between a list and a tuple in Python?<|im_end|>\n<|im_start|>assistant\nA list is mutable: you can add, "
    "remove and change its items after it is created. A tuple is immutable, so it cannot be changed once it "
    "exists. Tuples are often used for fixed collections of values.<|im_end|>\n",
    # prose
    "The river rises in the mountains to the north and flows south for almost three hundred kilometres "
    "before it reaches the sea. In spring, melting snow swells the water, and the towns along its banks "
    "have built high stone walls to protect their streets. Fishermen still work the lower valley, where "
    "the current slows and the water turns brown with silt.",
    # structured data
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    "| id | product | price |\n|----|---------|-------|\n| 1 | keyboard | 49.99 |\n| 2 | mouse | 19.99 |\n"
    "SELECT product, price FROM items WHERE price < 30 ORDER BY price DESC;",
]
GREEDY_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite a Python function "
    "that returns True when a number is prime.<|im_end|>\n<|im_start|>assistant\n"
)
MODELS = {"smollm2": "smollm_model_path", "qwen2.5-coder": "default_model_path"}
# Bounds per model, near the measured values (this machine, 1 kernel thread). q/k/v get ~15-bit activations
# and the logits near the top are recomputed exactly (kernels/matmul_precise.py); attn_output and the MLP
# keep int8 activations, which still flip a few near-ties. Measured on these prompts (float32 KV cache; the
# float16 default moved SmolLM2 to 5 flips and Qwen's mean KL to 0.00030 on the earlier kernels):
#   SmolLM2 Q4_1: top-1 98.90% (4 flips of 362; 3 before the kernels' one 16-lane accumulation order;
#     llama.cpp 0.3.36 on the same file and ids: 97.0%), mean KL 0.00136, exact mode max |logit diff|
#     7.5e-5. Without the precise q/k/v and exact top logits top-1 drops to 97.24% (10 flips), KL 0.00303.
#   Qwen2.5-Coder Q4_K_M: top-1 98.5% (5 flips of 333; 2 before the new accumulation order), mean KL
#     0.00028, exact mode max |logit diff| 7.3e-5.
MIN_TOP1 = {"smollm2": 356 / 362, "qwen2.5-coder": 326 / 333}  # at most 6 and 7 flips
MAX_KL = {"smollm2": 0.003, "qwen2.5-coder": 0.0007}
EXACT_ATOL = {"smollm2": 1.5e-4, "qwen2.5-coder": 1.5e-4}
NEAR_TIE = 0.5  # a disagreement is only allowed where the reference's top-2 margin is below this


class RealModel:
    def __init__(self, path):
        self.path = path
        gguf = open_gguf(path)
        self.cfg = ModelConfig.from_gguf(gguf)
        self.fast = load_weights(gguf, self.cfg)
        self.exact = load_weights(gguf, self.cfg, exact=True)
        self.hf = load_hf_model(path)
        # Both sides get the same ids, so the tokenizer is not under test here; ours loads in a second
        # where transformers' GGUF tokenizer conversion takes many.
        self.tokenizer = Tokenizer.from_gguf(gguf.metadata)
        self.prompts = [np.array(self.tokenizer.encode(p), dtype=np.int64) for p in PROMPTS]
        with torch.no_grad():
            self.ref = [self.hf(torch.tensor(ids[None])).logits[0].numpy() for ids in self.prompts]

    def logits(self, tokens, exact: bool) -> np.ndarray:
        weights = self.exact if exact else self.fast
        cache = KVCache(self.cfg, len(tokens), "f32" if exact else "f16")  # exact mode: float32 throughout
        return forward(self.cfg, weights, tokens, cache, all_logits=True)


@pytest.fixture(
    scope="module",
    params=["smollm2", pytest.param("qwen2.5-coder", marks=pytest.mark.slow)],  # the 0.5B takes minutes
)
def model(request):
    # torch's own thread pool next to Numba's: one thread is several times faster on a busy 2-core machine
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    m = RealModel(request.getfixturevalue(MODELS[request.param]))
    m.name = request.param
    yield m
    torch.set_num_threads(torch_threads)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_prompts_are_long_enough(model):
    assert len(model.prompts) >= 4 and sum(map(len, model.prompts)) >= 300


def test_fast_kernels_agree_with_transformers(model):
    ref = np.concatenate(model.ref)
    ours = np.concatenate([model.logits(ids, exact=False) for ids in model.prompts])
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    lr, lo = log_softmax(ref), log_softmax(ours)
    kl = float((np.exp(lr) * (lr - lo)).sum(-1).mean())
    top2 = np.sort(ref, -1)[:, -2:]
    flipped_margins = (top2[:, 1] - top2[:, 0])[ours.argmax(-1) != ref.argmax(-1)]
    print(f"{model.name}: top-1 agreement {top1:.4f}, mean KL {kl:.5f} over {len(ref)} positions")
    assert top1 >= MIN_TOP1[model.name]
    assert kl < MAX_KL[model.name]
    assert np.all(flipped_margins < NEAR_TIE), flipped_margins


def test_exact_mode_matches_transformers(model):
    worst = max(
        float(np.abs(model.logits(ids, exact=True) - ref).max()) for ids, ref in zip(model.prompts, model.ref)
    )
    print(f"{model.name}: exact mode max |logit diff| {worst:.2e}")
    assert worst < EXACT_ATOL[model.name]


def test_decode_with_cache_equals_teacher_forcing(model):
    ids = model.prompts[1]
    full = model.logits(ids, exact=False)
    cache = KVCache(model.cfg, len(ids))
    steps = [forward(model.cfg, model.fast, ids[:-10], cache)]
    steps += [forward(model.cfg, model.fast, ids[i : i + 1], cache) for i in range(len(ids) - 10, len(ids))]
    np.testing.assert_array_equal(np.concatenate(steps), full[-11:])  # bit for bit, as on the tiny models


def test_greedy_decoding_matches_transformers(model):
    prompt = np.array(model.tokenizer.encode(GREEDY_PROMPT), dtype=np.int64)
    n_new = 64
    with torch.no_grad():
        out = model.hf.generate(
            torch.tensor(prompt[None]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n_new,
            min_new_tokens=n_new,  # both sides ignore end-of-turn tokens
            do_sample=False,
        )
    expected = out[0, len(prompt) :].tolist()

    cfg, weights = model.cfg, model.exact
    cache = KVCache(cfg, len(prompt) + n_new, "f32")
    eos = model.hf.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    logits = forward(cfg, weights, prompt, cache)
    ours = []
    for _ in range(n_new):
        row = logits[0].copy()
        row[list(eos)] = -np.inf  # as min_new_tokens does
        ours.append(int(row.argmax()))
        logits = forward(cfg, weights, np.array(ours[-1:]), cache)
    print(model.tokenizer.decode(ours))
    assert ours == expected

"""The served default model (Qwen2.5-Coder-0.5B Q4_K_M: QKV bias, RoPE base 1e6, untied Q8_0 head, Q4_K /
Q5_0 / Q6_K / Q8_0 weights) against transformers' logits, in the default suite.

Running transformers on the 0.5B takes minutes (tests/engine/test_model_real.py does, marked slow), so its answers
were made once and stored: tests/data/qwen2.5-coder-reference.npz, by `python -P tests/make_reference.py`
(gguf-py reads the file, transformers runs float32, transformers' tokenizer makes the ids). Here the
engine, as the server loads it (fast kernels), runs the same ids and must land close to the stored top-8
logits at every one of the 333 positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kawai import engine
from make_reference import hf_messages, hf_tools

REFERENCE = Path(__file__).parents[1] / "data" / "qwen2.5-coder-reference.npz"

# Measured (tests/engine/test_model_reference.py -s, 1 kernel thread, 2-core x86-64, the kernels' one 16-lane
# accumulation order): top-1 agreement 328/333, every flip at a reference margin <= 0.026 (near-ties: an
# accumulation-order change flips some and fixes others); |logit diff| at the reference top-8: max 0.460,
# mean 0.0360; |log-probability diff| of the reference's top token: max 0.236, mean 0.0089. The means
# (over 2664 and 333 values) are stable, so their bounds sit ~15% above them: without the ~15-bit q/k/v
# activations and the exact top logits (kernels/matmul_precise.py) they rise to 0.0443 and 0.0127, and
# flips appear at margins up to 0.14.
MIN_TOP1 = 326 / 333
NEAR_TIE = 0.05  # a flip is only allowed where the reference's top-2 margin is below this
MAX_TOP_LOGIT_ERR, MEAN_TOP_LOGIT_ERR = 0.6, 0.041
MAX_LOGPROB_ERR, MEAN_LOGPROB_ERR = 0.3, 0.0105

@pytest.fixture(scope="module")
def reference() -> dict:
    with np.load(REFERENCE) as data:
        ref = {key: data[key] for key in data.files}
    ref["meta"] = json.loads(str(ref["meta"]))
    return ref


@pytest.fixture(scope="module")
def llm(default_model_path, reference):
    assert default_model_path.stat().st_size == reference["meta"]["file_size"]  # the file the reference used
    return engine.load(default_model_path, threads=1)


def errors(reference: dict, llm) -> dict:
    """Our logits on the stored prompts, compared with the stored reference at its top-k tokens."""
    n_prompts = sum(key.startswith("prompt_ids_") for key in reference)
    ours = np.concatenate([llm.logits(reference[f"prompt_ids_{i}"].tolist()) for i in range(n_prompts)])  # (P, V)
    top_ids, top_logits = reference["top_ids"], reference["top_logits"]  # (P, K) each
    at_top = np.take_along_axis(ours, top_ids, axis=1).astype(np.float64)  # (P, K) our logits there
    logit_err = np.abs(at_top - top_logits)
    shifted = ours.astype(np.float64) - ours.max(-1, keepdims=True)
    our_lse = np.log(np.exp(shifted).sum(-1)) + ours.max(-1)  # (P,)
    logprob_err = np.abs((at_top[:, 0] - our_lse) - (top_logits[:, 0] - reference["logsumexp"]))
    flipped = ours.argmax(-1) != top_ids[:, 0]
    return {
        "positions": len(ours),
        "top1": 1.0 - flipped.mean(),
        "flip_margins": (top_logits[:, 0] - top_logits[:, 1])[flipped],
        "max_logit_err": logit_err.max(), "mean_logit_err": logit_err.mean(),
        "max_logprob_err": logprob_err.max(), "mean_logprob_err": logprob_err.mean(),
    }


def test_served_model_logits_match_the_stored_reference(reference, llm):
    e = errors(reference, llm)
    print({k: np.round(v, 4) for k, v in e.items()})
    assert e["positions"] == len(reference["top_ids"]) >= 300
    assert e["top1"] >= MIN_TOP1 and np.all(e["flip_margins"] < NEAR_TIE), e
    assert e["max_logit_err"] < MAX_TOP_LOGIT_ERR and e["mean_logit_err"] < MEAN_TOP_LOGIT_ERR, e
    assert e["max_logprob_err"] < MAX_LOGPROB_ERR and e["mean_logprob_err"] < MEAN_LOGPROB_ERR, e


def test_chat_prompts_tokenize_like_transformers(reference, llm):
    """Our template + tokenizer give transformers' apply_chat_template ids (the API's usage counts them)."""
    chats = reference["meta"]["chats"]
    assert any("tools" in chat for chat in chats)
    for j, chat in enumerate(chats):
        ids = llm.encode_chat(hf_messages(chat), tools=hf_tools(chat)).ids
        assert ids == reference[f"chat_ids_{j}"].tolist(), chat

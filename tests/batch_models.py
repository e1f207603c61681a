"""Models shared by the batching tests (tests/engine/test_model_batch.py, tests/engine/test_scheduler.py,
tests/api/test_worker.py, tests/e2e/test_concurrency.py): a tiny K-quant Qwen2 and a tiny Qwen2-VL with
its vision projector. Test modules import the module fixtures `tiny_llm` and `vision_llm` from here.

Kernels run on one thread (KAWAI_THREADS=1 is what the suite uses; here `threads=1` at load): the
assertions are about scheduling, and the 2-core test machine is shared.
"""

from __future__ import annotations

import pytest

from kawai import engine
from tiny_models import write_tiny_model

N_CTX = 512
K_QUANT_DIMS = dict(d_model=256, d_ff=512)  # K-quant rows hold 256-weight super-blocks


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", qtype="mixed", n_ctx=N_CTX,
                                        **K_QUANT_DIMS),
                       threads=1)


@pytest.fixture(scope="module")
def vision_llm(tmp_path_factory):
    from vision_models import write_tiny_vl

    return engine.load(write_tiny_vl(tmp_path_factory.mktemp("vl"))[0], threads=1, exact=True)


def picture_prompt(llm, suffix=""):
    from pictures import photo

    picture = [{"role": "user", "content": [{"type": "image", "image": photo(100, 73, seed=1)},
                                            {"type": "text", "text": "What is it?"}]}]
    return llm.encode_chat(picture, suffix=suffix)

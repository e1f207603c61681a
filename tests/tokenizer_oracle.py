"""transformers' GGUF tokenizer: the outside oracle for engine/tokenizer.py and engine/chat_template.py.

Loading one from a GGUF takes tens of seconds, so each file is loaded once per test process and shared by
test_tokenizer.py and test_chat_template.py (transformers is a test-only dependency).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path


@functools.lru_cache(maxsize=None)
def hf_gguf_tokenizer(path: Path):
    """`AutoTokenizer.from_pretrained(dir, gguf_file=name)` for a model file; cached per path."""
    from transformers import AutoTokenizer

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

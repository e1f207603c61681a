"""Packed weights are held once: after loading, the model file's memory map is (almost) not resident.

Linux-only check through /proc/self/smaps, which reports the resident bytes of each mapping."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from kawai.engine.config import ModelConfig
from kawai.engine.gguf import open_gguf
from kawai.engine.weights import load_weights

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def resident_bytes_of_mapping(path: Path) -> int:
    """Rss of every mapping of `path` in this process, in bytes."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:  # a mapping's header line
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def test_loading_releases_the_pages_of_packed_tensors(smollm_model_path):
    path = Path(smollm_model_path).resolve()
    gguf = open_gguf(path)
    cfg = ModelConfig.from_gguf(gguf)
    for name in gguf.tensors:  # read every byte once: the whole file becomes resident
        int(np.asarray(gguf.tensor_data(name)).sum(dtype=np.uint64))
    assert resident_bytes_of_mapping(path) > 0.9 * gguf.file_size

    weights = load_weights(gguf, cfg)
    # What may stay: the metadata (the tokenizer vocabulary: 1.8 MB here) and the small float vectors. Kernels
    # with large page-cache folios map a whole folio on a fault, neighbours included: the loader releases the
    # packed tensors again at the end (without that, 34 MB of ffn_gate stayed resident on a 6.18 kernel).
    assert resident_bytes_of_mapping(path) < 0.1 * gguf.file_size
    ids = np.array([1, 2, 3])
    assert weights.token_embd.lookup(ids).shape == (3, cfg.d_model)  # released pages read back fine

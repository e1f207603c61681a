"""The architecture table (engine/architectures.py): every row is complete, and every supported
architecture loads a tiny model whose config carries the row's flags and generates.

A new row without a tiny model here fails `test_every_architecture_has_a_tiny_model`: docs/adding-a-model.md
says how to add one (and how to test it against transformers in float32).
"""

from __future__ import annotations

import dataclasses

import pytest

from kawai import engine
from kawai.engine.architectures import ARCHITECTURES, ROPE_STYLES, Architecture, architecture
from kawai.engine.chat_format import CHAT_FORMATS
from kawai.engine.errors import KawaiError
from kawai.engine.sampling import SamplingParams
from tiny_models import ARCH_DEFAULTS, write_tiny_model
from vision_models import tiny_hf_model, write_language_model

# Architecture name -> a writer of a tiny GGUF of it: tests/tiny_models.py writes the text-only ones
# (one ARCH_DEFAULTS entry each), tests/vision_models.py the multimodal language model.
TINY_WRITERS = {
    **{arch: (lambda root, arch=arch: write_tiny_model(root, arch)) for arch in ARCH_DEFAULTS},
    "qwen2vl": lambda root: write_language_model(tiny_hf_model("qwen2vl"), root / "tiny-qwen2vl.gguf"),
}


def test_every_architecture_has_a_tiny_model():
    assert set(TINY_WRITERS) == set(ARCHITECTURES)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_row_is_complete(name):
    row = ARCHITECTURES[name]
    assert row.name == name and row.models
    assert row.rope_style in ROPE_STYLES
    assert row.chat_format in CHAT_FORMATS
    for field in dataclasses.fields(Architecture):
        value = getattr(row, field.name)
        assert value is not None and value != "", field.name
        if field.type in ("bool", bool):
            assert isinstance(value, bool), field.name


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_architecture_loads_a_tiny_model(name, tmp_path):
    llm = engine.load(TINY_WRITERS[name](tmp_path))
    cfg, row = llm.config, ARCHITECTURES[name]
    assert cfg.arch == name
    assert (cfg.rope_style, cfg.qk_norm, bool(cfg.rope_sections)) == (row.rope_style, row.qk_norm, row.mrope)
    assert llm.chat_format.name in CHAT_FORMATS
    steps = list(llm.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=4)))  # README's facade
    assert 1 <= len(steps) <= 4 and steps[-1].finish_reason in ("eos", "max_tokens")


def test_an_unknown_architecture_names_the_supported_ones():
    with pytest.raises(KawaiError, match="'mamba' is not supported \\(supported: qwen2, qwen3, llama, qwen2vl\\)"):
        architecture("mamba")

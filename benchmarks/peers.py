"""The peers our engine is measured against, behind one small interface.

Every runner loads a GGUF file in its constructor and offers:
    prefill(ids) -> int        fresh state, evaluate the prompt, return the greedy next token
    decode_step(token) -> int  append one token, return the greedy next token

Greedy argmax, no end-of-sequence stop: each engine does exactly the same work. Timing is done by the
caller (benchmarks/engine_process.py), identically for every engine.

- llama.cpp through llama-cpp-python (benchmarks/requirements-peer.txt, .venv-bench only).
- transformers: the same GGUF dequantized to fp32 by transformers' own GGUF loader, torch threads = N.
Our engine's runner is `engine.bench.KawaiRunner`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class LlamaCppRunner:
    """llama.cpp, default context settings of llama-cpp-python (n_batch = n_ubatch = 512, f16 KV)."""

    name = "llama.cpp"

    def __init__(self, path: Path, threads: int, n_ctx: int):
        import llama_cpp

        self.version = llama_cpp.__version__
        self.info = llama_cpp.llama_print_system_info().decode()  # the CPU features it was built with
        self._llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=0,
            logits_all=False,  # logits of the last token only, like our prefill
            verbose=False,
        )
        self._n_vocab = self._llm.n_vocab()

    def _greedy_next(self) -> int:
        row = np.ctypeslib.as_array(self._llm._ctx.get_logits_ith(-1), shape=(self._n_vocab,))  # (V,)
        return int(np.argmax(row))

    def prefill(self, ids: list[int]) -> int:
        self._llm.reset()  # eval() then drops every cached position >= 0
        self._llm.eval(ids)
        return self._greedy_next()

    def decode_step(self, token: int) -> int:
        self._llm.eval([token])
        return self._greedy_next()


class TransformersRunner:
    """transformers on fp32 weights dequantized from the GGUF file (its GGUF loader uses `gguf`)."""

    name = "transformers"

    def __init__(self, path: Path, threads: int, n_ctx: int):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.version = transformers.__version__
        self._torch = torch
        self._model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
        ).eval()
        self._past = None

    def _forward(self, ids: list[int], past):
        torch = self._torch
        with torch.inference_mode():
            out = self._model(
                torch.tensor([ids], dtype=torch.long), past_key_values=past, use_cache=True, logits_to_keep=1
            )
        return int(out.logits[0, -1].argmax()), out.past_key_values

    def prefill(self, ids: list[int]) -> int:
        token, self._past = self._forward(ids, None)
        return token

    def decode_step(self, token: int) -> int:
        token, self._past = self._forward([token], self._past)
        return token

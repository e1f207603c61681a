"""Coverage-guided fuzzing (atheris, libFuzzer) of the targets in tests/fuzz/targets.py, for long runs by hand:

    .venv/bin/python -P tests/fuzz/fuzz.py TARGET [libFuzzer flags] [CORPUS_DIR ...]
    .venv/bin/python -P tests/fuzz/fuzz.py request_body -max_total_time=3600 /tmp/corpus-request
    .venv/bin/python -P tests/fuzz/fuzz.py gguf -runs=100000

TARGET: json_stream, request_body, chat_request_body, output_parser, gguf. Kawai's own modules are
instrumented for coverage; a crash (an exception other than the documented one, or a broken invariant)
stops the run and leaves the input in ./crash-<sha1>: replay it with `fuzz.py TARGET ./crash-<sha1>`.
The first corpus directory, when given, is seeded with a few valid inputs; the text targets get
tests/fuzz/request.dict (JSON punctuation, the API's field names, the model's tags) unless -dict= is given. `-timeout=N` (seconds per
input, libFuzzer's default 1200) catches inputs that take far too long; linear cost itself is checked
by tests/fuzz/test_fuzz_parsers.py and tests/engine/test_parsing_cost.py.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # targets.py; the test helpers (run with -P: no repo root)

with atheris.instrument_imports(include=["kawai"]):
    import targets
    from kawai.engine.chat_format import HERMES, LLAMA3

SEEDS = {
    "json_stream": [b'{"a": [1, -2.5e3, true, null, {"b": "c\\n\\u00e9"}]}', b'{"k": "x'],
    "request_body": [json.dumps({"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}]}).encode()],
    "chat_request_body": [json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                      "tools": [{"type": "function", "function": {"name": "f"}}]}).encode()],
    "output_parser": [b'\x00<tool_call>\n{"name": "f", "arguments": {"a": [1, "x"]}}\n</tool_call>',
                      b'\x01<think>t</think>```json\n{"name": "f", "arguments": {}}\n```'],
}


def json_stream(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cuts = [fdp.ConsumeIntInRange(0, 4096) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    targets.json_stream(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()), cuts)


def request_body(data: bytes) -> None:
    targets.request_body(data)


def chat_request_body(data: bytes) -> None:
    targets.request_body(data, openai=True)


def output_parser(data: bytes) -> None:
    """First byte: the options (bits 0-2 piece size, 3 no tools, 4 in thinking, 5 the first half
    is a prefill, 6 llama3, 7 cut); then the prefill and the generated text."""
    flags = data[0] if data else 0
    text = data[1:].decode("utf-8", "replace")
    split = (flags >> 5 & 1) * len(text) // 2
    targets.output_parser(text[:split], text[split:], cuts=range(0, len(text), 1 + (flags & 7)),
                          parse_tools=not flags & 8, in_thinking=bool(flags & 16), cut=bool(flags & 128),
                          chat_format=LLAMA3 if flags & 64 else HERMES)


SCRATCH = Path(tempfile.mkdtemp(prefix="kawai-fuzz-"))


def gguf(data: bytes) -> None:
    targets.gguf(data, SCRATCH / "fuzz.gguf")


def main() -> None:
    names = {"json_stream": json_stream, "request_body": request_body, "chat_request_body": chat_request_body,
             "output_parser": output_parser, "gguf": gguf}
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: fuzz.py {{{','.join(names)}}} [libFuzzer flags] [CORPUS_DIR ...]")
    name, argv = sys.argv[1], [sys.argv[0]] + sys.argv[2:]
    if name != "gguf" and not any(a.startswith("-dict=") for a in argv):
        argv.insert(1, f"-dict={HERE / 'request.dict'}")  # JSON punctuation, field names, tags
    corpus = next((Path(a) for a in argv[1:] if not a.startswith("-")), None)
    if corpus is not None and corpus.is_dir():
        seeds = SEEDS.get(name, [])
        if name == "gguf":
            from tiny_models import write_tiny_model

            seeds = [write_tiny_model(SCRATCH, "qwen2").read_bytes()]
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i}").write_bytes(seed)
    atheris.Setup(argv, names[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()

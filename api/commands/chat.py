"""`kawai chat`: an interactive multi-turn chat in the terminal.

The KV cache lives across turns: each turn renders the whole conversation with the chat template, and the
generation loop prefills only what the cache does not already hold (the stats line after each answer
shows new vs cached prompt tokens). Commands: /exit, /reset, /help. Ctrl-C stops the current answer (or
clears the line at the prompt); Ctrl-D exits.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, TextIO

from kawai.api.commands.run import add_model_arguments, add_sampling_arguments, format_speed, load_model, sampling_params
from kawai.engine.errors import ContextLengthError

HELP = "commands: /exit (or Ctrl-D) quits, /reset starts a new conversation, Ctrl-C stops an answer"


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat in the terminal")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.set_defaults(handler=_run)


@contextmanager
def ctrl_c_sets(flag: threading.Event) -> Iterator[None]:
    """While active, Ctrl-C sets `flag` (the generation loop stops at the next token) instead of raising."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ChatSession:
    """One conversation: the messages so far and the KV cache holding their tokens."""

    def __init__(self, llm, params, system: str | None):
        self.llm, self.params, self.system = llm, params, system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.cache = self.llm.new_cache()

    def answer(self, text: str, out: TextIO, should_stop) -> tuple[str, object]:
        """Stream the assistant's reply to `out`; returns (reply text, GenerationStats)."""
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.llm.encode_chat(messages)
        generation = self.llm.generate(ids, self.params, cache=self.cache, should_stop=should_stop)
        pieces = []
        for step in generation:
            if step.text:
                out.write(step.text)
                out.flush()
                pieces.append(step.text)
        reply = "".join(pieces)
        self.messages = messages + [{"role": "assistant", "content": reply}]
        return reply, generation.stats


def _read_line(interactive: bool) -> str:
    """One line of user input; EOFError at end of input (Ctrl-D)."""
    if interactive:
        return input(">>> ")
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def _run(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = load_model(args)
    if not llm.has_chat_template:
        print("note: the model has no chat template; using ChatML", file=sys.stderr)
    session = ChatSession(llm, params, args.system)
    interactive = sys.stdin.isatty()
    err, out = sys.stderr, sys.stdout
    if interactive:
        print(HELP, file=err)
    while True:
        try:
            line = _read_line(interactive)
        except EOFError:
            if interactive:
                print(file=out)
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, keep chatting
            print(file=out)
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit", "/bye"):
            return 0
        if command == "/reset":
            session.reset()
            print("(new conversation)", file=err)
            continue
        if command in ("/help", "/?"):
            print(HELP, file=err)
            continue

        stop = threading.Event()
        try:
            with ctrl_c_sets(stop):
                reply, stats = session.answer(line, out, stop.is_set)
        except ContextLengthError as e:
            print(f"kawai: {e}; /reset starts a new conversation", file=err)
            continue
        if not reply.endswith("\n"):
            print(file=out)
        out.flush()
        notes = {"cancelled": " (stopped)", "context_full": " (context full: /reset to continue)"}
        print(
            f"[prompt: {stats.prefill_tokens} new + {stats.cached_tokens} cached tokens, "
            f"{stats.prefill_seconds:.2f} s; answer: "
            f"{format_speed(stats.generated_tokens, stats.decode_seconds, stats.decode_tokens_per_second)}; "
            f"finish: {stats.finish_reason}]{notes.get(stats.finish_reason, '')}",
            file=err,
        )

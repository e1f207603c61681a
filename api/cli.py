"""The `kawai` command line: one subcommand per module in `api/commands/`.

Each command module exposes `register(subparsers)`, which adds its parser and sets `handler` to a
function taking the parsed arguments and returning an exit code. User-facing failures are raised as
`engine.errors.KawaiError` (or `GGUFError`) and printed here as one line on stderr — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kawai.engine.errors import KawaiError
from kawai.engine.gguf import GGUFError

COMMANDS = ("pull", "models", "inspect", "run", "chat", "serve", "tokens", "bench", "cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kawai", description="CPU-only LLM server and engine.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"kawai.api.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except GGUFError as e:
        print(f"kawai: invalid GGUF file: {e}", file=sys.stderr)
        return 2
    except KawaiError as e:
        print(f"kawai: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kawai: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except Exception as e:  # last resort: one line, never a traceback
        print(f"kawai: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`kawai models` (placeholder until its issue lands)."""

from __future__ import annotations

from engine.errors import KawaiError


def register(sub) -> None:
    p = sub.add_parser("models", help="(not yet available)")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    raise KawaiError("'models' is not available yet")

"""Random ids in the Anthropic style: `msg_…`, `toolu_…`, `req_…` (base62, 144 random bits)."""

from __future__ import annotations

import secrets

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_CHARS = 24  # 24 base62 characters ~ 143 bits


def random_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(ALPHABET) for _ in range(ID_CHARS))


def new_message_id() -> str:
    return random_id("msg_")


def new_tool_use_id() -> str:
    return random_id("toolu_")


def new_request_id() -> str:
    return random_id("req_")

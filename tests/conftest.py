"""Shared fixtures. Real catalog models are fetched once (verified by SHA-256) into $KAWAI_HOME."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# One engine thread per process in tests: servers, oracles and pytest share the cores, and OpenMP threads
# that spin-wait on an oversubscribed machine slow everything down. Kernel tests set threads explicitly.
os.environ.setdefault("KAWAI_THREADS", "1")

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
SMOLLM_MODEL = "smollm2-135m-instruct-q4_1"


def _catalog_model(model_id: str) -> Path:
    from kawai.engine.catalog import ensure_model

    return ensure_model(model_id)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    return _catalog_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm_model_path() -> Path:
    return _catalog_model(SMOLLM_MODEL)


@pytest.fixture(scope="session")
def qwen_meta(default_model_path) -> dict:
    """The default model's GGUF metadata (parsed once: its vocabulary is 150k strings)."""
    from kawai.engine.gguf import open_gguf

    return open_gguf(default_model_path).metadata


@pytest.fixture(scope="session")
def smollm_meta(smollm_model_path) -> dict:
    from kawai.engine.gguf import open_gguf

    return open_gguf(smollm_model_path).metadata


@pytest.fixture(autouse=True)
def _event_streams_follow_the_grammar():
    """Every Anthropic event stream a test's LiveServer sent follows tests/sse_grammar.py."""
    yield
    harness = sys.modules.get("api_harness")  # only tests that started a server imported it
    for server in list(harness.LiveServer.running) if harness else []:
        failures, server.sse.failures = server.sse.failures, []
        assert not failures, "broken event stream:\n" + "\n\n".join(failures)


# What the SDKs read from the environment: the real clients in tests see only the server they are given.
SDK_ENV = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL",
           "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID")


@pytest.fixture(autouse=True)
def _no_sdk_env(monkeypatch):
    for name in SDK_ENV:
        monkeypatch.delenv(name, raising=False)

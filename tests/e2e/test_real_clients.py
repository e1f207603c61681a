"""Real clients against a real `kawai serve -m <default model>` (no other flag) on loopback: the TypeScript
SDK (@anthropic-ai/sdk) under node, and Claude Code (@anthropic-ai/claude-code) in print mode.

Both npm packages are installed into a temporary folder from the npm registry. Slow (`make test-slow`):
Claude Code's first request is ~19,000 tokens of system prompt and tool definitions (2.1.197), minutes
of CPU prefill on a quiet machine; the TypeScript SDK run takes about a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from api_harness import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NPM_PACKAGES = ("@anthropic-ai/sdk", "@anthropic-ai/claude-code")
TS_CHECK = Path(__file__).parents[1] / "clients" / "ts_sdk_check.mjs"
CLAUDE_CODE_SECONDS = 3600  # first prefill of ~12k tokens on a shared 2-core machine, then a few turns


@pytest.fixture(scope="module")
def npm_dir(tmp_path_factory) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the real-client tests")
    folder = tmp_path_factory.mktemp("npm")
    subprocess.run(["npm", "init", "-y"], cwd=folder, check=True, capture_output=True)
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", *NPM_PACKAGES], cwd=folder, check=True,
                   capture_output=True, timeout=900)
    return folder


@pytest.fixture(scope="module")
def served(default_model_path, tmp_path_factory):
    """`kawai serve -m MODEL --port P` as a user runs it (auth on: the first start creates a token; with
    output that is not a terminal it goes to $KAWAI_HOME/first-token, as docs/security.md says)."""
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    log = (home / "server.log").open("w")
    env = {**os.environ, "KAWAI_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("KAWAI_THREADS", None)  # as a user runs it: every core
    p = subprocess.Popen([sys.executable, "-P", "-m", "kawai.api.cli", "serve", "-m", str(default_model_path),
                          "--port", str(port)], cwd=ROOT, env=env, text=True, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while not _healthy(url):
            assert p.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()
            time.sleep(0.5)
        token = next(w for w in (home / "first-token").read_text().split() if w.startswith("kawai-"))
        yield url, token, home / "server.log"
    finally:
        p.terminate()
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: nothing of the caller's ANTHROPIC_* settings or home folder leaks in."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8", **extra}


def test_typescript_sdk_streams_a_message_and_a_tool_call(npm_dir, served, tmp_path):
    url, token, _ = served
    script = npm_dir / TS_CHECK.name  # next to node_modules, so the import resolves
    shutil.copy(TS_CHECK, script)
    env = client_env(tmp_path, KAWAI_URL=url, KAWAI_KEY=token, KAWAI_MODEL="claude-sonnet-4-5")
    done = subprocess.run(["node", str(script)], cwd=npm_dir, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])

    text = out["text"]
    assert text["type"] == "message" and text["model"] == "qwen2.5-coder-0.5b-instruct-q4_k_m"
    assert text["content"][0]["type"] == "text" and text["content"][0]["text"].strip()
    assert text["stop_reason"] in ("end_turn", "max_tokens") and text["usage"]["output_tokens"] >= 1
    events = out["events"]
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_delta" in events

    tool = out["tool"]
    calls = [b for b in tool["content"] if b["type"] == "tool_use"]
    assert tool["stop_reason"] == "tool_use" and calls and calls[0]["name"] == "get_weather"
    assert isinstance(calls[0]["input"].get("city"), str) and calls[0]["input"]["city"]
    # streamed as input_json_delta: the deltas of every tool_use block, one JSON document per call
    streamed, text_json, at = [], "".join(out["partialJson"]), 0
    while at < len(text_json):
        value, at = json.JSONDecoder().raw_decode(text_json, at)
        streamed.append(value)
    assert streamed == [c["input"] for c in calls]


def test_claude_code_print_mode_completes_a_file_task(npm_dir, served, tmp_path):
    """Claude Code with nothing configured but the base URL and the key (IS_SANDBOX=1 lets root use
    --dangerously-skip-permissions). The run must end without error; whether the 0.5B model manages the
    edit is recorded in the output, not asserted (the 1.5B model is the one for agents)."""
    url, token, server_log = served
    work = tmp_path / "work"
    work.mkdir()
    (work / "app.py").write_text("print('hello')\n")
    env = client_env(tmp_path / "home", ANTHROPIC_BASE_URL=url, ANTHROPIC_API_KEY=token, IS_SANDBOX="1",
                     DISABLE_AUTOUPDATER="1",
                     CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    (tmp_path / "home").mkdir()
    started = time.monotonic()
    done = subprocess.run(
        [str(npm_dir / "node_modules" / ".bin" / "claude"), "-p",
         "Create a file named hello.txt that contains the single word hi.",
         "--output-format", "json", "--dangerously-skip-permissions", "--max-turns", "4"],
        cwd=work, env=env, capture_output=True, text=True, timeout=CLAUDE_CODE_SECONDS,
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:], server_log.read_text()[-4000:])
    result = json.loads(done.stdout)
    print(f"claude code: {seconds:.0f} s, {result.get('num_turns')} turns, "
          f"hello.txt {'written' if (work / 'hello.txt').exists() else 'not written'}: {result.get('result')!r:.200}")
    assert result["type"] == "result" and result["is_error"] is False and result["num_turns"] >= 1
